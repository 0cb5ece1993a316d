"""Precision and recall of generated features against real ones, by k-nearest-neighbour manifolds.

Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing generative
models": each set's manifold is the union of balls around its points, of radius the distance to
the point's k-th nearest neighbour in its own set (the point itself excluded). Precision is the
share of generated points inside the real manifold (are samples realistic?), recall the share of
real points inside the generated manifold (is the data covered?). Equal to torch-fidelity's
`metric_prc.prc_features_to_metric` (k = its `prc_neighborhood`, `<=` at the ball's edge).

Distances go through torch.cdist in float64, in (batch_size, batch_size) blocks, so 50k x 50k
pairs never exist as one matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import ConfigError

__all__ = ["precision_recall"]


def _block_distances(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """Euclidean distances between rows of a (n, D) and b (m, D) -> (n, m); a_sq (n,), b_sq (m,)
    are the squared row norms.

    With more than 25 rows, torch.cdist takes |a|^2 + |b|^2 - 2 a.b by a matrix product, which
    leaves round-off where the true distance is 0 (a point and itself or its duplicate), about
    1e-8 |a| in float64 (1e-4 |a| in float32). The `<=` at a ball's edge would then be a coin toss
    for duplicates, so distances within the worst-case round-off of that formula,
    (3 D + 4) eps (|a|^2 + |b|^2) in the square (D eps per norm, (2 D + 4) eps for the product of
    D + 2 terms), are set to exactly 0: cdist cannot tell them from 0 anyway. In float64 and
    D = 2048 that is |a - b| below about 2e-6 |a|; distinct images are much further apart.
    """
    distances = torch.cdist(a, b)
    tolerance = a_sq[:, None] + b_sq  # (n, m), in place from here on: blocks can be big
    tolerance.mul_((3 * a.shape[1] + 4) * torch.finfo(a.dtype).eps).sqrt_()
    return distances.masked_fill_(distances <= tolerance, 0.0)


def _knn_radii(x: Tensor, x_sq: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row -> (N,)."""
    radii = []
    for rows, rows_sq in zip(x.split(batch_size), x_sq.split(batch_size), strict=True):
        # the k + 1 smallest distances so far, the point itself (distance 0) among them
        nearest = torch.full((len(rows), k + 1), torch.inf, dtype=x.dtype, device=x.device)
        for cols, cols_sq in zip(x.split(batch_size), x_sq.split(batch_size), strict=True):
            block = _block_distances(rows, cols, rows_sq, cols_sq)  # (b, c)
            block = block.topk(min(k + 1, len(cols)), dim=1, largest=False).values
            nearest = torch.cat([nearest, block], dim=1).topk(k + 1, dim=1, largest=False).values
        radii.append(nearest.max(dim=1).values)
    return torch.cat(radii)


def _share_covered(points: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> float:
    """Share of rows of points (N, D) within radii (M,) of some row of centres (M, D)."""
    points_sq, centres_sq = points.square().sum(dim=1), centres.square().sum(dim=1)
    covered = 0
    for rows, rows_sq in zip(points.split(batch_size), points_sq.split(batch_size), strict=True):
        inside = torch.zeros(len(rows), dtype=torch.bool, device=points.device)
        for cols, cols_sq, cols_radii in zip(
            centres.split(batch_size),
            centres_sq.split(batch_size),
            radii.split(batch_size),
            strict=True,
        ):
            block = _block_distances(rows, cols, rows_sq, cols_sq)  # (b, c)
            inside |= (block <= cols_radii).any(dim=1)
        covered += int(inside.sum())
    return covered / len(points)


def _check(generated: Tensor, real: Tensor, k: int, batch_size: int) -> None:
    for name, x in (("generated", generated), ("real", real)):
        if x.dim() != 2:
            raise ValueError(f"{name} features must be (N, D), got shape {tuple(x.shape)}")
    if generated.shape[1] != real.shape[1]:
        raise ConfigError(
            f"generated and real features must have one D, got {generated.shape[1]} and "
            f"{real.shape[1]}; extract both with the same network and layer"
        )
    if k < 1 or batch_size < 1:
        raise ConfigError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    for name, x in (("generated", generated), ("real", real)):
        if len(x) <= k:
            raise ConfigError(
                f"precision/recall with k={k} needs more than k samples per set (the k-th "
                f"nearest neighbour excludes the point itself), got {len(x)} {name}; pass at "
                f"least {k + 1} or lower k"
            )
        if not torch.isfinite(x).all():
            raise ConfigError(f"{name} features contain NaN or infinity")


def precision_recall(
    generated: Tensor, real: Tensor, k: int = 3, batch_size: int = 10000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, section 3, eqs. 1-2).

    A point y is in the manifold of set X when |y - x| <= |x - NN_k(x)| for some x in X, NN_k(x)
    being x's k-th nearest neighbour in X other than x itself (duplicates of x count, at 0).

    Args:
        generated: features of generated samples (N_gen, D), any float dtype and device.
        real: features of real samples (N_real, D).
        k: neighbourhood size; the paper and torch-fidelity use 3. Needs N_gen, N_real > k.
        batch_size: rows per block of distances; memory is O(batch_size^2) float64.
    Returns:
        (precision, recall), each in [0, 1]: the share of generated points in the real manifold
        and the share of real points in the generated manifold.
    Raises:
        ValueError: not (N, D) sets of one D, too few samples for k, or non-finite features.
    """
    _check(generated, real, k, batch_size)
    generated, real = generated.to(torch.float64), real.to(torch.float64)
    real_radii = _knn_radii(real, real.square().sum(dim=1), k, batch_size)  # (N_real,)
    generated_radii = _knn_radii(generated, generated.square().sum(dim=1), k, batch_size)
    precision = _share_covered(generated, real, real_radii, batch_size)
    recall = _share_covered(real, generated, generated_radii, batch_size)
    return precision, recall
