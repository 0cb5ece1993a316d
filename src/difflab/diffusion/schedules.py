"""Noise schedules: alpha(t), sigma(t), log-SNR and its inverse, discrete tables.

A schedule says how data is noised: x_t = alpha(t) x0 + sigma(t) eps, with t = 0 clean data and
the log-SNR lam(t) = log(alpha^2 / sigma^2) decreasing in t. Samplers and losses use only alpha,
sigma, lam and its inverse, so they run on every schedule here.

- Variance preserving (VP, alpha^2 + sigma^2 = 1, t in [0, 1]), defined by alpha_bar = alpha^2:
  the discrete DDPM table, cosine, sigmoid, and the continuous VP SDE of Song et al. 2021.
- Variance exploding (VE, alpha = 1): the NCSN geometric sigma(t) of Song et al. 2021 (t in
  [0, 1]) and EDM's schedule where the time is sigma itself (Karras et al. 2022, t = sigma in
  [0, sigma_max]). Both have sigma(0) = 0, so a sampler's last step lands on clean data.
- Affine flow paths (neither, paths.py): rectified flow alpha = 1 - t, sigma = t, and the
  trigonometric path; they expose d alpha/dt and d sigma/dt for the velocity prediction kind.

Discrete-time models (DDPM, Ho et al. 2020) are trained on T steps; step i (1..T) sits at
t = i / T and the network sees that t. A `DiscreteSchedule` interpolates log alpha_bar linearly in
t between those grid points, which gives every discrete table a continuous view that is exact at
the grid and has alpha_bar(0) = 1.

| code            | paper symbol                          |
|-----------------|---------------------------------------|
| alpha_bar(t)    | bar-alpha_t (DDPM), alpha_t^2         |
| alpha(t)        | sqrt(bar-alpha_t)                     |
| sigma(t)        | sqrt(1 - bar-alpha_t)                 |
| log_snr(t)      | lambda_t = log(alpha_t^2 / sigma_t^2) |
| betas           | beta_i, i = 1..T                      |

The interface (`Schedule`, `VPSchedule`) and the discrete table (`DiscreteSchedule`) are in
schedules_base.py and re-exported here; this file holds the named schedules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.diffusion.paths import (  # noqa: F401  (re-exported: every schedule is here)
    AffineSchedule,
    RectifiedFlowSchedule,
    TrigFlowSchedule,
)
from difflab.diffusion.schedules_base import (  # noqa: F401  (re-exported: they lived here)
    _DTYPE,
    DiscreteSchedule,
    Schedule,
    VPSchedule,
    _as_t,
    _broadcast,
)
from difflab.errors import ConfigError


def linear(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiscreteSchedule:
    """DDPM's linear betas (Ho et al. 2020, Sec. 4): beta_1 = 1e-4 ... beta_T = 0.02, T = 1000."""
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if not (0 < beta_start <= beta_end < 1):
        raise ConfigError(
            f"need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}; "
            "DDPM uses beta_start=1e-4, beta_end=0.02"
        )
    return DiscreteSchedule(torch.linspace(beta_start, beta_end, num_steps, dtype=_DTYPE), "linear")


class CosineSchedule(VPSchedule):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2).

    Nichol & Dhariwal 2021, eq. 17.

    alpha_bar(1) = 0 exactly, so t is capped at `t_max` where alpha_bar is still >= `min_alpha_bar`.
    """

    name = "cosine"

    def __init__(self, s: float = 0.008, min_alpha_bar: float = 1e-8):
        if s < 0:
            raise ConfigError(f"cosine offset s must be >= 0, got {s}")
        self.s = s
        self.min_alpha_bar = min_alpha_bar
        self._f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
        self.t_max = float(self._t_from_abar(torch.tensor(min_alpha_bar, dtype=_DTYPE)))

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        t = _as_t(t)
        f = torch.cos((t + self.s) / (1 + self.s) * math.pi / 2) ** 2
        return (f / self._f0).clamp(self.min_alpha_bar, 1.0)

    def _t_from_abar(self, abar: Tensor) -> Tensor:
        angle = torch.arccos((abar * self._f0).sqrt())
        return angle * 2 / math.pi * (1 + self.s) - self.s

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        return self._t_from_abar(torch.sigmoid(_as_t(lam)))

    def describe(self) -> dict:
        return {"name": self.name, "s": self.s}


class SigmoidSchedule(VPSchedule):
    """alpha_bar(t) from a shifted sigmoid (Jabri et al. 2022; Chen 2023, Algorithm 1).

    alpha_bar(t) = (v_end - v(t)) / (v_end - v_start),
    v(t) = sigmoid((start + t (end - start)) / tau).
    """

    name = "sigmoid"

    def __init__(
        self, start: float = -3.0, end: float = 3.0, tau: float = 1.0, min_alpha_bar: float = 1e-8
    ):
        if not start < end or tau <= 0:
            raise ConfigError(
                f"sigmoid schedule needs start < end and tau > 0, got {start}, {end}, {tau}"
            )
        self.start, self.end, self.tau = start, end, tau
        self.min_alpha_bar = min_alpha_bar
        self._v_start = torch.sigmoid(torch.tensor(start / tau, dtype=_DTYPE))
        self._v_end = torch.sigmoid(torch.tensor(end / tau, dtype=_DTYPE))
        self.t_max = float(self._t_from_abar(torch.tensor(min_alpha_bar, dtype=_DTYPE)))

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        v = torch.sigmoid((self.start + _as_t(t) * (self.end - self.start)) / self.tau)
        abar = (self._v_end - v) / (self._v_end - self._v_start)
        return abar.clamp(self.min_alpha_bar, 1.0)

    def _t_from_abar(self, abar: Tensor) -> Tensor:
        v = self._v_end - abar * (self._v_end - self._v_start)
        return (torch.logit(v) * self.tau - self.start) / (self.end - self.start)

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        return self._t_from_abar(torch.sigmoid(_as_t(lam)))

    def describe(self) -> dict:
        return {"name": self.name, "start": self.start, "end": self.end, "tau": self.tau}


class VPSDESchedule(VPSchedule):
    """The continuous VP SDE with linear beta(t) (Song et al. 2021, eq. 11; DDPM's limit).

    alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)); beta_min = 0.1 and
    beta_max = 20 match DDPM's table (beta_i = beta(i / T) / T for T = 1000).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        if not 0 <= beta_min < beta_max:
            raise ConfigError(f"need 0 <= beta_min < beta_max, got {beta_min} and {beta_max}")
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min

    def _integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        return torch.exp(-self._integral(_as_t(t)))

    def log_snr(self, t: Tensor | float) -> Tensor:
        b = self._integral(_as_t(t))  # lam = -log(e^b - 1), computed without overflow
        return -(b + torch.log(-torch.expm1(-b)))

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        b = torch.nn.functional.softplus(-_as_t(lam))  # integral(t) = log(1 + e^-lam)
        a, c = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        return 2 * b / (c + torch.sqrt(c**2 + 4 * a * b))  # the positive root, stable

    def describe(self) -> dict:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


class _ExplodingSchedule(Schedule):
    """alpha = 1; subclasses define sigma(t) > 0 for t > 0 and its inverse; sigma(0) = 0."""

    variance_exploding = True

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_t(t))

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _as_t(t)
        return torch.where(t > 0, self._sigma(t.clamp_min(self.t_min)), torch.zeros_like(t))

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -2 * torch.log(self.sigma(t))

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        t = self._t_of_sigma(torch.exp(-0.5 * _as_t(lam)))
        return t.clamp(self.t_min, self.t_max)


class VESchedule(_ExplodingSchedule):
    """NCSN's variance-exploding SDE (Song et al. 2021, eq. 9; Song & Ermon 2020):
    sigma(t) = sigma_min (sigma_max / sigma_min)^t for t in (0, 1].

    sigma_max should be about the largest distance between training points (Song & Ermon 2020,
    Technique 1): 50 for CIFAR-10, a few units for 2-D toy data.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max, self.t_min = sigma_min, sigma_max, t_min
        self._log_ratio = math.log(sigma_max / sigma_min)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        return torch.log(sigma / self.sigma_min) / self._log_ratio

    def describe(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDMSchedule(_ExplodingSchedule):
    """EDM's schedule (Karras et al. 2022, Table 1): sigma(t) = t, t in [sigma_min, sigma_max].

    Time is the noise level itself, so samplers step directly in sigma (the Karras grid).
    """

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = sigma_min, sigma_max

    def _sigma(self, t: Tensor) -> Tensor:
        return t

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        return sigma

    def describe(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
