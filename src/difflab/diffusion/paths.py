"""Affine flow-matching paths: x_t = alpha(t) x0 + sigma(t) eps with t = 0 data, t = 1 noise,
and d alpha/dt, d sigma/dt in closed form (the velocity prediction kind needs them).

| code        | paper symbol                                                     |
|-------------|------------------------------------------------------------------|
| alpha(t)    | alpha_t (Lipman et al. 2023, eq. 19 with sigma_min = 0: 1 - t)   |
| sigma(t)    | sigma_t (t on the rectified path)                                 |
| d_alpha(t)  | alpha_t' = d alpha / dt                                          |
| d_sigma(t)  | sigma_t' = d sigma / dt                                          |
| velocity    | u_t = alpha_t' x0 + sigma_t' eps (eps - x0 on the rectified path) |

The endpoint t = 1 (alpha = 0, log-SNR = -inf) is excluded: samplers start at t_max = 1 - t_gap
(default 1e-3, where every log-SNR sampler and grid is finite), and losses draw t in [0, t_max].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.diffusion.schedules_base import Schedule, _as_t
from difflab.errors import ConfigError


class AffineSchedule(Schedule):
    """A flow-matching path x_t = alpha(t) x0 + sigma(t) eps, t in [0, 1], with alpha(0) = 1,
    sigma(0) = 0 and t = 1 pure noise, given with its derivatives (Lipman et al. 2023, Sec. 4;
    Albergo & Vanden-Eijnden 2023). Never VE, so x_t is never rescaled to unit size; VP only
    where alpha^2 + sigma^2 = 1 (trig), elsewhere v (Salimans & Ho) is refused. The velocity
    prediction kind uses d alpha/dt and d sigma/dt.

    alpha(1) = 0 makes sigma / alpha infinite at t = 1, so samplers start at t_max = 1 - t_gap
    (lam = log-SNR finite there) from x_T ~ N(0, alpha^2 + sigma^2): the data left at t_max,
    alpha(t_max) x0, is below 1e-3 of the data's scale for the default t_gap.
    """

    name = "affine"
    t_min = 0.0

    def __init__(self, t_gap: float = 1e-3):
        if not 0 < t_gap < 0.5:
            raise ConfigError(
                f"the flow path's t_gap (t_max = 1 - t_gap) must be in (0, 0.5), got {t_gap}"
            )
        self.t_gap = t_gap
        self.t_max = 1.0 - t_gap

    def describe(self) -> dict:
        return {"name": self.name, "t_gap": self.t_gap}


class RectifiedFlowSchedule(AffineSchedule):
    """The rectified-flow / linear interpolation path alpha(t) = 1 - t, sigma(t) = t (Liu et al.
    2023, eq. 1; Lipman et al. 2023's OT path with sigma_min = 0; SD3, Esser et al. 2024, eq. 2).
    Its velocity is d x_t / dt = eps - x0 and lam(t) = 2 log((1 - t) / t)."""

    name = "rectified"

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - _as_t(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_t(t).clone()

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return -torch.ones_like(_as_t(t))

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_t(t))

    def log_snr(self, t: Tensor | float) -> Tensor:
        t = _as_t(t)
        return 2 * (torch.log1p(-t) - torch.log(t))

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        # (1 - t) / t = exp(lam / 2)  =>  t = sigmoid(-lam / 2)
        return torch.sigmoid(-0.5 * _as_t(lam))


class TrigFlowSchedule(AffineSchedule):
    """The trigonometric path alpha(t) = cos(pi t / 2), sigma(t) = sin(pi t / 2) (Albergo &
    Vanden-Eijnden 2023, Sec. 3's spherical interpolant): an affine path that is also variance
    preserving (so v and velocity are both defined on it)."""

    name = "trig"
    variance_preserving = True

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.cos(_as_t(t) * (math.pi / 2))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sin(_as_t(t) * (math.pi / 2))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return -(math.pi / 2) * torch.sin(_as_t(t) * (math.pi / 2))

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return (math.pi / 2) * torch.cos(_as_t(t) * (math.pi / 2))

    def prior_std(self, t: Tensor | float) -> float:
        return 1.0

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        # tan(pi t / 2) = sigma / alpha = exp(-lam / 2)
        return torch.atan(torch.exp(-0.5 * _as_t(lam))) * (2 / math.pi)
