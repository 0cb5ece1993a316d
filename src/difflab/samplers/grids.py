"""Timestep grids: the decreasing times `ts` a sampler visits, ending at t = 0 (clean data).

A grid of n steps has n + 1 entries: ts[0] is where x_T lives, ts[-1] = 0.

Discrete spacings follow the table in Lin et al. 2024 ("Common diffusion noise schedules and
sample steps are flawed", Table 2), written for steps i = 1..T (diffusers counts 0..T-1):
- linspace: round(linspace(1, T, n)), which includes the last step T;
- leading:  1 + k * (T // n) for k = 0..n-1 (DDIM's original choice; never reaches T);
- trailing: round(T - k * T / n) for k = 0..n-1 (always starts at T);
- quadratic: round(T (k / n)^2) for k = 1..n, nudged apart so that all n are distinct (DDIM's
  "quadratic" selection, Song et al. 2021, App. D.2): short steps near t = 0, where detail forms.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from difflab.diffusion.schedules import DiscreteSchedule, Schedule
from difflab.errors import ConfigError

SPACINGS = ("linspace", "leading", "trailing", "quadratic")
CONTINUOUS_SPACINGS = ("uniform", "quadratic", "logsnr", "karras")
# For a discrete schedule, "uniform" falls back to trailing and quadratic has its own; "logsnr" and
# "karras" place times between the table's steps (its continuous view, see schedules.py). A
# continuous schedule refuses the table spacings (linspace, leading, trailing) rather than
# silently drawing a uniform grid.
KARRAS_RHO = 7.0


def _check_steps(num_steps: int, limit: int | None = None) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(
            f"the number of sampling steps must be an integer >= 1, got {num_steps!r}"
        )
    if limit is not None and num_steps > limit:
        raise ConfigError(
            f"{num_steps} sampling steps asked of a model trained on {limit} discrete steps; "
            f"use at most {limit}"
        )


def discrete_timesteps(num_train_steps: int, num_steps: int, spacing: str = "trailing") -> Tensor:
    """Decreasing step indices i in 1..T (num_steps of them, distinct)."""
    _check_steps(num_steps, num_train_steps)
    T = num_train_steps
    if spacing == "linspace":
        idx = np.round(np.linspace(1, T, num_steps))
    elif spacing == "leading":
        idx = 1 + np.arange(num_steps) * (T // num_steps)
    elif spacing == "trailing":
        idx = np.round(T - np.arange(num_steps) * T / num_steps)
    elif spacing == "quadratic":
        idx = np.round(T * (np.arange(1, num_steps + 1) / num_steps) ** 2)
        idx = np.maximum(idx, np.arange(1, num_steps + 1))  # at least one step apart
        for k in range(num_steps - 2, -1, -1):  # keep them increasing below T
            idx[k] = min(idx[k], idx[k + 1] - 1)
    else:
        raise ConfigError(
            f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}"
        )
    idx = np.unique(idx.astype(np.int64))[::-1].copy()
    return torch.from_numpy(idx)


def timesteps(
    schedule: Schedule,
    num_steps: int,
    spacing: str = "uniform",
    t_end: float | None = None,
    shift: float = 1.0,
) -> Tensor:
    """The (num_steps + 1,) float64 grid of times for `schedule`, from its start down to 0.

    Discrete schedules take a discrete spacing (linspace / leading / trailing / quadratic);
    every schedule takes uniform (in t), quadratic (denser near t = 0), logsnr (uniform in
    log-SNR) or karras (Karras et al. 2022, eq. 5: uniform in sigma^(1/rho), rho = 7, with
    sigma = sigma(t) / alpha(t)). The grid runs from t_max to t_min and then to 0.

    t_end moves the last nonzero time of the logsnr and karras grids up from t_min: at few steps
    a last interval spent between tiny noise levels is wasted, and the final step to 0 (x0_hat)
    is nearly exact from a small noise level (bench/RESULTS.md, samplers).

    shift s != 1 maps every time by t' = s t / (1 + (s - 1) t) on u = t / t_max (SD3, Esser et
    al. 2024, Sec. 5.3.2; diffusers' FlowMatchEulerDiscreteScheduler `shift`), which keeps both
    ends: s > 1 spends more steps at high noise. Continuous schedules on t in [0, 1] only.
    """
    if not shift > 0:
        raise ConfigError(f"sample.shift must be > 0 (1 = no shift; SD3 uses 3.0), got {shift}")
    if t_end is not None and spacing not in ("logsnr", "karras"):
        raise ConfigError(
            f"sample.t_end (--t-end) moves the last time of the logsnr and karras grids only, "
            f"not {spacing}: use --spacing logsnr or karras, or leave t_end at 0"
        )
    if t_end is not None and not (schedule.t_min <= t_end < schedule.t_max):
        raise ConfigError(
            f"t_end must lie in [{schedule.t_min:g}, {schedule.t_max:g}), got {t_end}"
        )
    discrete = isinstance(schedule, DiscreteSchedule)
    if not discrete and spacing in SPACINGS and spacing not in CONTINUOUS_SPACINGS:
        raise ConfigError(
            f"spacing {spacing} picks steps of a discrete table; the {schedule.name} schedule "
            f"is continuous: use --spacing uniform (evenly spaced times), quadratic, logsnr or "
            "karras"
        )
    if discrete and spacing not in ("logsnr", "karras"):
        if spacing == "uniform":
            spacing = "trailing"
        idx = discrete_timesteps(schedule.num_steps, num_steps, spacing)
        t = idx.to(torch.float64) / schedule.num_steps
    else:
        _check_steps(num_steps, schedule.num_steps if discrete else None)
        t_max, t_min = schedule.t_max, schedule.t_min
        u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        if spacing == "uniform":
            t = t_min + (t_max - t_min) * u
        elif spacing == "quadratic":
            t = t_min + (t_max - t_min) * u**2
        elif spacing in ("logsnr", "karras"):
            # lam is infinite at t = 0 except for VE schedules, whose t_min is above 0
            t_low = t_min if schedule.variance_exploding else max(t_min, 1e-4)
            if t_end is not None:
                t_low = t_end
            lam_hi, lam_lo = schedule.log_snr(t_low), schedule.log_snr(t_max)
            # n times from t_max down to t_low inclusive (then 0), as EDM's grid does.
            v = torch.linspace(1.0, 0.0, num_steps, dtype=torch.float64)
            if spacing == "logsnr":
                lam = lam_lo + (lam_hi - lam_lo) * (1 - v)
            else:  # sigma = exp(-lam / 2), interpolated in sigma^(1/rho)
                lo, hi = (torch.exp(-lam / (2 * KARRAS_RHO)) for lam in (lam_hi, lam_lo))
                lam = -2 * KARRAS_RHO * torch.log(lo + (hi - lo) * v)
            t = schedule.t_from_log_snr(lam)
            t[0] = t_max  # exact ends: an inverse by bisection is only close
            if num_steps > 1:
                t[-1] = t_low
        else:
            raise ConfigError(
                f"unknown timestep spacing {spacing!r} for a continuous schedule; "
                f"choose one of {', '.join(CONTINUOUS_SPACINGS)}"
            )
    if shift != 1.0:
        t = shifted(schedule, t, shift)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def shifted(schedule: Schedule, t: Tensor, shift: float) -> Tensor:
    """t_max u' with u' = s u / (1 + (s - 1) u), u = t / t_max (the time shift, see timesteps)."""
    if isinstance(schedule, DiscreteSchedule) or schedule.t_max > 1:
        raise ConfigError(
            f"sample.shift applies to continuous schedules on t in [0, 1] (rectified, trig, "
            f"cosine, ...), not the {schedule.name} schedule; leave sample.shift=1"
        )
    u = t / schedule.t_max
    return (schedule.t_max * shift * u / (1 + (shift - 1) * u)).clamp(
        schedule.t_min, schedule.t_max
    )
