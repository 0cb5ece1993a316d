"""Images decoded from files with PIL, per item: any folder of images, and CelebA.

Also the pieces every image data set shares: the [-1, 1] pixel convention, the errors, and
torchvision downloads. Every dataset here yields `(x, label)`, x float32 (C, H, W) in [-1, 1].
Nothing is skipped: a file PIL cannot read raises `DataFileError` naming it (on first read, or
all at once with `FileImages.verify()`), and a folder without images is an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from difflab.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CELEBA_SPLITS = {"train": "0", "valid": "1", "test": "2", "all": None}
DOWNLOAD_HINT = "run with --set data.download=true on a machine with internet, or copy"


class DatasetMissingError(ConfigError, FileNotFoundError):
    """The data set's files are not where they should be; the message says where and how."""


class DataFileError(ConfigError):
    """A data file is there but cannot be read: corrupt, truncated or not what its name says."""


def to_signed(pixels: Tensor) -> Tensor:
    """uint8 pixels (..., C, H, W) in [0, 255] -> float32 in [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
    return pixels.float() / 127.5 - 1.0


def check_signed_images(
    images: Tensor, channels: tuple[int, ...] = (1, 3), size: int | None = None
) -> None:
    """Raise ValueError unless `images` are float (N, C, H, W) with N >= 1, C in `channels`,
    H = W = `size` when given, and values in [-1, 1] (up to 1e-4 of round-off, as from a clamp
    or x / 127.5 - 1); the message says what came and how to convert it."""
    shape_ok = images.dim() == 4 and images.shape[0] >= 1 and images.shape[1] in channels
    if size is not None:
        shape_ok = shape_ok and tuple(images.shape[2:]) == (size, size)
    low, high = (float(images.min()), float(images.max())) if images.numel() else (0.0, 0.0)
    in_range = low >= -1 - 1e-4 and high <= 1 + 1e-4  # False for NaN too
    if not (shape_ok and images.is_floating_point() and in_range):
        height_width = "H, W" if size is None else f"{size}, {size}"
        raise ConfigError(
            f"images must be in [-1, 1] with shape (N, C, {height_width}), N >= 1, C = "
            f"{' or '.join(map(str, channels))}; got shape {tuple(images.shape)}, dtype "
            f"{images.dtype}, min/max {low:.4g}/{high:.4g} (uint8 pixels in [0, 255] become "
            "x / 127.5 - 1; grey images need images[:, None])"
        )


def try_download(fetch: Callable[[], object], missing: str) -> None:
    """Run torchvision's downloader; offline it fails, which we report with the manual route."""
    try:
        fetch()
    except (OSError, RuntimeError, ImportError, ValueError) as err:
        raise DatasetMissingError(f"download failed ({err}); no internet here? {missing}") from err


def check_split(split: str, allowed: Sequence[str], name: str) -> str:
    if split not in allowed:
        raise ConfigError(f"{name} has splits {', '.join(allowed)}; got {split!r}")
    return split


def open_image(path: Path, channels: int) -> Image.Image:
    """Decode a whole image file as greyscale (channels=1) or RGB (channels=3)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return img.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataFileError(f"cannot read image {path}: {err}") from err


def center_crop(img: Image.Image, crop: int) -> Image.Image:
    """The central crop x crop square (the image must be at least that large)."""
    width, height = img.size
    left, top = (width - crop) // 2, (height - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side scaled to `size` (aspect kept), then the central size x size square."""
    width, height = img.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    return center_crop(img.resize(new, Image.Resampling.BICUBIC), size)


def pil_to_uint8(img: Image.Image) -> Tensor:
    """PIL image -> uint8 tensor (C, H, W)."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W) or (H, W, C)
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()


class FileImages(Dataset):
    """Images decoded from files on every access; item i -> (x (C, H, W) in [-1, 1], label).

    Args:
        paths: one file per image.
        labels: class index per image, or None for unconditional data (label 0).
        transform: PIL image -> PIL image of size (size, size), e.g. `resize_center_crop`.
        channels: 1 (greyscale) or 3 (RGB).
        size: output height and width.
        class_names: one name per class; empty for unconditional data.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        transform: Callable[[Image.Image], Image.Image],
        channels: int,
        size: int,
        class_names: Sequence[str] = (),
    ):
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        self.paths = list(paths)
        self.labels = None if labels is None else list(labels)
        self.transform = transform
        self.channels = channels
        self.shape = (channels, size, size)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.transform(open_image(self.paths[i], self.channels))
        pixels = pil_to_uint8(img)
        if tuple(pixels.shape) != self.shape:
            raise DataFileError(f"{self.paths[i]} became {tuple(pixels.shape)}, not {self.shape}")
        return to_signed(pixels), 0 if self.labels is None else self.labels[i]

    def verify(self) -> int:
        """Open every file once (slow for big sets); raise `DataFileError` on the first bad one.

        Returns: the number of images checked.
        """
        for path in self.paths:
            open_image(path, self.channels)
        return len(self.paths)


def _images_in(folder: Path) -> list[Path]:
    """Image files under folder (recursively), sorted so indices never depend on the disk."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def image_folder(root: str | Path, image_size: int, channels: int = 3) -> FileImages:
    """A folder of images; with sub-folders, each sub-folder is a class (sorted names -> 0, 1, ...).

    Args:
        root: the folder. Files count as images by extension (`IMAGE_EXTENSIONS`).
        image_size: shorter side resized to this, then centre-cropped to a square.
        channels: 1 (greyscale) or 3 (RGB).
    Returns:
        FileImages yielding (x (channels, image_size, image_size) in [-1, 1], class index or 0).
    """
    resize_to = partial(resize_center_crop, size=image_size)  # picklable, for DataLoader workers
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetMissingError(f"image folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [p for p in _images_in(root) if p.parent == root]
    if class_dirs and loose:
        # With class folders, a loose image has no class; refuse rather than drop it silently.
        raise ConfigError(f"{root} has class sub-folders and loose images (e.g. {loose[0].name})")
    if not class_dirs:
        if not loose:
            raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
        return FileImages(loose, None, resize_to, channels, image_size)
    paths, labels = [], []
    for label, folder in enumerate(class_dirs):
        found = _images_in(folder)
        if not found:
            raise ConfigError(
                f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += found
        labels += [label] * len(found)
    names = [d.name for d in class_dirs]
    return FileImages(paths, labels, resize_to, channels, image_size, names)


def crop140_resize(img: Image.Image, size: int) -> Image.Image:
    """CelebA preprocessing: the central 140x140 of the aligned 178x218 image, resized to size."""
    return center_crop(img, 140).resize((size, size), Image.Resampling.BICUBIC)


def load_celeba64(
    root: str | Path, split: str = "train", *, download: bool = False, image_size: int = 64
) -> FileImages:
    """CelebA (aligned) from torchvision's layout, unconditional, decoded per item.

    Reads `root/celeba/list_eval_partition.txt` and `root/celeba/img_align_celeba/*.jpg`.
    Preprocessing: centre crop 140x140 of the aligned 178x218 faces, then resize to 64x64, as
    NCSN (Song & Ermon 2019) and many DDPM re-implementations do. (DDIM's official code crops
    128x128 around (x, y) = (89, 121) instead.) Returns FileImages of (3, 64, 64), label 0.
    """
    want = CELEBA_SPLITS[check_split(split, tuple(CELEBA_SPLITS), "celeba64")]
    folder = Path(root).expanduser().absolute() / "celeba"
    images_dir, partition = folder / "img_align_celeba", folder / "list_eval_partition.txt"
    missing = (
        f"CelebA not found: expected {partition} and the JPEGs in {images_dir}/. "
        f"To get them: {DOWNLOAD_HINT} img_align_celeba.zip (unzipped) and "
        f"list_eval_partition.txt into {folder}/"
    )
    if not (images_dir.is_dir() and partition.is_file()) and download:
        from torchvision.datasets import CelebA  # slow import (seconds): only when needed

        try_download(
            lambda: CelebA(str(folder.parent), split="all", target_type=[], download=True), missing
        )
    if not (images_dir.is_dir() and partition.is_file()):
        raise DatasetMissingError(missing)
    rows = [line.split() for line in partition.read_text().splitlines() if line.strip()]
    names = [row[0] for row in rows if want is None or row[1] == want]
    present = set(os.listdir(images_dir))  # one listing, not 200k stat calls
    absent = [n for n in names if n not in present]
    if absent or not names:
        raise DatasetMissingError(
            f"{len(absent)} of {len(names)} CelebA {split} images listed in {partition} are not "
            f"in {images_dir}/ (e.g. {absent[:3]}). {missing}"
        )
    transform = partial(crop140_resize, size=image_size)
    return FileImages([images_dir / n for n in names], None, transform, 3, image_size)
