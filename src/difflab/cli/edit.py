"""`difflab sample --init / --mask`: the images (or points) an edit starts from and the masks it
keeps, read from a folder of images, one image file or an .npz (samples/editing.py does the
editing)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from difflab.config import ConfigError
from difflab.samplers import Edit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def add_edit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--init",
        help="edit these: a folder of images, one image or an .npz with 'samples' (image to "
        "image with --strength; inpainting with --mask)",
    )
    p.add_argument(
        "--strength",
        type=float,
        help="--init: how far toward noise, in (0, 1] (1 = a fresh sample; default 1)",
    )
    p.add_argument(
        "--mask", help="--init: what to keep (white / 1 = keep), in the same forms as --init"
    )
    p.add_argument(
        "--resample", type=int, help="--mask: RePaint's resamplings of each jump (1 = none)"
    )
    p.add_argument("--jump", type=int, help="--mask: RePaint's jump length, in grid steps")
    p.add_argument(
        "--resize", action="store_true", help="--init: resize and convert images to the run's"
    )


def read_edit(args: argparse.Namespace, shape: tuple[int, ...]) -> Edit | None:
    """The edit the flags ask for (None without --init); ConfigError on any bad input."""
    if args.init is None:
        extra = [
            f for f in ("strength", "mask", "resample", "jump") if getattr(args, f) is not None
        ]
        if extra or args.resize:
            flags = ", ".join(f"--{f}" for f in extra or ["resize"])
            raise ConfigError(f"{flags} edit(s) the --init images: give --init IMAGES")
        return None
    return make_edit(
        shape, args.init, args.strength, args.mask, args.resample, args.jump, args.resize
    )


def make_edit(shape, init, strength=None, mask=None, resample=None, jump=None, resize=False):
    """The `Edit` of `difflab sample --init ...` and of `Run.sample(init=...)`: init and mask
    are what --init / --mask name (a folder, an image, an .npz) or arrays (N, ...) already in
    [-1, 1] (images, points) or {0, 1} / bool (masks); None = each option's default."""
    init = _read(init, "--init") if isinstance(init, (str, Path)) else _tensor(init)
    if mask is not None:
        mask = _as_mask(_read(mask, "--mask") if isinstance(mask, (str, Path)) else _tensor(mask))
        if mask.shape[2:] != init.shape[2:] or len(mask) not in (1, len(init)):
            raise ConfigError(
                f"--mask gives {len(mask)} of size {tuple(mask.shape[2:])}, --init "
                f"{len(init)} of size {tuple(init.shape[2:])}: a mask needs its image's size "
                "(one mask for all, or one per image)"
            )
    if len(shape) == 3:
        init = _fit(init, shape, resize)
        if mask is not None and resize:
            mask = F.interpolate(mask.float(), size=shape[1:], mode="nearest") > 0.5
    strength = 1.0 if strength is None else strength
    resample = 1 if resample is None else resample
    jump = 1 if jump is None else jump
    return Edit(init, strength, mask, resample, jump)


def edit_meta(edit: Edit, init, mask, latent: bool) -> dict:
    """What a samples .npz records of an edit (paths only when the edit came from files)."""
    meta: dict = dict(strength=edit.strength)
    if isinstance(init, (str, Path)):
        meta["init"] = str(init)
    if edit.mask is not None:
        if isinstance(mask, (str, Path)):
            meta["mask"] = str(mask)
        meta.update(resample=edit.resample, jump=edit.jump)
        meta.update(mask_space="latent" if latent else "data")
    return meta


def _tensor(x) -> Tensor:
    """An array-like (a tensor, a numpy array, `Samples`) as a float32 CPU tensor."""
    x = getattr(x, "tensor", x)  # the API's Samples
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu().float()


def _read(spec: str, flag: str) -> Tensor:
    """(N, ...) float32: images as (N, C, H, W) in [-1, 1]; an .npz's 'samples' as they are."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{flag} {spec}: no such file or folder")
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "samples" not in f:
                raise ConfigError(f"{flag} {spec}: the .npz holds no 'samples' array")
            return torch.from_numpy(np.asarray(f["samples"], dtype=np.float32))
    files = (
        sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if (path.is_dir())
        else [path]
    )
    if not files:
        raise ConfigError(f"{flag} {spec}: the folder holds no images")
    images = [_image(p, flag) for p in files]
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        raise ConfigError(f"{flag} {spec}: the images differ in size or channels: {sorted(sizes)}")
    return torch.stack(images)


def _image(path: Path, flag: str) -> Tensor:
    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in ("L", "1", "I;16", "I", "F") else "RGB")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag}: cannot read image {path}: {err}") from None
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def _as_mask(mask: Tensor) -> Tensor:
    """Boolean (N, 1, H, W) for images (any channel dark = unknown), (N, D) for points; white
    (1 in [-1, 1] images) or 1 in an .npz is kept."""
    if mask.dim() == 4:
        keep = mask > 0.5 if mask.min() >= 0 else mask > 0  # [0, 1] masks or [-1, 1] images
        return keep.all(dim=1, keepdim=True)
    if mask.dim() == 3:  # (N, H, W)
        return (mask > 0.5)[:, None]
    return mask > 0.5


def _fit(init: Tensor, shape: tuple[int, ...], resize: bool) -> Tensor:
    """Images in the run's (C, H, W): refused when they differ, converted with --resize."""
    if init.dim() != 4:
        raise ConfigError(f"--init gives {tuple(init.shape)}; the run makes images {shape}")
    channels, size = shape[0], tuple(shape[1:])
    if init.shape[1] == channels and tuple(init.shape[2:]) == size:
        return init
    if not resize:
        raise ConfigError(
            f"--init images are {tuple(init.shape[1:])} (C, H, W); the run makes {shape}: "
            "pass --resize to convert them"
        )
    if init.shape[1] != channels:
        init = (
            init.mean(dim=1, keepdim=True)
            if channels == 1
            else init[:, :1].expand(-1, channels, -1, -1)
        )
    if tuple(init.shape[2:]) != size:
        init = F.interpolate(init, size=size, mode="bicubic", align_corners=False, antialias=True)
    return init.clamp(-1.0, 1.0)
