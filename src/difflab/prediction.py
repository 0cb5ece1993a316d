"""What the network's raw output means, and the denoiser that hides it from everyone else.

The network contract is `net(x_t, t, y=None) -> raw` with raw shaped like x_t. Only this module
knows whether raw is eps, x0 or v. With x_t = alpha x0 + sigma eps (VP, alpha^2 + sigma^2 = 1):

| kind | raw means                      | x0_hat                    | eps_hat                  |
|------|--------------------------------|---------------------------|--------------------------|
| eps  | eps (Ho et al. 2020)           | (x_t - sigma eps) / alpha | raw                      |
| x0   | x0                             | raw                       | (x_t - alpha x0) / sigma |
| v    | alpha eps - sigma x0 (note 1)  | alpha x_t - sigma v       | sigma x_t + alpha v      |
Note 1: Salimans & Ho 2022, Sec. 4.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difflab.schedules import Schedule, _broadcast

PREDICTION_KINDS = ("eps", "x0", "v")


def check_kind(kind: str) -> str:
    if kind not in PREDICTION_KINDS:
        raise ValueError(
            f"unknown prediction kind {kind!r}; choose one of {', '.join(PREDICTION_KINDS)}"
        )
    return kind


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - alpha * x0) / sigma


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - sigma * eps) / alpha


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * eps - sigma * x0


def split_raw(
    raw: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    """Turn raw network output into (x0_hat, eps_hat). alpha, sigma broadcast against x_t."""
    if kind == "eps":
        return x0_from_eps(x_t, raw, alpha, sigma), raw
    if kind == "x0":
        return raw, eps_from_x0(x_t, raw, alpha, sigma)
    if kind == "v":
        return alpha * x_t - sigma * raw, sigma * x_t + alpha * raw
    raise ValueError(f"unknown prediction kind {kind!r}")


def target_of(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The quantity a `kind` network should output for this (x0, eps)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    raise ValueError(f"unknown prediction kind {kind!r}")


# A denoiser maps (x_t (B, ...), t (B,), y (B,) or None) to (x0_hat, eps_hat), both shaped like x_t.
DenoiserFn = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]


class Denoiser:
    """Wraps `net(x_t, t, y)` and a schedule into `(x0_hat, eps_hat) = denoiser(x_t, t, y)`.

    Args:
        net: the network; never modified.
        schedule: gives alpha(t), sigma(t).
        kind: what the network predicts: "eps", "x0" or "v".
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] (and recompute eps_hat) when set; images in
            [-1, 1] use 1.0. None leaves x0_hat alone.
    """

    def __init__(
        self, net: Callable, schedule: Schedule, kind: str = "eps", clip_x0: float | None = None
    ):
        self.net = net
        self.schedule = schedule
        self.kind = check_kind(kind)
        self.clip_x0 = clip_x0

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return _broadcast(self.schedule.alpha(t), like), _broadcast(self.schedule.sigma(t), like)

    def split(
        self, raw: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from raw output, with `clip_x0` applied."""
        x0_hat, eps_hat = split_raw(raw.to(x_t.dtype), x_t, alpha, sigma, self.kind)
        if self.clip_x0 is not None:
            x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
            eps_hat = eps_from_x0(x_t, x0_hat, alpha, sigma.clamp_min(1e-12))
        return x0_hat, eps_hat

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        raw = self.net(x_t, t, y)
        alpha, sigma = self.alpha_sigma(t.detach(), x_t)
        return self.split(raw, x_t, alpha, sigma)
