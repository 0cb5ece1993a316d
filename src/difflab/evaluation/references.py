"""References for the evaluation protocol: the real images that generated samples are compared
against (a data set split, a folder of images, or a samples .npz; `open_reference`), and the
reference-feature cache (`reference_features`). `EvalError` and `cache_dir` live here too, so that
`protocol.py`, which holds the metrics and re-exports all of this, imports without a cycle.

Reference features are cached under `cache_dir()/reference/` with a key of everything they were
computed from: the data (data set, split, size and preprocessing, or a folder's file list, or an
.npz's SHA-256), the subset drawn, and the extractor and its weights hash. A cache file is written
only after its features were computed, atomically, and read only if its key and hash match.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difflab.data.folders import to_signed
from difflab.data.images import DEFAULT_FLIP, load_image_dataset
from difflab.errors import ConfigError
from difflab.files import replace_atomically, sha256_file


class EvalError(ConfigError):
    """Bad evaluation input: the message names the problem and the fix."""


def cache_dir() -> Path:
    """$DIFFLAB_CACHE, else ~/.cache/difflab."""
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab")


@dataclass
class Reference:
    """Real images to compare against, loaded only when their features are not cached."""

    name: str  # how results name it: "mnist:test", a folder or an .npz path
    key: dict  # identity of the data for the cache (without the extractor)
    shape: tuple[int, int, int]  # (C, H, W)
    size: int  # images used
    load: Callable[[], Tensor]  # -> (size, C, H, W) float in [-1, 1]
    # features already computed in this process, by extractor (name, weights hash): a sweep
    # (eval --compare) measures many sample sets against one reference
    features: dict = field(default_factory=dict)


def _subset(total: int, n: int | None, seed: int) -> Tensor:
    """The first n of a seeded permutation of range(total), or everything (in order)."""
    if n is None or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def dataset_images(dataset, idx: Tensor) -> Tensor:
    """Images idx of a dataset as (len(idx), C, H, W) in [-1, 1]: one gather in memory, else
    decoded file by file."""
    if hasattr(dataset, "images"):  # TensorImages: uint8 in memory
        return to_signed(dataset.images[idx])
    return torch.stack([dataset[int(i)][0] for i in idx])  # files, decoded one by one


def _folder_fingerprint(folder: Path) -> str:
    """SHA-256 over the sorted (relative path, size, mtime) of every file: changes when any image
    is added, removed or rewritten, without reading the images."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def open_reference(
    spec: str,
    shape: tuple[int, int, int],
    *,
    root: str | Path = "data",
    n: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> Reference:
    """A reference from `spec`: a data set split (`mnist:test`, `cifar10` = its train split), a
    folder of images, or a samples .npz; images of `shape` (C, H, W), n of them drawn with a seeded
    permutation (None: all)."""
    c, h, w = shape
    if n is not None and n < 1:
        raise EvalError(
            f"--n-reference must be >= 1, got {n}; leave it out to use every reference image"
        )
    path = Path(spec).expanduser()
    if spec.endswith(".npz"):
        if not path.is_file():
            raise EvalError(f"reference file {path} does not exist")
        with np.load(path, allow_pickle=False) as f:
            if "samples" not in f:
                raise EvalError(f"{path} has no 'samples' array (keys: {', '.join(f.files)})")
            images = torch.from_numpy(f["samples"]).float()
        _check_shape(images.shape[1:], shape, spec)
        idx = _subset(len(images), n, seed)
        key = {"kind": "npz", "sha256": sha256_file(path), "subset_seed": seed}
        return Reference(str(path), key, shape, len(idx), lambda: images[idx])
    if path.is_dir():
        from difflab.data.folders import image_folder

        folder = image_folder(path, h, c)
        if h != w:
            raise EvalError(f"folder references are square images; the samples are {shape}")
        idx = _subset(len(folder), n, seed)
        key = {"kind": "folder", "path": str(path.absolute()), "files": _folder_fingerprint(path)}
        key.update(shape=list(shape), preprocessing="resize-shorter-side+center-crop")
        key["subset_seed"] = seed
        return Reference(str(path), key, shape, len(idx), lambda: dataset_images(folder, idx))
    name, _, split = spec.partition(":")
    if name not in DEFAULT_FLIP or name == "imagefolder":
        raise EvalError(
            f"--reference {spec!r} is not a data set split (e.g. mnist:test, cifar10:train), an "
            "existing folder of images or a samples .npz"
        )
    dataset, info = load_image_dataset(name, root, split or "train", download, image_size=h)
    _check_shape(info.shape, shape, spec)
    idx = _subset(len(dataset), n, seed)
    key = {"kind": "dataset", "name": name, "split": info.split, "dataset_size": len(dataset)}
    key.update(shape=list(shape), preprocessing="difflab.data.images default", subset_seed=seed)
    return Reference(
        f"{name}:{info.split}", key, shape, len(idx), lambda: dataset_images(dataset, idx)
    )


def _check_shape(got, want: tuple[int, int, int], spec: str) -> None:
    if tuple(got) != tuple(want):
        raise EvalError(
            f"reference {spec} holds images {tuple(got)} but the samples are {tuple(want)}; "
            "compare images of the same channels and size"
        )


def reference_features(ref: Reference, extractor, *, cache: bool = True) -> Tensor:
    """Features (ref.size, D) of the reference images: computed once per process and
    extractor, and read from the disk cache when its key matches."""
    memo = (extractor.name, extractor.weights_sha256)
    if memo not in ref.features:
        ref.features[memo] = _reference_features(ref, extractor, cache)
    return ref.features[memo]


def _reference_features(ref: Reference, extractor, cache: bool) -> Tensor:
    key = {**ref.key, "n": ref.size, "extractor": extractor.name}
    key["extractor_sha256"] = extractor.weights_sha256
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "reference" / f"{digest}.npz"
    sidecar = path.with_suffix(".json")
    hit = cache and path.is_file() and sidecar.is_file()
    if hit:
        meta = json.loads(sidecar.read_text())
        hit = meta.get("key") == key and meta.get("sha256") == sha256_file(path)
    if hasattr(extractor, "all_ranks"):  # sharded (evaluation/sharded.py): all ranks agree
        hit = extractor.all_ranks(hit)
    if hit:
        with np.load(path, allow_pickle=False) as f:
            return torch.from_numpy(f["features"])
    features = extractor.features(ref.load())  # raises on bad images: nothing is written
    if cache and getattr(extractor, "writes_cache", True):  # of many ranks, rank 0 alone
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, features=features.numpy())

        replace_atomically(path, write)
        text = json.dumps({"key": key, "sha256": sha256_file(path)}, indent=2) + "\n"
        replace_atomically(sidecar, lambda tmp: tmp.write_text(text))  # last: it vouches
    return features
