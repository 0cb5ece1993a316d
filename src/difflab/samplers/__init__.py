"""Samplers: plain functions with one signature,

    sample_<name>(denoiser, x_T, ts, *, y=None, generator=None, callback=None, **options) -> x0

`ts` is the decreasing grid of times (see `grids.timesteps`), `generator` a `SampleNoise` (or an
int seed) so that every sample is reproducible whatever batch it is drawn in, and `callback`
receives a `StepState` after every step. `generate` draws many samples in batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difflab.samplers.common import Callback, NonFiniteError, Recorder, StepState

# The registry, in the order samplers are listed (help texts, `eval --compare`): one import a file.
from difflab.samplers.ddpm import sample_ddpm  # isort: skip
from difflab.samplers.ddim import sample_ddim  # isort: skip
from difflab.samplers.edm import sample_euler, sample_heun  # isort: skip
from difflab.samplers.dpm_solver import (  # isort: skip
    sample_dpm_2s,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m,
)
from difflab.samplers.unipc import sample_unipc  # isort: skip
from difflab.samplers.pc import sample_pc  # isort: skip
from difflab.samplers.consistency import sample_consistency  # isort: skip
from difflab.samplers.few_step import sample_meanflow, sample_shortcut  # isort: skip
from difflab.errors import ConfigError
from difflab.samplers.editing import Edit
from difflab.samplers.grids import discrete_timesteps, timesteps
from difflab.samplers.noise import SampleNoise
from difflab.samplers.progress import progress_bar
from difflab.samplers.registry import (
    SAMPLERS,
    Option,
    SamplerInfo,
    cost_is_fixed,
    deterministic_samplers,
    nfe_of,
    sampler_info,
    steps_for_nfe,
)

__all__ = [
    "SAMPLERS",
    "Callback",
    "Edit",
    "NonFiniteError",
    "Option",
    "Recorder",
    "SampleNoise",
    "SamplerInfo",
    "StepState",
    "cost_is_fixed",
    "deterministic_samplers",
    "discrete_timesteps",
    "generate",
    "nfe_of",
    "sample_consistency",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_2s",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m",
    "sample_euler",
    "sample_heun",
    "sample_meanflow",
    "sample_pc",
    "sample_shortcut",
    "sample_unipc",
    "sampler_info",
    "steps_for_nfe",
    "timesteps",
]


def generate(
    sampler: Callable,
    denoiser,
    n: int,
    shape: tuple[int, ...],
    ts: Tensor,
    *,
    seed: int = 0,
    start: int = 0,
    batch_size: int = 1024,
    labels: Tensor | None = None,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
    progress: bool = False,
    autocast: torch.dtype | None = None,
    rows: dict[str, Tensor] | None = None,
    **options,
) -> Tensor:
    """Draw n samples of `shape` (per sample) in batches; sample k is the same for any batch_size.

    Args:
        sampler: a sample_<name> function (options are passed on to it).
        denoiser: what the sampler drives.
        n: number of samples.
        shape: shape of one sample, e.g. (2,) or (C, H, W).
        ts: the time grid.
        seed: noise seed; x_T of sample k is `SampleNoise(seed).randn` stream 0, row k.
        start: global index of the first of the n samples: samples start..start + n - 1 are
            drawn, bit-identical to those rows of one call from 0 (one process's share).
        labels: (n,) class labels or None.
        callback: receives each step of the first batch only (for trajectories).
        autocast: run under torch.autocast in this dtype (bf16/fp16), or None (full precision).
            The sampler's own arithmetic stays float32: only the network's matmuls go lower.
        rows: per-sample keyword arguments of the sampler, (n, ...) each, handed to it batch by
            batch (an edit's init and mask, editing.py).
    Returns:
        (n, *shape) float32 samples on the CPU.
    """
    if n < 1:
        raise ConfigError(f"number of samples must be >= 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    out = []
    prior_std = denoiser.schedule.prior_std(float(ts[0]))
    starts = range(0, n, batch_size)
    bar = progress_bar(
        total=len(starts) * (len(ts) - 1), desc="sampling", unit="step", disable=not progress
    )
    for first in starts:
        size = min(batch_size, n - first)
        noise = SampleNoise(seed, start + first)
        x_T = noise.randn((size, *shape), 0, device)
        if prior_std != 1.0:  # variance-exploding schedules start wide
            x_T = x_T * prior_std
        y = labels[first : first + size].to(device) if labels is not None else None
        user_cb = callback if first == 0 else None
        batch_rows = {k: v[first : first + size].to(device) for k, v in (rows or {}).items()}

        def step_done(state: StepState, user_cb=user_cb) -> None:
            bar.update(1)
            if user_cb is not None:
                user_cb(state)

        device_type = torch.device(device).type
        with torch.inference_mode(), torch.autocast(device_type, autocast, enabled=bool(autocast)):
            x0 = sampler(
                denoiser, x_T, ts, y=y, generator=noise, callback=step_done, **batch_rows, **options
            )
        out.append(x0.float().cpu())
    bar.close()
    return torch.cat(out)
