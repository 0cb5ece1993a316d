"""The evaluation protocol: which metric, in which feature space, against which reference, from
how many samples, and how the samples were drawn.

Metrics (`METRICS`):
    fid, kid, is, pr        in the features of the TF-ported Inception-v3 of published results
                            (`inception.py`, weights pinned by SHA-256)
    fd_judge, kid_judge,    in the features of a small classifier difflab trains on the data
    pr_judge, accuracy      set's training split (`classifier.py`): offline and in-domain;
                            accuracy = judged class of conditional samples vs their label
Every result row records the metric, its feature extractor and weights hash, the number of
generated and reference samples, the reference, and how the samples were drawn. FID-type scores
depend on the sample count (the estimator's bias falls like 1/n; Binkowski et al. 2018, Chong &
Forsyth 2020), so a score from fewer than 50,000 samples carries its count: `fid5k`.

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
from difflab.evaluation.frechet import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
)
from difflab.evaluation.manifold import precision_recall
from difflab.files import replace_atomically, sha256_file

__all__ = ["FULL_N", "HIGHER_IS_BETTER", "METRICS", "EvalError", "Reference", "cache_dir"]
__all__ += ["check_metrics", "dataset_images", "evaluate_images", "label", "open_reference"]
__all__ += ["reference_features"]

FULL_N = 50_000  # the sample count of published FID ("FID-50k")
PR_NEIGHBOURS = 3  # k of Kynkaanniemi et al. 2019


class EvalError(ValueError):
    """Bad evaluation input: the message names the problem and the fix."""


@dataclass(frozen=True)
class Metric:
    extractor: str  # "inception" or "judge"
    min_n: Callable[[int], int]  # fewest samples per set, given the feature dimension D
    needs_labels: bool = False


METRICS = {
    "fid": Metric("inception", lambda d: d + 1),
    "kid": Metric("inception", lambda d: 2),
    "is": Metric("inception", lambda d: 10),
    "pr": Metric("inception", lambda d: PR_NEIGHBOURS + 1),
    "fd_judge": Metric("judge", lambda d: d + 1),
    "kid_judge": Metric("judge", lambda d: 2),
    "pr_judge": Metric("judge", lambda d: PR_NEIGHBOURS + 1),
    "accuracy": Metric("judge", lambda d: 1, needs_labels=True),
}
# result names where higher is better (everything else: lower is better)
HIGHER_IS_BETTER = {
    "in_square",
    "is",
    "precision",
    "recall",
    "precision_judge",
    "recall_judge",
    "accuracy",
}


def label(name: str, n: int) -> str:
    """`name` for >= 50,000 samples, else the count in thousands appended: fid5k, fid0.5k."""
    return name if n >= FULL_N else f"{name}{n / 1000:g}k"


def cache_dir() -> Path:
    """$DIFFLAB_CACHE, else ~/.cache/difflab."""
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab")


def check_metrics(names: list[str], n: int, dims: dict[str, int], conditional: bool) -> None:
    """Refuse, before any sampling, metrics that do not exist or that `n` samples cannot
    estimate; `dims` maps extractor kind -> feature dimension."""
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    for name in names:
        metric = METRICS[name]
        d = dims.get(metric.extractor, 0)
        need = metric.min_n(d)
        if n < need:
            per_dim = need == d + 1  # a covariance: more samples than feature dimensions
            detail = f" for {d}-dim features" if per_dim else ""
            raise EvalError(
                f"{name} needs at least {need} samples{detail}, got {n}; use --n "
                f"{10 * d if per_dim else need} or more (published FID uses {FULL_N:,})"
            )
        if metric.needs_labels and not conditional:
            raise EvalError(
                f"{name} needs class labels: a class-conditional model or labelled .npz"
            )


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
    if cache and path.is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta.get("key") == key and meta.get("sha256") == sha256_file(path):
            with np.load(path, allow_pickle=False) as f:
                return torch.from_numpy(f["features"])
    features = extractor.features(ref.load())  # raises on bad images: nothing is written
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, features=features.numpy())

        replace_atomically(path, write)
        text = json.dumps({"key": key, "sha256": sha256_file(path)}, indent=2) + "\n"
        replace_atomically(sidecar, lambda tmp: tmp.write_text(text))  # last: it vouches
    return features


def _compare(metric: str, fake: Tensor, real: Tensor) -> list[tuple]:
    """(name, value, std) of one two-set metric on generated and real features (N, D)."""
    kind, suffix = metric.removesuffix("_judge"), "_judge" if metric.endswith("_judge") else ""
    if kind in ("fid", "fd"):
        return [
            (metric, frechet_distance(*feature_statistics(fake), *feature_statistics(real)), None)
        ]
    if kind == "kid":
        return [(metric, *kernel_inception_distance(fake, real))]
    precision, recall = precision_recall(fake, real, PR_NEIGHBOURS)
    return [(f"precision{suffix}", precision, None), (f"recall{suffix}", recall, None)]


ONE_SET = ("is", "accuracy")  # metrics of the samples alone: no reference


def evaluate_images(
    images: Tensor,
    labels: Tensor | None,
    metrics: list[str],
    reference: Reference,
    extractors: dict,
    provenance: dict,
    *,
    cache: bool = True,
) -> list[dict]:
    """Each metric of generated `images` (N, C, H, W) in [-1, 1] against `reference`.

    Args:
        labels: the classes the samples were drawn for (N,), or None.
        extractors: "inception" and/or "judge" -> an extractor (name, weights_sha256,
            feature_dim, features(), logits(); the judge also predict()).
        provenance: how the samples were drawn (sampler, steps, nfe, guidance, ema, seed, ...),
            copied into every row.
    Returns:
        one row per value: {"metric", "label", "value", ["std"], "extractor",
        "extractor_sha256", "n_generated", "n_reference", "reference", **provenance}.
    """
    n = len(images)
    dims = {kind: e.feature_dim for kind, e in extractors.items()}
    check_metrics(metrics, n, dims, labels is not None)
    rows = []
    for kind, extractor in extractors.items():
        wanted = {m for m in metrics if METRICS[m].extractor == kind}
        if not wanted:
            continue
        values = []
        two_set = sorted(wanted.difference(ONE_SET))
        if two_set:
            fake, real = (
                extractor.features(images),
                reference_features(reference, extractor, cache=cache),
            )
            check_metrics(two_set, len(real), dims, True)
            for metric in two_set:
                values += _compare(metric, fake, real)
        if "is" in wanted:
            from difflab.evaluation.inception import inception_score

            values.append(("is", *inception_score(extractor.logits(images))))
        if "accuracy" in wanted:
            hits = (extractor.predict(images) == labels.cpu()).double().mean()
            values.append(("accuracy", float(hits), None))
        for name, value, std in values:
            row = {"metric": name, "label": label(name, n), "value": value}
            if std is not None:
                row["std"] = std
            row.update(extractor=extractor.name, extractor_sha256=extractor.weights_sha256)
            # True only for the pinned Inception weights at pool3: comparable with papers
            row["extractor_standard"] = bool(getattr(extractor, "standard", False))
            one_set = name in ONE_SET
            row.update(n_generated=n, n_reference=None if one_set else reference.size)
            row["reference"] = None if one_set else reference.name
            rows.append({**row, **provenance})
    return rows
