"""The 2-D part of a run's report: the trajectory artefact and the figures of toy runs.

samples/trajectory.npz holds
    ts (F,), steps (F + 1,), xs (F + 1, N, 2), x0_hats (F, N, 2), sampler
        the run's sampler at F + 1 of its states (near-uniform in log-SNR, `steps` says which)
        for N = 2,000 points: the reverse GIF and the thinned stochastic paths;
    ode_ts (S + 1,), ode_xs (S + 1, K, 2), ode_sampler, ode_is_sampler
        every state of the probability-flow ODE (the run's sampler when it is deterministic,
        else DDIM with eta = 0) for the first K = 48 of those points: the trajectory figure.
Runs made before issue 19 have only ts, xs (every k-th step) and x0_hats; they still plot.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from difflab import build
from difflab.config import RunConfig, SampleConfig
from difflab.data.toy2d import sample_toy2d
from difflab.evaluation.toy2d import REFERENCE_SEED
from difflab.report import charts, gifs
from difflab.report.images import record_states, save_trajectory, state_lams
from difflab.runs import LoadedRun, draw_samples
from difflab.samplers import Recorder, sampler_info

TRAJECTORY_POINTS = 2000  # points of the reverse GIF (the run's sampler)
GIF_FRAMES = 60  # states kept of them, near-uniform in log-SNR
ODE_POINTS = 48  # probability-flow ODE paths kept at every step, for the trajectory figure
ODE_STEPS = 100  # DDIM (eta = 0) steps when the run's sampler is stochastic
STOCHASTIC_PATHS = (8, 30)  # the stochastic paths, thinned: points, states (12 x 40 tangled)


def ode_config(scfg: SampleConfig) -> SampleConfig:
    """The run's sampler if it is deterministic (its paths are the probability-flow ODE's),
    else DDIM with eta = 0 (Song et al. 2021, eq. 13: Euler on the ODE in log-SNR terms)."""
    stochastic = (
        not sampler_info(scfg.sampler).deterministic
        or (scfg.sampler == "ddim" and scfg.eta != 0)
        or (scfg.sampler in ("euler", "heun") and scfg.s_churn != 0)
    )
    n = min(ODE_POINTS, scfg.n)
    if not stochastic:
        return dataclasses.replace(scfg, n=n)
    return dataclasses.replace(scfg, sampler="ddim", eta=0.0, steps=min(ODE_STEPS, scfg.steps), n=n)


def record_trajectories(run: LoadedRun, run_dir: Path, scfg: SampleConfig) -> None:
    """samples/trajectory.npz: the run's sampler at GIF_FRAMES states for TRAJECTORY_POINTS
    points (ts, steps, xs, x0_hats), and every state of the probability-flow ODE for the first
    ODE_POINTS of them (ode_ts, ode_xs): the same x_T, as noise is keyed by sample index."""
    traj_cfg = dataclasses.replace(scfg, n=min(TRAJECTORY_POINTS, scfg.n))
    states = record_states(run, traj_cfg, max_frames=GIF_FRAMES)
    ode_cfg, ode = ode_config(scfg), Recorder()
    draw_samples(run, ode_cfg, progress=False, recorder=ode)
    _, _, ode_grid = build.build_sampler(ode_cfg, run.denoiser.schedule)
    save_trajectory(
        run_dir,
        states,
        ode_ts=ode_grid.numpy(),
        ode_xs=ode.trajectory().numpy(),
        ode_sampler=ode_cfg.sampler,
        ode_is_sampler=ode_cfg.sampler == scfg.sampler and ode_cfg.steps == scfg.steps,
    )


def plot_toy_run(run_dir: Path, cfg: RunConfig) -> list[Path]:
    """The figures of a 2-D run, from samples/*.npz."""
    plots = run_dir / "plots"
    real = sample_toy2d(cfg.data.name, 20000, torch.Generator().manual_seed(REFERENCE_SEED)).numpy()
    with np.load(run_dir / "samples" / "samples.npz") as f:
        generated, sampler, steps = f["samples"], str(f["sampler"]), int(f["steps"])
    with np.load(run_dir / "samples" / "trajectory.npz") as f:
        traj = {k: f[k] for k in f.files}
    ts, xs, lams = traj["ts"], traj["xs"], state_lams(cfg, traj["ts"])
    schedule = build.build_schedule(cfg.diffusion)
    title = f"generated ({sampler}, {steps} steps)"
    forward = charts.forward_samples(schedule, real[:5000], charts.FORWARD_TS)
    paths = [
        charts.real_vs_generated(
            real[: len(generated)], generated, plots / "scatter.png", ("real", title)
        ),
        charts.forward_process(real[:5000], forward, plots / "forward.png"),
        gifs.reverse_gif(
            ts, xs, plots / "reverse.gif", lams=lams, steps=traj.get("steps"), name=sampler
        ),
    ]
    # the stochastic sampler's paths, thinned: fewer points, fewer states
    points, states = STOCHASTIC_PATHS
    thinned = xs[gifs.frame_indices(lams, states), :points]
    stochastic = plots / "trajectories_stochastic.png"
    if "ode_xs" not in traj:  # a run made before issue 19 recorded only its own sampler
        return [*paths, _stochastic_figure(thinned, real, plots / "trajectories.png", sampler)]
    ode_sampler, ode_xs = str(traj["ode_sampler"]), traj["ode_xs"]
    paths.append(
        charts.trajectories(
            ode_xs,
            plots / "trajectories.png",
            background=real[:5000],
            title=f"probability-flow ODE: {ode_xs.shape[1]} points, {ode_sampler} "
            f"{len(ode_xs) - 1} steps",
            line="ODE path (deterministic)",
        )
    )
    if not bool(traj["ode_is_sampler"]):  # else those paths are the ones just drawn
        paths.append(_stochastic_figure(thinned, real, stochastic, sampler))
    return paths


def _stochastic_figure(thinned: np.ndarray, real: np.ndarray, path: Path, sampler: str) -> Path:
    return charts.trajectories(
        thinned,
        path,
        background=real[:5000],
        title=f"{sampler} paths: {thinned.shape[1]} points, {len(thinned)} of its states",
        line=f"{sampler} path",
        lw=0.6,
    )
