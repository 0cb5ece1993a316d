"""Distances between feature distributions: Frechet distance (FID-style) and KID.

Both compare feature vectors of real and generated images, e.g. from `classifier.Judge`. The
Frechet distance fits a Gaussian to each set (Heusel et al. 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium"); the kernel distance is an unbiased
MMD^2 estimate and needs no Gaussian assumption (Binkowski et al. 2018, "Demystifying MMD GANs").
Everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from difflab.errors import ConfigError

__all__ = ["feature_statistics", "frechet_distance", "kernel_inception_distance"]


def _sym_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix (D, D) by eigendecomposition; tiny negative
    eigenvalues (round-off) are clamped to 0 so the result stays real."""
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    return (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet (2-Wasserstein) distance squared between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Dowson & Landau 1982), the FID
    formula of Heusel et al. 2017 (eq. 6) when the statistics are of Inception features.

    The usual code (pytorch-fid) takes scipy.linalg.sqrtm(S1 @ S2), which is not symmetric, can
    return complex round-off and needs an eps * I retry when S1 is singular. We need only its
    trace: the principal root has eigenvalues sqrt(lambda_i(S1 S2)), so its trace is the sum of
    the square roots of the eigenvalues of S1 S2. Since AB and BA have the same
    eigenvalues, S1 S2 = sqrt(S1) [sqrt(S1) S2] has those of sqrt(S1) S2 sqrt(S1), which is
    symmetric PSD: its eigenvalues are real and >= 0, so eigvalsh gives the same trace with no
    complex parts, also for singular S1 (e.g. features with dead units).

    Args:
        mu1, mu2: means (D,).
        sigma1, sigma2: covariances (D, D), symmetric positive semi-definite.
    Returns:
        The squared distance (>= 0 up to round-off), as a float.
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    sigma1 = torch.as_tensor(sigma1, dtype=torch.float64)
    sigma2 = torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"need means (D,) and covariances (D, D) of one D, got {tuple(mu1.shape)}, "
            f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    root1 = _sym_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # symmetric in exact arithmetic; make eigvalsh's input so
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    mean_gap = (mu1 - mu2).square().sum()
    return float(mean_gap + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of features (N, D), in float64.

    Returns:
        (mu (D,), sigma (D, D)).
    Raises:
        ValueError when N < D + 1: the covariance of N samples has rank at most N - 1, so it
        could not be full rank, and the distance would reflect the sample count, not the data.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n, d = features.shape
    if n < d + 1:
        suggestion = math.ceil(10 * d / 1000) * 1000  # 10 D, rounded up to a round number
        raise ConfigError(
            f"{n} samples cannot estimate a {d} x {d} covariance; use at least {d + 1} "
            f"(preferably {10 * d}) samples, e.g. --n {suggestion}"
        )
    x = features.to(torch.float64)
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.T @ centred / (n - 1)
    return mu, sigma


def _polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x . y / D + 1)^3 for rows of x (N, D) and y (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 between samples x (m, D) and y (m, D) (Gretton et al. 2012, eq. 3): the
    within-set means leave out the diagonal k(x_i, x_i), so E[estimate] = MMD^2 exactly."""
    m = len(x)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kernel_inception_distance(
    f1: Tensor, f2: Tensor, num_subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """Kernel distance (KID; Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel
    k(x, y) = (x . y / D + 1)^3, averaged over random subsets as in their code.

    Unbiased, so it can be slightly negative when both sets come from one distribution.

    The subsets are drawn as in Binkowski et al.'s code, kept by torch-fidelity: one
    np.random.RandomState(seed) and, per subset, a draw without replacement from set 1 and then
    one from set 2. So with equal arguments (its `kid_subsets`, `kid_subset_size`, `rng_seed`,
    whose default is also 2020) the result equals torch-fidelity's `kid_features_to_metric`. Two
    differences: it computes in the features' dtype (float32 for Inception), we in float64;
    and it refuses subset_size > N, where we use min(subset_size, N1, N2), which equals its result
    for that smaller subset size.

    Args:
        f1: features (N1, D); f2: features (N2, D).
        num_subsets: number of subset pairs drawn (each set without replacement).
        subset_size: samples per subset; capped at min(N1, N2).
        seed: seeds the subset draws.
    Returns:
        (mean, std) of the subset estimates (std with ddof=0, as np.std: 0 for one subset).
    """
    if f1.dim() != 2 or f2.dim() != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(
            f"need two (N, D) feature sets of one D, got {tuple(f1.shape)} and {tuple(f2.shape)}"
        )
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ConfigError(f"KID needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    # numpy's legacy generator, not torch's: its choice() stream is what makes the subsets (and so
    # the numbers) those of the reference code
    rng = np.random.RandomState(seed)
    x, y = f1.to(torch.float64), f2.to(torch.float64)
    estimates = torch.empty(num_subsets, dtype=torch.float64)
    for i in range(num_subsets):
        rows_x = torch.as_tensor(rng.choice(len(x), m, replace=False), device=x.device)
        rows_y = torch.as_tensor(rng.choice(len(y), m, replace=False), device=y.device)
        estimates[i] = _mmd2_unbiased(x[rows_x], y[rows_y])  # subsets (m, D)
    return float(estimates.mean()), float(estimates.std(correction=0))
