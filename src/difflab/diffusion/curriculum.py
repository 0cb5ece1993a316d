"""Discretisation curricula of consistency training: how many noise levels N(k) the trajectory
is cut into at training step k, the EMA rate mu(k) of the target network, the Karras grid of
levels, the discretised log-normal over its intervals and ECT's r(t) by stage.

| code      | paper symbol | source                                                  |
|-----------|--------------|---------------------------------------------------------|
| k, K      | k, K         | training step and total steps                           |
| s0, s1    | s_0, s_1     | initial and final number of discretisation steps        |
| ct_steps  | N(k)         | Song et al. 2023, App. C (Table 3), note 1              |
| ct_decay  | mu(k)        | same: exp(s0 log mu0 / N(k))                            |
| ict_steps | N(k)         | Song & Dhariwal 2023, eq. 9, note 2                     |
| karras    | sigma_i      | Karras et al. 2022, eq. 5 (rho = 7), i = 1..N           |
| karras_at | sigma(p)     | the same grid at any position p in [0, 1]               |
| lognormal_weights | p(sigma_i) | Song & Dhariwal 2023, eq. 10: erf differences of ln sigma |
| ect_r     | r(t)         | Geng et al. 2024, eq. 10, note 3                        |
Note 1: N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1.
Note 2: N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)).
Note 3: r = t (1 - q^-(d + 1) (1 + k sigmoid(-b t))) at stage d, clamped at 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.errors import ConfigError


def check_curriculum(s0: int, s1: int) -> None:
    """A curriculum must increase: 1 <= s0 < s1 (ValueError naming the keys otherwise)."""
    if not 1 <= s0 < s1:
        raise ConfigError(
            f"the discretisation curriculum must increase: need 1 <= consistency.s0 < "
            f"consistency.s1, got s0 = {s0}, s1 = {s1}"
        )


def ct_steps(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) of consistency training (the square-root curriculum)."""
    inside = k / K * ((s1 + 1) ** 2 - s0**2) + s0**2
    return math.ceil(math.sqrt(inside) - 1) + 1


def ct_decay(k: int, K: int, s0: int, s1: int, mu0: float) -> float:
    """mu(k): the target network's EMA rate, rising with N(k)."""
    return math.exp(s0 * math.log(mu0) / ct_steps(k, K, s0, s1))


def ict_steps(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) of improved consistency training (doubling every K' steps, capped at s1)."""
    K_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / max(K_prime, 1)), s1) + 1


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(n,) increasing float64 levels sigma_1 = sigma_min .. sigma_n = sigma_max."""
    return karras_at(
        torch.arange(n, dtype=torch.float64) / max(n - 1, 1), sigma_min, sigma_max, rho
    )


def karras_at(p: Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The level at positions p in [0, 1] of the Karras grid (float64): linear in sigma^(1/rho)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + p.double() * (hi - lo)) ** rho


def lognormal_weights(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """(n - 1,) probabilities of the intervals [sigma_i, sigma_i+1]: the mass ln sigma ~
    N(p_mean, p_std^2) puts there, normalised to sum to 1."""
    z = (torch.log(sigmas) - p_mean) / (math.sqrt(2) * p_std)
    mass = torch.erf(z[1:]) - torch.erf(z[:-1])
    return mass / mass.sum()


def interval_index(u: Tensor, probs: Tensor) -> Tensor:
    """(B,) long indices i in 0..n-2 drawn by inverse CDF from uniforms u (B,) in [0, 1)."""
    cdf = torch.cumsum(probs, 0)
    return torch.searchsorted(cdf, u.double().contiguous(), right=True).clamp(max=len(probs) - 1)


def ect_r(t: Tensor, stage: int, q: float, k: float, b: float) -> Tensor:
    """ECT's r(t) at `stage` (0, 1, ...): r / t -> 1 as the stage grows; clamped at 0 (where r
    is 0 the target is the data itself: the denoising loss)."""
    ratio = 1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp_min(0.0)


def check_ect(q: float, stage_steps: int) -> None:
    if not q > 1 or stage_steps < 1:
        raise ConfigError(
            "ECT's curriculum must increase: need consistency.ect_q > 1 and "
            f"consistency.stage_steps >= 1, got {q} and {stage_steps}"
        )


def jittered_pair(
    u: Tensor, num_levels: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> tuple[Tensor, Tensor]:
    """(s_lo, s_hi) (B,) float64: one interval of the Karras grid of N levels moved by a
    uniform offset, p_hi = h + u (1 - h) and p_lo = p_hi - h in the grid's sigma^(1/rho)
    coordinate (h = 1 / (N - 1)), so f is trained at every noise level, not N of them."""
    h = 1.0 / (num_levels - 1)
    p_hi = h + u.double() * (1 - h)
    s_lo, s_hi = (karras_at(p, sigma_min, sigma_max, rho) for p in (p_hi - h, p_hi))
    return s_lo.clamp_min(sigma_min), s_hi
