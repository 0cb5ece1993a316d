"""Distances between 2-D point clouds."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from difflab.data.toy2d import TOY2D, in_checkerboard, sample_toy2d
from difflab.errors import ConfigError

REFERENCE_SEED = 12345  # fresh true samples for metrics come from this seed, never from training


def sliced_wasserstein2(x: Tensor, y: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between point clouds x (N, D) and y (M, D).

    SW2 = sqrt(E_theta W2^2(theta . x, theta . y)) over random unit directions theta (Bonneel et
    al. 2015). Each 1-D W2 compares sorted projections; clouds of different sizes are compared at
    min(N, M) evenly spaced quantiles.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"need two (N, D) clouds of the same D, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (x.double() @ theta).sort(dim=0).values  # (N, P)
    py = (y.double() @ theta).sort(dim=0).values
    n = min(len(px), len(py))
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    px = px[(q * len(px)).long()]
    py = py[(q * len(py)).long()]
    return float(((px - py) ** 2).mean().sqrt())


def in_square_fraction(x: Tensor) -> float:
    """Fraction of points of x (N, 2) inside a kept square of the checkerboard."""
    return float(in_checkerboard(x).double().mean())


def evaluate_toy(samples: np.ndarray, dataset: str) -> dict:
    """Sliced W2 to fresh true samples of the same size, its floor (true vs true), and for the
    checkerboard the fraction of samples inside a correct square."""
    if dataset not in TOY2D:
        raise ConfigError(f"unknown 2-D dataset {dataset!r}; choose one of {', '.join(TOY2D)}")
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ConfigError(f"2-D metrics need samples of shape (N, 2), got {samples.shape}")
    if not np.isfinite(samples).all():
        raise ConfigError("the samples contain NaN or infinity; the model or sampler diverged")
    x = torch.from_numpy(np.asarray(samples, dtype=np.float32))
    g = torch.Generator().manual_seed(REFERENCE_SEED)
    ref, ref2 = sample_toy2d(dataset, len(x), g), sample_toy2d(dataset, len(x), g)
    result = {
        "dataset": dataset,
        "n": len(x),
        "sliced_w2": sliced_wasserstein2(x, ref),
        "sliced_w2_floor": sliced_wasserstein2(ref2, ref),
    }
    if dataset == "checkerboard":
        result["in_square"] = in_square_fraction(x)
        result["in_square_true"] = in_square_fraction(ref)
    return result
