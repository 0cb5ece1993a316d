"""Noise schedules: alpha(t), sigma(t), log-SNR and its inverse, discrete tables.

Every schedule here is variance preserving (VP): x_t = alpha(t) x0 + sigma(t) eps with
alpha^2 + sigma^2 = 1, and t runs over [0, 1] (t = 0 is clean data). A schedule is defined by
alpha_bar(t) = alpha(t)^2; the log-SNR is lam(t) = log(alpha^2 / sigma^2), decreasing in t.

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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Closed forms are evaluated in float64: alpha_bar near 1 loses digits in float32.
_DTYPE = torch.float64


def _as_t(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=_DTYPE)


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """Reshape (B,) per-example values to broadcast against x of shape (B, ...)."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class Schedule:
    """A variance-preserving noise schedule on t in [0, 1]."""

    name = "schedule"
    # The largest and smallest t a sampler should start from / a loss should draw.
    t_min = 0.0
    t_max = 1.0

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor | float) -> Tensor:
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor | float) -> Tensor:
        return (1.0 - self.alpha_bar(t)).clamp_min(0.0).sqrt()

    def log_snr(self, t: Tensor | float) -> Tensor:
        a = self.alpha_bar(t)
        return torch.log(a) - torch.log1p(-a)

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        """Inverse of `log_snr` by bisection (log-SNR is monotone decreasing in t)."""
        lam = _as_t(lam)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # still too clean: move right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x0) = N(alpha(t) x0, sigma(t)^2 I) with the given noise.

        Args:
            x0: clean data (B, ...).
            t: times (B,) in [0, 1].
            eps: standard normal noise, shape of x0.
        Returns:
            x_t, shape of x0.
        """
        return _broadcast(self.alpha(t), x0) * x0 + _broadcast(self.sigma(t), x0) * eps

    def discretize(self, num_steps: int, max_beta: float = 0.999) -> DiscreteSchedule:
        """The T-step table of this schedule: alpha_bar at t = i / T, betas clipped (Nichol)."""
        t = torch.arange(num_steps + 1, dtype=_DTYPE) / num_steps
        abar = self.alpha_bar(t)
        betas = (1.0 - abar[1:] / abar[:-1]).clamp(0.0, max_beta)
        return DiscreteSchedule(betas, name=f"{self.name}-discrete")

    def describe(self) -> dict:
        return {"name": self.name}


class DiscreteSchedule(Schedule):
    """A T-step table given as betas; step i (1..T) sits at t = i / T.

    Args:
        betas: (T,) values in (0, 1).
    """

    def __init__(self, betas: Tensor, name: str = "discrete"):
        betas = torch.as_tensor(betas, dtype=_DTYPE)
        if betas.dim() != 1 or len(betas) < 1:
            raise ValueError("betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"every beta must lie in (0, 1); got min {betas.min():.3g}, max {betas.max():.3g}"
            )
        self.name = name
        self.betas = betas
        self.num_steps = len(betas)
        # log alpha_bar at t = i / T for i = 0..T; i = 0 is clean data (alpha_bar = 1).
        self.log_abar = torch.cat(
            [torch.zeros(1, dtype=_DTYPE), torch.cumsum(torch.log1p(-betas), 0)]
        )
        self.t_min = 1.0 / self.num_steps

    def _table(self, device: torch.device) -> Tensor:
        if self.log_abar.device != device:  # keep one copy per device, made once
            self._tables = getattr(self, "_tables", {})
            if device not in self._tables:
                self._tables[device] = self.log_abar.to(device)
            return self._tables[device]
        return self.log_abar

    @property
    def alphas_cumprod(self) -> Tensor:
        """(T,) bar-alpha_i for i = 1..T, as in DDPM's table."""
        return self.log_abar[1:].exp()

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        t = _as_t(t).clamp(0.0, 1.0)
        table = self._table(t.device)
        pos = t * self.num_steps
        i = pos.floor().clamp(max=self.num_steps - 1).long()
        frac = pos - i
        log_abar = table[i] * (1 - frac) + table[i + 1] * frac
        return log_abar.exp()

    def discretize(self, num_steps: int, max_beta: float = 0.999) -> DiscreteSchedule:
        if num_steps == self.num_steps:
            return self
        return super().discretize(num_steps, max_beta)

    def describe(self) -> dict:
        return {"name": self.name, "num_steps": self.num_steps}


def linear(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiscreteSchedule:
    """DDPM's linear betas (Ho et al. 2020, Sec. 4): beta_1 = 1e-4 ... beta_T = 0.02, T = 1000."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (0 < beta_start <= beta_end < 1):
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}; "
            "DDPM uses beta_start=1e-4, beta_end=0.02"
        )
    return DiscreteSchedule(torch.linspace(beta_start, beta_end, num_steps, dtype=_DTYPE), "linear")


class CosineSchedule(Schedule):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2).

    Nichol & Dhariwal 2021, eq. 17.

    alpha_bar(1) = 0 exactly, so t is capped at `t_max` where alpha_bar is still >= `min_alpha_bar`.
    """

    name = "cosine"

    def __init__(self, s: float = 0.008, min_alpha_bar: float = 1e-8):
        if s < 0:
            raise ValueError(f"cosine offset s must be >= 0, got {s}")
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


class SigmoidSchedule(Schedule):
    """alpha_bar(t) from a shifted sigmoid (Jabri et al. 2022; Chen 2023, Algorithm 1).

    alpha_bar(t) = (v_end - v(t)) / (v_end - v_start),
    v(t) = sigmoid((start + t (end - start)) / tau).
    """

    name = "sigmoid"

    def __init__(
        self, start: float = -3.0, end: float = 3.0, tau: float = 1.0, min_alpha_bar: float = 1e-8
    ):
        if not start < end or tau <= 0:
            raise ValueError(
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
