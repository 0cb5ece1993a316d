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
Forsyth 2020), so a score carries its count: `fid50k` (the published protocol), `fid5k`.

References (a data set split, a folder or an .npz), the reference-feature cache, `EvalError` and
`cache_dir` are in `references.py`; they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from difflab.evaluation.frechet import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
)
from difflab.evaluation.manifold import precision_recall
from difflab.evaluation.references import (
    EvalError,
    Reference,
    cache_dir,
    dataset_images,
    open_reference,
    reference_features,
)

__all__ = ["FULL_N", "HIGHER_IS_BETTER", "METRICS", "EvalError", "Reference", "cache_dir"]
__all__ += ["check_metrics", "dataset_images", "evaluate_images", "label", "open_reference"]
__all__ += ["reference_features"]

FULL_N = 50_000  # the sample count of published FID ("FID-50k")
PR_NEIGHBOURS = 3  # k of Kynkaanniemi et al. 2019


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
    """`name` with the sample count in thousands: fid50k (the published protocol), fid5k,
    fid0.5k; a label always says how many samples a score is from."""
    return f"{name}{n / 1000:g}k"


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
