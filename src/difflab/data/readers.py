"""The in-memory image data sets: item i -> (x float32 (C, H, W) in [-1, 1], int label).

MNIST and Fashion-MNIST (read from IDX files, `read_idx`) and CIFAR-10 (torchvision's batches,
or the partial offline copy) are held in memory as one uint8 tensor (N, C, H, W)
(`TensorImages`): `ImageStream` gathers a batch from it and converts only that batch to floats.
`data.images.load_image_dataset` picks among these and the file-backed sets by name.
Missing files raise `DatasetMissingError` saying where they belong and how to get them.
"""

from __future__ import annotations

import gzip
import math
import struct
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from difflab.data.folders import (
    DOWNLOAD_HINT,
    DataFileError,
    DatasetMissingError,
    check_split,
    to_signed,
    try_download,
)
from difflab.errors import ConfigError

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class TensorImages(Dataset):
    """Images held in memory: `images` uint8 (N, C, H, W), `labels` long (N,) or None.

    Item i is (x float32 (C, H, W) in [-1, 1], label); label 0 when unconditional.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, class_names: Sequence[str] = ()):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = None if labels is None else labels.long()
        self.shape = tuple(images.shape[1:])
        self.class_names = tuple(class_names)
        inferred = 0 if self.labels is None else int(self.labels.max()) + 1
        self.num_classes = len(self.class_names) or inferred

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return to_signed(self.images[i]), 0 if self.labels is None else int(self.labels[i])


def read_idx(path: Path, ndim: int) -> Tensor:
    """uint8 tensor from an IDX file, gzipped or not: (N, H, W) for ndim=3, (N,) for ndim=1.

    Format: big-endian int32 magic 0x800 + ndim (0x08 = uint8), ndim int32 sizes, then the bytes.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a cut-off gzip an EOFError
        raise DataFileError(
            f"cannot read {path}: {err}; replace it with the official file"
        ) from err
    header = 4 * (1 + ndim)
    magic, *dims = struct.unpack(f">{1 + ndim}I", data[:header].rjust(header, b"\0"))
    if magic != 0x800 + ndim:
        raise DataFileError(f"{path}: IDX magic {magic:#x}, expected {0x800 + ndim:#x} (corrupt?)")
    if len(data) != header + math.prod(dims):
        raise DataFileError(f"{path}: {len(data)} bytes, expected {header + math.prod(dims)}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(dims)


def _resize(images: Tensor, size: int) -> Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), antialiased bilinear, in chunks (memory)."""
    chunks = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True)
        for chunk in images.split(8192)
    ]
    return torch.cat(chunks).round().clamp(0, 255).to(torch.uint8)


def load_mnist(
    root: str | Path,
    split: str = "train",
    *,
    fashion: bool = False,
    download: bool = False,
    image_size: int = 32,
    resize: bool = False,
) -> TensorImages:
    """MNIST or Fashion-MNIST from `root/MNIST/raw/` (resp. `root/FashionMNIST/raw/`).

    Reads the IDX files directly (`.gz`, or torchvision's unpacked copies), so nothing is written.
    The 28x28 digits are zero-padded to image_size (2 pixels each side for 32: the border is
    exactly -1) or, with resize=True, resized. Returns TensorImages with images (N, 1, S, S).
    """
    root = Path(root).expanduser().absolute()  # messages name full paths
    folder = root / ("FashionMNIST" if fashion else "MNIST") / "raw"
    stems = MNIST_FILES[check_split(split, tuple(MNIST_FILES), "fashion" if fashion else "mnist")]
    missing = _mnist_missing(folder, stems, "Fashion-MNIST" if fashion else "MNIST")
    if missing and download:
        from torchvision import datasets  # slow import (seconds): only when needed

        cls = datasets.FashionMNIST if fashion else datasets.MNIST
        try_download(lambda: cls(str(root), train=split == "train", download=True), missing)
        missing = _mnist_missing(folder, stems, "Fashion-MNIST" if fashion else "MNIST")
    if missing:
        raise DatasetMissingError(missing)
    images = read_idx(_idx_path(folder, stems[0]), 3)[:, None]  # (N, 1, 28, 28)
    labels = read_idx(_idx_path(folder, stems[1]), 1)
    if resize:
        images = _resize(images, image_size)
    elif image_size < 28 or (image_size - 28) % 2:
        raise ConfigError(f"cannot pad 28x28 to {image_size}x{image_size}; use resize=True")
    else:
        pad = (image_size - 28) // 2
        images = F.pad(images, (pad, pad, pad, pad))  # pads with 0, which becomes -1
    names = FASHION_CLASSES if fashion else tuple(str(d) for d in range(10))
    return TensorImages(images, labels, names)


def _idx_path(folder: Path, stem: str) -> Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.is_file() else folder / stem


def _mnist_missing(folder: Path, stems: Sequence[str], title: str) -> str:
    """'' when both files are there, else the message for DatasetMissingError."""
    if all(_idx_path(folder, stem).is_file() for stem in stems):
        return ""
    wanted = " and ".join(str(folder / f"{stem}.gz") for stem in stems)
    official = ", ".join(f"{stem}.gz" for pair in MNIST_FILES.values() for stem in pair)
    return (
        f"{title} files not found: expected {wanted} (unzipped copies also work). "
        f"To get them: {DOWNLOAD_HINT} the official files {official} into {folder}/"
    )


def load_cifar10(
    root: str | Path, split: str = "train", *, download: bool = False, image_size: int = 32
) -> TensorImages:
    """CIFAR-10 from torchvision's `root/cifar-10-batches-py/`, else the offline partial copy.

    The partial copy `root/CIFAR10/cifar10_partial.npz` (uint8 HWC arrays; see the shared data
    README) holds only the intact images of truncated official files; loading it warns.
    Returns TensorImages with images (N, 3, S, S), S = image_size (resized when not 32).
    """
    check_split(split, ("train", "test"), "cifar10")
    root = Path(root).expanduser().absolute()  # messages name full paths
    full, npz = root / "cifar-10-batches-py", root / "CIFAR10" / "cifar10_partial.npz"
    missing = (
        f"CIFAR-10 not found: expected the official batches in {full}/ (data_batch_1 ... "
        f"data_batch_5, test_batch, batches.meta) or the partial copy {npz}. To get them: "
        f"{DOWNLOAD_HINT} the folder cifar-10-batches-py/ from cifar-10-python.tar.gz into {root}/"
    )
    if not full.is_dir() and download:
        from torchvision.datasets import CIFAR10  # slow import (seconds): only when needed

        fetch = partial(CIFAR10, str(root), split == "train", download=True)
        try_download(fetch, missing)
    if full.is_dir():
        images, labels, names = _cifar_full(root, split)
    elif npz.is_file():
        images, labels, names = _cifar_partial(npz, split)
    else:
        raise DatasetMissingError(missing)
    if image_size != 32:
        images = _resize(images, image_size)
    return TensorImages(images, labels, names)


def _cifar_full(root: Path, split: str) -> tuple[Tensor, Tensor, list[str]]:
    from torchvision.datasets import CIFAR10  # slow import (seconds): only when needed

    try:
        data = CIFAR10(str(root), train=split == "train")
    except RuntimeError as err:  # torchvision's md5 check failed
        raise DataFileError(
            f"{root / 'cifar-10-batches-py'}/ fails torchvision's md5 check ({err}): replace it "
            "with the official folder (or remove it to use the partial copy, if you have one)"
        ) from err
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return images, torch.tensor(data.targets), list(data.classes)


def _cifar_partial(npz: Path, split: str) -> tuple[Tensor, Tensor, list[str]]:
    with np.load(npz, allow_pickle=False) as arrays:
        images = torch.from_numpy(arrays[f"{split}_images"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
        names = [str(n) for n in arrays["label_names"]]
    full_size = 50_000 if split == "train" else 10_000
    warnings.warn(
        f"CIFAR-10 {split}: only {len(images)} of {full_size} images are available (the partial "
        f"offline copy {npz}); fine for tests and smoke runs, not for a real training run",
        stacklevel=3,
    )
    return images, labels, names
