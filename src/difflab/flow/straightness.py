"""Straightness of a flow (Liu et al. 2023, "Flow Straight and Fast", Sec. 2.2, eq. 5):

    S(Z) = int_0^1 E[ || (Z_1 - Z_0) - dZ_t/dt ||^2 ] dt,

zero exactly when every path is a straight line travelled at constant speed, so one Euler step
is exact. difflab's time runs from noise (t = t_max) to data (t = 0), which only flips signs.

Measured on the ODE paths of a deterministic first-order solver (DDIM = Euler on the flow ODE)
on a fine uniform grid: a step's velocity is (x_{i+1} - x_i) / (t_{i+1} - t_i), the straight
line's is (x_N - x_0) / (t_N - t_0), and the integral is the dt-weighted mean over steps. The
squared norm is averaged over the data's dimensions (per coordinate), so 2-D points and images
read on one scale.
"""

from __future__ import annotations

import dataclasses

import torch

from difflab.config import SampleConfig
from difflab.samplers import Recorder

STRAIGHTNESS_STEPS = 100
# Paths S is averaged over: each image path already averages hundreds of coordinates, and
# 2,000 guided MNIST paths of 100 steps cost an hour of CPU per model; 200 cost six minutes.
PATHS_POINTS, PATHS_IMAGES = 2000, 200


def default_paths(shape: tuple[int, ...]) -> int:
    """How many paths `difflab reflow` measures S on, for data of this shape."""
    return PATHS_POINTS if len(shape) == 1 else PATHS_IMAGES


def straightness_of_paths(ts: torch.Tensor, xs: torch.Tensor) -> float:
    """S of recorded paths: ts (N + 1,) times, xs (N + 1, B, ...) states at those times."""
    dt = (ts[1:] - ts[:-1]).double()  # (N,) negative: time runs down
    shape = (-1,) + (1,) * (xs.dim() - 1)
    steps = (xs[1:] - xs[:-1]).double() / dt.reshape(shape)  # dZ/dt per step (N, B, ...)
    line = (xs[-1] - xs[0]).double() / float(ts[-1] - ts[0])  # (B, ...)
    dev = (steps - line).pow(2).flatten(2).mean(dim=2).mean(dim=1)  # (N,)
    return float((dev * dt.abs()).sum() / dt.abs().sum())


@torch.no_grad()
def straightness(model, scfg: SampleConfig, n: int = 2000, steps: int = STRAIGHTNESS_STEPS):
    """S(Z) of a model's ODE (at scfg's guidance and seed) on n paths of `steps` Euler steps.

    Returns (S, ts (steps + 1,), xs (steps + 1, n, ...)).
    """
    cfg = dataclasses.replace(
        scfg,
        sampler="ddim",
        eta=0.0,
        steps=steps,
        spacing="uniform",
        shift=1.0,
        n=n,
        batch_size=n,
        t_end=0.0,
    )
    recorder = Recorder()
    cond = model.conditioner.balanced(n)
    final = model.sample(cfg, cond=cond, recorder=recorder)
    ts = torch.tensor([*recorder.ts, 0.0], dtype=torch.float64)
    xs = torch.cat([torch.stack(recorder.xs), final[None].float()])
    return straightness_of_paths(ts, xs), ts, xs
