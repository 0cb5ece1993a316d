"""What every sampler shares: the step record its callback receives, and NaN checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepState:
    """One sampler step, as handed to a callback.

    i: step number (0 = first); t, t_next: the step's start and end times; x_t: the state at t
    (B, ...); x0_hat: the denoiser's estimate of clean data at t; x_next: the state at t_next.
    """

    i: int
    t: float
    t_next: float
    x_t: Tensor
    x0_hat: Tensor
    x_next: Tensor


Callback = Callable[[StepState], None]


class NonFiniteError(RuntimeError):
    """The model produced NaN or infinity while sampling."""


def schedule_at(denoiser, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t)) as Python floats."""
    schedule = denoiser.schedule
    return float(schedule.alpha(t)), float(schedule.sigma(t))


def denoise(denoiser, x: Tensor, t: float, y: Tensor | None, step: int) -> tuple[Tensor, Tensor]:
    """Call the denoiser at scalar time t and stop with a clear message on non-finite output."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    x0_hat, eps_hat = denoiser(x, t_batch, y)
    if not bool(torch.isfinite(x0_hat).all()):
        raise NonFiniteError(
            f"the model returned NaN or infinity at sampler step {step} (t = {t:.4f}); "
            "the checkpoint may have diverged: try an earlier checkpoint or the EMA weights"
        )
    return x0_hat, eps_hat


class Recorder:
    """A callback that keeps x_t and x0_hat at every step (on the CPU), for figures and GIFs.

    Args:
        every: keep every k-th step (the last step is always kept).
        max_items: keep only the first max_items samples of the batch.
    """

    def __init__(self, every: int = 1, max_items: int | None = None):
        self.every, self.max_items = every, max_items
        self.ts: list[float] = []
        self.xs: list[Tensor] = []
        self.x0_hats: list[Tensor] = []
        self.final: Tensor | None = None

    def __call__(self, state: StepState) -> None:
        keep = slice(None, self.max_items)
        if state.i % self.every == 0 or state.t_next == 0:
            self.ts.append(state.t)
            self.xs.append(state.x_t[keep].detach().float().cpu())
            self.x0_hats.append(state.x0_hat[keep].detach().float().cpu())
        self.final = state.x_next[keep].detach().float().cpu()

    def trajectory(self) -> Tensor:
        """(steps + 1, B, ...) states from x_T to the final sample."""
        return torch.stack([*self.xs, self.final])
