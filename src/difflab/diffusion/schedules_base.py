"""What every schedule is: the `Schedule` interface, the variance-preserving base `VPSchedule` and
the discrete T-step table `DiscreteSchedule` that every VP schedule discretizes to.

A `Schedule` defines alpha(t) and sigma(t) on t in [0, t_max] (x_t = alpha(t) x0 + sigma(t) eps)
and from them the log-SNR, its inverse (by bisection unless a subclass has a closed form),
prior_std and q_sample; a `VPSchedule` is defined by alpha_bar = alpha^2 alone. The named
schedules (linear, cosine, sigmoid, vp, ve, edm) are in schedules.py, which re-exports all this.

Discrete-time models (DDPM, Ho et al. 2020) are trained on T steps; step i (1..T) sits at
t = i / T and the network sees that t. A `DiscreteSchedule` interpolates log alpha_bar linearly in
t between those grid points, which gives every discrete table a continuous view that is exact at
the grid and has alpha_bar(0) = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import ConfigError

# Closed forms are evaluated in float64: alpha_bar near 1 loses digits in float32.
_DTYPE = torch.float64


def _as_t(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=_DTYPE)


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """Reshape (B,) per-example values to broadcast against x of shape (B, ...)."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _derivative(fn, t: Tensor | float) -> Tensor:
    """d fn / dt elementwise at t, by autograd in float64 (fn acts elementwise)."""
    with torch.enable_grad():
        t = _as_t(t).detach().clone().requires_grad_(True)
        out = fn(t)
        if not out.requires_grad:  # a constant (alpha = 1 of VE schedules)
            return torch.zeros_like(t.detach())
        (grad,) = torch.autograd.grad(out.sum(), t)
    return grad.detach()


class Schedule:
    """x_t = alpha(t) x0 + sigma(t) eps on t in [0, t_max]; subclasses define alpha and sigma."""

    name = "schedule"
    variance_preserving = False
    # alpha = 1 (NCSN, EDM): the only family whose network input is rescaled to unit size. A
    # schedule that is neither (an affine flow path) is never treated as either.
    variance_exploding = False
    # The largest and smallest t a sampler should start from / a loss should draw.
    t_min = 0.0
    t_max = 1.0

    def alpha(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def log_snr(self, t: Tensor | float) -> Tensor:
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        """d alpha / dt at t (float64), by autograd through `alpha`; closed forms override."""
        return _derivative(self.alpha, t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """d sigma / dt at t (float64), by autograd through `sigma`; closed forms override."""
        return _derivative(self.sigma, t)

    def prior_std(self, t: Tensor | float) -> float:
        """Standard deviation of x_t for unit-variance data: where a sampler starts x_T."""
        return float((self.alpha(t) ** 2 + self.sigma(t) ** 2).sqrt())

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
        raise ConfigError(
            f"the {self.name} schedule is continuous-time only; set diffusion.num_steps=0"
        )

    def describe(self) -> dict:
        return {"name": self.name}


class VPSchedule(Schedule):
    """A variance-preserving schedule on t in [0, 1], defined by alpha_bar(t) = alpha(t)^2."""

    variance_preserving = True

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor | float) -> Tensor:
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor | float) -> Tensor:
        return (1.0 - self.alpha_bar(t)).clamp_min(0.0).sqrt()

    def log_snr(self, t: Tensor | float) -> Tensor:
        a = self.alpha_bar(t)
        return torch.log(a) - torch.log1p(-a)

    def prior_std(self, t: Tensor | float) -> float:
        return 1.0

    def discretize(self, num_steps: int, max_beta: float = 0.999) -> DiscreteSchedule:
        """The T-step table of this schedule: alpha_bar at t = i / T, betas clipped (Nichol)."""
        t = torch.arange(num_steps + 1, dtype=_DTYPE) / num_steps
        abar = self.alpha_bar(t)
        betas = (1.0 - abar[1:] / abar[:-1]).clamp(0.0, max_beta)
        return DiscreteSchedule(betas, name=f"{self.name}-discrete")


class DiscreteSchedule(VPSchedule):
    """A T-step table given as betas; step i (1..T) sits at t = i / T.

    Args:
        betas: (T,) values in (0, 1).
    """

    def __init__(self, betas: Tensor, name: str = "discrete"):
        betas = torch.as_tensor(betas, dtype=_DTYPE)
        if betas.dim() != 1 or len(betas) < 1:
            raise ConfigError("betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError(
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

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        """Exact inverse of the interpolated table: alpha_bar = sigmoid(lam), so the target
        log alpha_bar is -softplus(-lam); find its interval in the (decreasing) table and solve
        the linear interpolation there. Clamped to [0, 1]."""
        lam = _as_t(lam)
        target = -torch.nn.functional.softplus(-lam)
        table = self._table(lam.device)
        ascending = table.flip(0)  # log alpha_bar at t = 1, ..., 0
        pos = torch.searchsorted(ascending, target.contiguous()).clamp(1, self.num_steps)
        i = self.num_steps - pos  # table[i] >= target >= table[i + 1]
        lo, hi = table[i], table[i + 1]
        frac = ((target - lo) / (hi - lo)).clamp(0.0, 1.0)
        return ((i + frac) / self.num_steps).clamp(0.0, 1.0)

    def discretize(self, num_steps: int, max_beta: float = 0.999) -> DiscreteSchedule:
        if num_steps == self.num_steps:
            return self
        return super().discretize(num_steps, max_beta)

    def describe(self) -> dict:
        return {"name": self.name, "num_steps": self.num_steps}
