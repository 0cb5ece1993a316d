"""Training batches as a resumable stream: `next_batch(n) -> (x0, y)` and a state."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.utils.data import Dataset

from difflab.data.folders import to_signed
from difflab.data.readers import TensorImages
from difflab.data.toy2d import sample_toy2d
from difflab.errors import ConfigError


class ToyStream:
    """Fresh 2-D points every batch, from one seeded generator (so resuming continues exactly)."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = (2,)
        self.num_classes = 0

    def next_batch(self, n: int) -> tuple[Tensor, Tensor | None]:
        return sample_toy2d(self.name, n, self.generator), None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class ImageStream:
    """Image batches in epochs, each a random permutation; resuming gives the same batches bitwise.

    Permutations and flips come from the stream's own generator. A batch that runs past the end
    of an epoch continues into the next epoch's permutation, so every image is seen exactly once
    per epoch.

    Args:
        data: images in memory, either a `TensorImages` or a tuple (images uint8 (N, C, H, W),
            labels (N,) or None); a batch is one gather and one uint8 -> float conversion. Or any
            Dataset whose item i is (x float32 (C, H, W) in [-1, 1], int label), read item by
            item; its `shape` and `num_classes` attributes are used when present (no
            `num_classes` means unconditional).
        seed: seeds the generator.
        flip: flip each image horizontally with probability 1/2.
        workers: threads that decode a batch of image files in parallel (file datasets only;
            PIL's decoders release the GIL). 0 = min(8, CPU count); 1 = in this thread.
    """

    def __init__(
        self,
        data: Dataset | tuple[Tensor, Tensor | None],
        seed: int,
        flip: bool,
        workers: int = 0,
    ):
        self.data = TensorImages(*data) if isinstance(data, tuple) else data
        self.size = len(self.data)
        if self.size == 0:
            raise ConfigError("ImageStream needs at least one image")
        self.shape = tuple(getattr(self.data, "shape", None) or self.data[0][0].shape)
        self.num_classes = getattr(self.data, "num_classes", 0)
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0  # next index into self.order
        self.order = torch.randperm(self.size, generator=self.generator)
        self.device = torch.device("cpu")  # where batches are made (to_device: in-memory sets)
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._pool = None

    def to_device(self, device: torch.device) -> None:
        """Keep in-memory images on `device` (a GPU): batches are gathered there, with no copy
        per step. File datasets stay on the CPU (and are pinned for the copy instead)."""
        if isinstance(self.data, TensorImages):
            labels = None if self.data.labels is None else self.data.labels.to(device)
            self.data = TensorImages(self.data.images.to(device), labels, self.data.class_names)
            self.device = torch.device(device)

    def _read_files(self, index: list[int]) -> tuple[Tensor, Tensor]:
        """Decode the files of a batch, in a thread pool when there are several workers."""
        if self.workers > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="difflab-decode")
            items = list(self._pool.map(self.data.__getitem__, index))
        else:
            items = [self.data[i] for i in index]
        x0 = torch.stack([x for x, _ in items])
        if torch.cuda.is_available():
            x0 = x0.pin_memory()  # the copy to the GPU can then overlap with compute
        return x0, torch.tensor([int(label) for _, label in items], dtype=torch.long)

    def next_batch(self, n: int) -> tuple[Tensor, Tensor | None]:
        """x0 float32 (n, C, H, W) in [-1, 1] and labels long (n,), or None if unconditional."""
        index = self._next_indices(n)
        if isinstance(self.data, TensorImages):
            index = index.to(self.device)
            x0 = to_signed(self.data.images[index])
            y = None if self.data.labels is None else self.data.labels[index]
        else:
            x0, y = self._read_files(index.tolist())
        if self.flip:  # drawn on the CPU generator wherever the images are: same on any device
            flipped = (torch.rand(n, generator=self.generator) < 0.5).to(x0.device)
            x0 = torch.where(flipped[:, None, None, None], x0.flip(-1), x0)
        return x0, y if self.num_classes > 0 else None

    def _next_indices(self, n: int) -> Tensor:
        """The next n dataset indices (n,), drawing a new permutation at each epoch's end."""
        parts = []
        while n > 0:
            if self.position == self.size:
                self.epoch += 1
                self.position = 0
                self.order = torch.randperm(self.size, generator=self.generator)
            take = self.order[self.position : self.position + n]
            self.position += len(take)
            n -= len(take)
            parts.append(take)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
            "order": self.order.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["order"]) != self.size:
            raise ConfigError(
                f"stream state is for {len(state['order'])} images, data has {self.size}"
            )
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.order = state["order"].clone()
