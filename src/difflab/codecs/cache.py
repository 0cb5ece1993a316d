"""`model.codec_cache=true`: the posterior moments (mean, logvar) of the whole training set,
encoded once and kept beside the codec (RUN/cache/latents-<data>-<sha12>.safetensors, written
atomically), so that training reads latents without running the encoder per batch.

The stream over the cache is an `ImageStream` with the same seed: it draws the same
permutations and its state is checkpointed as the image stream's is, so a run resumes exactly;
a run killed while encoding leaves no cache and encodes again next time. Drawing z from the
cached moments (model.codec_encode=sample) uses the trainer's generator, as without a cache.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from difflab.config import ConfigError
from difflab.data.readers import TensorImages
from difflab.data.stream import ImageStream
from difflab.files import replace_atomically

ENCODE_BATCH = 500


class MomentStream(ImageStream):
    """Batches of cached moments (B, 2c, h, w) float32 and labels, in the image stream's order."""

    def __init__(self, moments: Tensor, labels: Tensor | None, seed: int, num_classes: int):
        # the index bookkeeping of ImageStream over a stand-in of the right length and classes
        stand_in = TensorImages(torch.zeros(len(moments), 1, 1, 1, dtype=torch.uint8), labels)
        super().__init__(stand_in, seed, flip=False)
        self.moments, self.labels = moments, labels
        self.shape, self.num_classes = tuple(moments.shape[1:]), num_classes

    def to_device(self, device: torch.device) -> None:
        self.moments = self.moments.to(device)
        self.labels = None if self.labels is None else self.labels.to(device)
        self.device = torch.device(device)

    def next_batch(self, n: int) -> tuple[Tensor, Tensor | None]:
        index = self._next_indices(n).to(self.device)
        y = None if self.labels is None else self.labels[index]
        return self.moments[index], y if self.num_classes > 0 else None


def cached_stream(codec, data: ImageStream, cfg) -> MomentStream:
    """The stream over the cached moments of `data`'s images (encoded now if not cached)."""
    if not isinstance(getattr(data, "data", None), TensorImages):
        raise ConfigError(
            f"model.codec_cache=true needs an in-memory data set (mnist, fashion, cifar10), "
            f"not {cfg.data.name}; set model.codec_cache=false"
        )
    if data.flip:
        raise ConfigError(
            "model.codec_cache=true caches unflipped images, but this data set flips; set "
            "data.flip=off, or model.codec_cache=false to encode every (flipped) batch"
        )
    images = data.data
    folder = codec.source.parent / "cache"
    path = folder / f"latents-{cfg.data.name}-{cfg.data.image_size}-{codec.sha256[:12]}.safetensors"
    moments = None
    if path.is_file():
        try:
            moments = load_file(str(path))["moments"]
        except (SafetensorError, OSError, KeyError):
            moments = None  # a damaged cache is rebuilt
        if moments is not None and len(moments) != len(images):
            moments = None
    if moments is None:
        moments = _encode_all(codec, images)
        folder.mkdir(exist_ok=True)
        replace_atomically(path, lambda tmp: save_file({"moments": moments}, str(tmp)))
    stream = MomentStream(moments, images.labels, cfg.train.seed, data.num_classes)
    stream.class_names = getattr(data, "class_names", ())
    return stream


@torch.no_grad()
def _encode_all(codec, images: TensorImages) -> Tensor:
    """Posterior (mean, logvar) of every image, concatenated on channels: (N, 2c, h, w)."""
    device = next(codec.ae.parameters()).device
    parts = []
    for start in range(0, len(images), ENCODE_BATCH):
        x = images.images[start : start + ENCODE_BATCH].to(device).float() / 127.5 - 1.0
        parts.append(torch.cat(codec.ae.moments(x), dim=1).cpu())
    return torch.cat(parts)
