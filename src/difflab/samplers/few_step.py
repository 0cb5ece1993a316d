"""The samplers of one-step models whose net reads a second time t2 (few_step_losses.py):
MeanFlow (Geng et al. 2025, Alg. 2) and shortcut models (Frans et al. 2024, Sec. 3).

| code     | paper symbol                                                     |
|----------|------------------------------------------------------------------|
| t, s     | t and r (MeanFlow), t and t - d (shortcut); t = 1 is noise       |
| t2       | t - r (MeanFlow's net reads the interval), d (the step size)     |
| x_next   | z_r = z_t - (t - r) u(z_t, r, t);  x_{t - d} = x_t - d s(x_t, t, d) |

On the rectified path (alpha = 1 - t, sigma = t) the denoiser's (x0_hat, eps_hat) of a velocity
u are x_t - t u and x_t + (1 - t) u, so the jump is (1 - s) x0_hat + s eps_hat: DDIM's eta = 0
step (ddim.py), with the net told the step's length. n steps cost n network calls; one step from
t = 1 maps noise to a sample. The shortcut model was trained on the step sizes 1 / max_steps ..
1 (powers of two): its sampler takes --steps on that grid only, and its steps of the finest
size ask the net for the velocity (t2 = 0), as its training's targets do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, NonFiniteError, StepState, schedule_at
from difflab.samplers.noise import SampleNoise
from difflab.samplers.registry import register


def _needs(denoiser, family: str) -> str:
    grid = getattr(denoiser, "step_grid", None)
    if grid is None:  # APG, CFG++, autoguidance combine two denoisers' (x0, eps): no t2 there
        raise ConfigError(
            f"the {family} sampler takes classifier-free guidance only: use --guidance-method "
            "cfg (or no guidance)"
        )
    if not grid.startswith(family):
        raise ConfigError(
            f"the {family} sampler needs a run trained with train.loss={family}; sample this "
            "run with its own sampler (ddim, heun, dpmpp_2m, ... or consistency)"
        )
    return grid


def _max_steps(grid: str) -> int:
    """A shortcut model's finest lattice, from its step grid "shortcut:<max_steps>"."""
    return int(grid.split(":")[1])


def step_counts(denoiser, wanted: tuple[int, ...]) -> list[int]:
    """The counts of `wanted` a few-step model samples with: a shortcut model's are powers of
    two up to its lattice (shortcut.max_steps); MeanFlow takes any."""
    grid = getattr(denoiser, "step_grid", None) or ""
    if not grid.startswith("shortcut"):
        return list(wanted)
    return [n for n in wanted if n <= _max_steps(grid) and not n & (n - 1)]


def _shortcut_times(grid: str, ts: Tensor, t_max: float) -> Tensor:
    """The times of ts on the shortcut's lattice: t / t_max (the path's t_max < 1 moves to 1: on
    the rectified path x_T is the noise at t = 1), each step d = 1 / 2^k with 2^k up to
    max_steps. A whole grid (t_max down to 0) is --steps uniform steps of d = 1 / steps; an
    edit's grid (samplers/editing.py: SDEdit's start level, RePaint's stretches) may start or
    stop anywhere on the lattice of its steps."""
    max_steps = _max_steps(grid)
    steps = len(ts) - 1
    if abs(float(ts[0]) - t_max) < 1e-9 and float(ts[-1]) == 0:  # the sampler's whole grid
        if steps > max_steps or steps & (steps - 1):
            raise ConfigError(
                f"--steps {steps} is not on this shortcut model's step grid: use a power of two "
                f"up to {max_steps} (shortcut.max_steps; 1, 2, 4, ...)"
            )
        uniform = torch.linspace(float(ts[0]), 0.0, steps + 1, dtype=ts.dtype)
        if not torch.allclose(ts.cpu(), uniform, atol=1e-6):
            raise ConfigError(
                "the shortcut sampler takes uniform steps of d = 1 / steps: use --spacing "
                "uniform and --shift 1"
            )
    scaled = ts.cpu().double() / t_max
    times = torch.round(scaled * max_steps) / max_steps
    inverse = 1 / (times[:-1] - times[1:]).clamp_min(1 / (2 * max_steps))  # 1 / d per step
    powers = 2.0 ** torch.round(torch.log2(inverse))
    on_lattice = torch.allclose(scaled, times, atol=1e-6) and torch.equal(inverse, powers)
    if not (on_lattice and bool((inverse <= max_steps).all())):
        raise ConfigError(
            f"an edit's grid from t = {float(scaled[0]):.4g} takes steps off this shortcut "
            f"model's lattice (steps d = 1 / 2^k down to 1 / {max_steps}): use --steps a "
            "power of two and a --strength that is a multiple of 1 / steps (0.5, 0.75, ...)"
        )
    return times


def _jumps(denoiser, x_T, ts, y, callback, finest: float = 0.0) -> Tensor:
    """Steps along ts, the net told each step's length t2 = t - s (0 for steps no longer than
    `finest`: a shortcut model's smallest step is the velocity's, few_step_losses.py)."""
    x = x_T
    for i in range(len(ts) - 1):
        t, s = float(ts[i]), float(ts[i + 1])
        t2 = 0.0 if t - s <= finest * (1 + 1e-6) else t - s
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        x0_hat, eps_hat = denoiser(x, t_batch, y, t2=torch.full_like(t_batch, t2))
        if not bool(torch.isfinite(x0_hat).all()):
            raise NonFiniteError(
                f"the model returned NaN or infinity at sampler step {i} (t = {t:.4f}); "
                "the checkpoint may have diverged: try an earlier checkpoint or the EMA weights"
            )
        alpha_s, sigma_s = schedule_at(denoiser, s)
        x_next = alpha_s * x0_hat + sigma_s * eps_hat
        if callback is not None:
            callback(StepState(i, t, s, x, x0_hat, x_next))
        x = x_next
    return x


@register("meanflow", family="meanflow")
@torch.no_grad()
def sample_meanflow(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """MeanFlow from x_T (B, ...) along times ts (n + 1,): z_s = z_t - (t - s) u(z_t, s, t)."""
    _needs(denoiser, "meanflow")
    return _jumps(denoiser, x_T, ts, y, callback)


@register("shortcut", family="shortcut")
@torch.no_grad()
def sample_shortcut(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """A shortcut model from x_T (B, ...): n uniform steps of d = 1 / n, n a power of two."""
    grid = _needs(denoiser, "shortcut")
    times = _shortcut_times(grid, ts, denoiser.schedule.t_max)
    return _jumps(denoiser, x_T, times, y, callback, finest=1 / _max_steps(grid))
