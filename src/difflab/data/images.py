"""Real image data sets: item i -> (x float32 (C, H, W) in [-1, 1], int label).

`load_image_dataset(name, root, ...)` gives the dataset and an `ImageInfo`; this module is the
registry of names (with `DEFAULT_FLIP`). MNIST, Fashion-MNIST and CIFAR-10 are read by
`data.readers`, in memory as one uint8 tensor (N, C, H, W) (`TensorImages`): `ImageStream`
gathers a batch from it and converts only that batch to floats. CelebA and image folders are
decoded from files per item (`data.folders`). Names that moved to `data.readers` are re-exported.

Datasets never flip. Random flips are drawn by `data.stream.ImageStream` from its own generator,
so a resumed run sees the same flips; `ImageInfo.flip` says whether flips suit the data.
Missing files raise `DatasetMissingError` saying where they belong and how to get them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from difflab.data.folders import (
    DataFileError,
    DatasetMissingError,
    image_folder,
    load_celeba64,
)
from difflab.data.readers import TensorImages, load_cifar10, load_mnist, read_idx
from difflab.errors import ConfigError

__all__ = [
    "DataFileError",
    "DatasetMissingError",
    "ImageInfo",
    "TensorImages",
    "load_celeba64",
    "load_cifar10",
    "load_image_dataset",
    "load_mnist",
    "read_idx",
]

# imagefolder: unknown content (text, digits?), so flip only when asked
DEFAULT_FLIP = {
    "mnist": False,
    "fashion": False,
    "cifar10": True,
    "celeba64": True,
    "imagefolder": False,
}


@dataclass(frozen=True)
class ImageInfo:
    """What a loaded image data set is: enough to build a network and a stream for it."""

    name: str
    split: str
    shape: tuple[int, int, int]  # (C, H, W) of one image
    num_classes: int  # 0 = unconditional
    class_names: tuple[str, ...]
    size: int  # number of images
    flip: bool  # whether ImageStream should flip horizontally


def load_image_dataset(
    name: str,
    root: str | Path,
    split: str = "train",
    download: bool = False,
    image_size: int | None = None,
    flip: bool | None = None,
    *,
    channels: int = 0,
    resize: bool = False,
) -> tuple[Dataset, ImageInfo]:
    """A named image data set and its description.

    Args:
        name: mnist, fashion, cifar10, celeba64 or imagefolder.
        root: the data folder (torchvision layout); for imagefolder the image folder itself.
        split: train or test (celeba64 also valid and all; imagefolder ignores it).
        download: fetch missing files with torchvision (needs internet); never otherwise.
        image_size: output size S; default 32 (mnist, fashion, cifar10) or 64 (others).
        flip: whether ImageStream should flip; default per data set (`DEFAULT_FLIP`).
        channels: imagefolder only, 1 or 3 (0 = 3).
        resize: mnist and fashion only: resize 28 -> S instead of zero-padding.
    Returns:
        (dataset, info): item i of dataset is (x float32 (C, S, S) in [-1, 1], int label).
    """
    if name not in DEFAULT_FLIP:
        raise ConfigError(
            f"unknown image dataset {name!r}; choose one of {', '.join(DEFAULT_FLIP)}"
        )
    root = Path(root).expanduser().absolute()  # messages name full paths
    if name in ("mnist", "fashion"):
        size = image_size or 32
        dataset = load_mnist(
            root,
            split,
            fashion=name == "fashion",
            download=download,
            image_size=size,
            resize=resize,
        )
    elif name == "cifar10":
        dataset = load_cifar10(root, split, download=download, image_size=image_size or 32)
    elif name == "celeba64":
        dataset = load_celeba64(root, split, download=download, image_size=image_size or 64)
    else:
        dataset = image_folder(root, image_size or 64, channels or 3)
    info = ImageInfo(
        name=name,
        split=split,
        shape=dataset.shape,
        num_classes=dataset.num_classes,
        class_names=dataset.class_names,
        size=len(dataset),
        flip=DEFAULT_FLIP[name] if flip is None else flip,
    )
    return dataset, info
