"""Consistency sampling (Song et al. 2023, Algorithm 1): one network call maps x_T to a sample;
each further step adds noise back to a chosen level and maps again.

| code        | paper symbol                                                  |
|-------------|---------------------------------------------------------------|
| times       | T = tau_0 > tau_1 > ... > tau_{n-1}: the levels evaluated     |
| x0_hat      | x <- f_theta(x_tau, tau)                                      |
| sigma_min   | epsilon, where f's trajectories end                           |
| x_next      | x_tau = x + sqrt(tau^2 - epsilon^2) z (scaled: alpha (x~ ...)) |

On any schedule the renoising step is x_t = alpha(t) x0_hat + sqrt(sigma(t)^2 - (alpha(t)
sigma_min)^2) z: x0_hat is f's point at sigma_min, which carries sigma_min of noise already.
n steps cost n network calls. The levels after the first are the grid's (`--steps`,
`--spacing`, `--t-end`) or `--cm-sigmas` (noise levels sigma / alpha, decreasing).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, StepState, denoise, schedule_at
from difflab.samplers.noise import SampleNoise, as_noise
from difflab.samplers.registry import Option, register


def parse_levels(text: str) -> list[float]:
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--cm-sigmas takes comma-separated numbers, got {text!r}") from None
    if any(not math.isfinite(s) or s <= 0 for s in levels) or any(
        a <= b for a, b in itertools.pairwise(levels)
    ):
        raise ConfigError(f"--cm-sigmas must be positive and decreasing, got {text!r}")
    return levels


def consistency_times(denoiser, ts: Tensor, cm_sigmas: str = "") -> list[float]:
    """The times of the n = len(ts) - 1 network calls: ts[:-1], or ts[0] and the times of the
    first n - 1 levels of `cm_sigmas`; ValueError when it has too few or they are out of range."""
    if not getattr(denoiser, "consistency", False):
        raise ConfigError(
            "the consistency sampler needs a consistency model (a run trained with train.loss "
            "ct, ict, ect or cd); this run is a diffusion model: sample it with ddpm, ddim, "
            "heun, dpmpp_2m, ..."
        )
    steps = len(ts) - 1
    if not cm_sigmas:
        return [float(t) for t in ts[:-1]]
    levels = parse_levels(cm_sigmas)
    if steps - 1 > len(levels):
        raise ConfigError(
            f"--steps {steps} needs {steps - 1} noise levels after the first; --cm-sigmas gives "
            f"{len(levels)} ({cm_sigmas}): use --steps {len(levels) + 1} or fewer, or add levels"
        )
    lo, hi = denoiser.sigma_min, denoiser.sigma_max
    if levels and not (lo < levels[-1] and levels[0] < hi):
        raise ConfigError(f"--cm-sigmas must lie in ({lo:.4g}, {hi:.4g}), got {cm_sigmas}")
    schedule = denoiser.schedule
    chosen = torch.tensor(levels[: steps - 1], dtype=torch.float64)
    times = schedule.t_from_log_snr(-2 * torch.log(chosen)).clamp(schedule.t_min, schedule.t_max)
    return [float(ts[0]), *(float(t) for t in times)]


@register(
    "consistency",
    options=(
        Option(
            "cm_sigmas",
            str,
            "consistency: noise levels (sigma / alpha) of steps 2.., comma-separated",
            "--cm-sigmas",
        ),
    ),
    deterministic=False,  # a fresh z at every level after the first
    partial_grids=False,  # every call ends at clean data (f's point at sigma_min)
)
@torch.no_grad()
def sample_consistency(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    cm_sigmas: str = "",
) -> Tensor:
    """Multistep consistency sampling from x_T (B, ...) at time ts[0]; len(ts) - 1 calls.

    Returns the last f (B, ...): the sample.
    """
    times = consistency_times(denoiser, ts, cm_sigmas)
    noise = as_noise(generator)
    sigma_min = denoiser.sigma_min
    x = x_T
    for i, t in enumerate(times):
        x0_hat, _ = denoise(denoiser, x, t, y, i)
        t_next = times[i + 1] if i + 1 < len(times) else 0.0
        if t_next > 0:
            alpha, sigma = schedule_at(denoiser, t_next)
            z = noise.randn(x.shape, i + 1, x.device, x.dtype)
            x_next = alpha * x0_hat + max(sigma**2 - (alpha * sigma_min) ** 2, 0.0) ** 0.5 * z
        else:
            x_next = x0_hat
        if callback is not None:
            callback(StepState(i, t, t_next, x, x0_hat, x_next))
        x = x_next
    return x
