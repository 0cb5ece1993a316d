"""What the network's raw output means, and the denoiser that hides it from everyone else.

The network contract is `net(x_t, t, y=None) -> raw` with raw shaped like x_t. Only this module
knows whether raw is eps, x0 or v. With x_t = alpha x0 + sigma eps (VP, alpha^2 + sigma^2 = 1):

| kind | raw means                      | x0_hat                    | eps_hat                  |
|------|--------------------------------|---------------------------|--------------------------|
| eps  | eps (Ho et al. 2020)           | (x_t - sigma eps) / alpha | raw                      |
| x0   | x0                             | raw                       | (x_t - alpha x0) / sigma |
| v    | alpha eps - sigma x0 (note 1)  | alpha x_t - sigma v       | sigma x_t + alpha v      |
| edm  | F of EDM (note 2)              | c_skip x~ + c_out F       | (x_t - alpha x0) / sigma |
| velocity | alpha' x0 + sigma' eps (3)| (sigma' x_t - sigma u) / D | (alpha u - alpha' x_t) / D |
Note 1: Salimans & Ho 2022, Sec. 4; v needs a variance-preserving schedule.
Note 2: Karras et al. 2022, eq. 7 and Table 1 ("preconditioning"), on any schedule through the
scaled variables x~ = x_t / alpha, s = sigma / alpha (s is EDM's sigma) and sigma_data = sd:

| code    | EDM symbol   | value                                   |
|---------|--------------|-----------------------------------------|
| c_skip  | c_skip(s)    | sd^2 / (s^2 + sd^2)                     |
| c_out   | c_out(s)     | s sd / sqrt(s^2 + sd^2)                 |
| c_in    | c_in(s)      | 1 / sqrt(s^2 + sd^2), applied to x~     |
| c_noise | c_noise(s)   | log(s) / 4: the time input the net sees |

Note 3: flow matching's conditional velocity d x_t / dt (Lipman et al. 2023, eq. 20; Liu et al.
2023, eq. 1), alpha' = d alpha / dt, sigma' = d sigma / dt and D = alpha sigma' - sigma alpha'
(> 0 on every path whose SNR decreases); on the rectified path (1 - t, t) u = eps - x0, D = 1,
x0 = x_t - t u and eps = x_t + (1 - t) u, finite at t = 0 and t = 1 alike. Defined on every
schedule with derivatives (all of them here).

Every other kind sees x_t and t unchanged, except that on a variance-exploding schedule x_t is
divided by sqrt(alpha^2 + sigma^2) (x_t's standard deviation for unit-variance data) so the
network's input stays of unit size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difflab.diffusion.schedules import Schedule, _broadcast
from difflab.errors import ConfigError

PREDICTION_KINDS = ("eps", "x0", "v", "edm", "velocity")
# (d alpha / dt, d sigma / dt) broadcast against x_t: what the velocity kind needs besides alpha
Rates = "tuple[Tensor, Tensor] | None"


def check_kind(kind: str) -> str:
    if kind not in PREDICTION_KINDS:
        raise ConfigError(
            f"unknown prediction kind {kind!r}; choose one of {', '.join(PREDICTION_KINDS)}"
        )
    return kind


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - alpha * x0) / sigma


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - sigma * eps) / alpha


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * eps - sigma * x0


def velocity_from_x0_eps(x0: Tensor, eps: Tensor, rates: tuple[Tensor, Tensor]) -> Tensor:
    """u = alpha' x0 + sigma' eps (note 3)."""
    d_alpha, d_sigma = rates
    return d_alpha * x0 + d_sigma * eps


def x0_eps_from_velocity(
    x_t: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor, rates: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """(x0, eps) solving x_t = alpha x0 + sigma eps and u = alpha' x0 + sigma' eps (note 3)."""
    d_alpha, d_sigma = rates
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x_t - sigma * u) / det, (alpha * u - d_alpha * x_t) / det


def _need_rates(rates) -> tuple[Tensor, Tensor]:
    if rates is None:
        raise ValueError("the velocity kind needs the schedule's (d alpha/dt, d sigma/dt)")
    return rates


def edm_coefficients(
    alpha: Tensor, sigma: Tensor, sigma_data: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM at s = sigma / alpha; c_in applies to x_t / alpha."""
    s = sigma / alpha
    norm = torch.sqrt(s**2 + sigma_data**2)
    return sigma_data**2 / norm**2, s * sigma_data / norm, 1 / norm, torch.log(s) / 4


def split_raw(
    raw: Tensor,
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    kind: str,
    sigma_data: float = 0.5,
    rates: Rates = None,
) -> tuple[Tensor, Tensor]:
    """Turn raw network output into (x0_hat, eps_hat). alpha, sigma (and the velocity kind's
    rates) broadcast against x_t."""
    if kind == "edm":
        c_skip, c_out, _, _ = edm_coefficients(alpha, sigma, sigma_data)
        x0_hat = c_skip * x_t / alpha + c_out * raw
        return x0_hat, eps_from_x0(x_t, x0_hat, alpha, sigma)
    if kind == "eps":
        return x0_from_eps(x_t, raw, alpha, sigma), raw
    if kind == "x0":
        return raw, eps_from_x0(x_t, raw, alpha, sigma)
    if kind == "v":
        return alpha * x_t - sigma * raw, sigma * x_t + alpha * raw
    if kind == "velocity":
        return x0_eps_from_velocity(x_t, raw, alpha, sigma, _need_rates(rates))
    raise ValueError(f"unknown prediction kind {kind!r}")


def target_of(
    kind: str,
    x0: Tensor,
    eps: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    sigma_data: float = 0.5,
    rates: Rates = None,
) -> Tensor:
    """The quantity a `kind` network should output for this (x0, eps)."""
    if kind == "edm":  # F = (x0 - c_skip x~) / c_out with x~ = x0 + s eps
        c_skip, c_out, _, _ = edm_coefficients(alpha, sigma, sigma_data)
        return ((1 - c_skip) * x0 - c_skip * (sigma / alpha) * eps) / c_out
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if kind == "velocity":
        return velocity_from_x0_eps(x0, eps, _need_rates(rates))
    raise ValueError(f"unknown prediction kind {kind!r}")


def v_refusal(schedule: Schedule, what: str) -> str:
    """Why v (Salimans & Ho) means nothing on a schedule that is not variance preserving."""
    family = "variance exploding" if schedule.variance_exploding else "an affine flow path"
    fix = "eps, x0, edm or velocity"
    return (
        f"v-{what} is defined for variance-preserving schedules; the {schedule.name} schedule "
        f"is {family}: use diffusion.{'target' if what == 'space loss' else what}={fix}"
    )


# A denoiser maps (x_t (B, ...), t (B,), y (B,) or None) to (x0_hat, eps_hat), both shaped like x_t.
DenoiserFn = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]


class Denoiser:
    """Wraps `net(x_t, t, y)` and a schedule into `(x0_hat, eps_hat) = denoiser(x_t, t, y)`.

    Args:
        net: the network; never modified.
        schedule: gives alpha(t), sigma(t).
        kind: what the network predicts: "eps", "x0", "v", "edm" or "velocity" (module table).
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] (and recompute eps_hat) when set; images in
            [-1, 1] use 1.0. None leaves x0_hat alone.
        sigma_data: the data's standard deviation, for "edm" (0.5 in EDM).
        step_grid: a few-step model whose net reads a second time t2 (MeanFlow's t - r, a
            shortcut's d): "meanflow", or the shortcut's finest grid as "shortcut:N"; "" = none.
    """

    def __init__(
        self,
        net: Callable,
        schedule: Schedule,
        kind: str = "eps",
        clip_x0: float | None = None,
        sigma_data: float = 0.5,
        step_grid: str = "",
    ):
        self.net = net
        self.step_grid = step_grid
        self.schedule = schedule
        self.kind = check_kind(kind)
        if kind == "v" and not schedule.variance_preserving:
            raise ConfigError(v_refusal(schedule, "prediction"))
        if sigma_data <= 0:
            raise ConfigError(f"sigma_data must be > 0, got {sigma_data}")
        self.clip_x0 = clip_x0
        self.sigma_data = sigma_data

    def with_net(self, net: Callable) -> Denoiser:
        """The same denoiser around another network (EMA weights, a guided wrapper)."""
        return Denoiser(
            net, self.schedule, self.kind, self.clip_x0, self.sigma_data, self.step_grid
        )

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return _broadcast(self.schedule.alpha(t), like), _broadcast(self.schedule.sigma(t), like)

    def rates(self, t: Tensor, like: Tensor) -> Rates:
        """(d alpha / dt, d sigma / dt) broadcast against `like` when the kind needs them."""
        if self.kind != "velocity":
            return None
        s = self.schedule
        return _broadcast(s.d_alpha(t), like), _broadcast(s.d_sigma(t), like)

    def raw(
        self,
        x_t: Tensor,
        t: Tensor,
        y: Tensor | None,
        alpha: Tensor,
        sigma: Tensor,
        t2: Tensor | None = None,
    ) -> Tensor:
        """The network's raw output at (x_t, t): what it sees is set by the kind (module note);
        t2, the second time, goes to the net beside t when given (few-step models)."""
        if t2 is not None:
            return self.net(x_t, t, y, t2=t2)
        if self.kind == "edm":
            _, _, c_in, c_noise = edm_coefficients(alpha, sigma, self.sigma_data)
            return self.net(c_in * x_t / alpha, c_noise.reshape(-1).to(t.dtype), y)
        if self.schedule.variance_exploding:  # never an affine flow path: its nets see x_t
            x_t = x_t * torch.rsqrt(alpha**2 + sigma**2)
        return self.net(x_t, t, y)

    def split(
        self, raw: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, rates: Rates = None
    ) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from raw output, with `clip_x0` applied."""
        x0_hat, eps_hat = split_raw(
            raw.to(x_t.dtype), x_t, alpha, sigma, self.kind, self.sigma_data, rates
        )
        if self.clip_x0 is not None:
            x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
            eps_hat = eps_from_x0(x_t, x0_hat, alpha, sigma.clamp_min(1e-12))
        return x0_hat, eps_hat

    def target(
        self, kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, rates: Rates = None
    ) -> Tensor:
        """What a `kind` output should be for this (x0, eps), with this denoiser's sigma_data."""
        return target_of(kind, x0, eps, alpha, sigma, self.sigma_data, rates)

    def __call__(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, *, t2: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        alpha, sigma = self.alpha_sigma(t.detach(), x_t)
        if t2 is not None:
            t2 = torch.as_tensor(t2, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        raw = self.raw(x_t, t, y, alpha, sigma, t2)
        return self.split(raw, x_t, alpha, sigma, self.rates(t.detach(), x_t))
