"""The report of an image run: sample artefacts under samples/ and every figure under plots/.

Artefacts (all .npz, images (N, C, H, W) in [-1, 1]):
    samples.npz        the run's sampler and guidance; per class when class-conditional
    compare.npz        16 images from one noise and one set of labels, three ways: `ema` (the
                       run's sampler), `raw` (non-EMA weights), `other` (DDPM <-> DDIM)
    trajectory.npz     x_t and x0_hat at up to 50 steps (near-uniform in log-SNR, `steps` says
                       which) for one image per class
    real.npz           a few training images (for the forward-process figure)
Figures are drawn from these files only, so `difflab plot` rebuilds them without the dataset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from difflab import build
from difflab.config import RunConfig, SampleConfig
from difflab.files import savez_atomically
from difflab.report import charts, gifs, grids
from difflab.report.latent import decoded_states, latent_gif
from difflab.runs import LoadedRun, draw_samples, load_run, sample_labels, save_run_samples
from difflab.samplers import Recorder

GIF_FRAMES = 50  # states kept for the denoising GIF
COMPARE_N = 16  # images in the raw-vs-EMA and DDPM-vs-DDIM comparisons
OTHER_SAMPLER = {"ddpm": "ddim", "ddim": "ddpm"}  # the comparison figure's second sampler


def _labels(run: LoadedRun, n: int, seed: int) -> torch.Tensor | None:
    if run.num_classes == 0:
        return None
    n = max(n - n % run.num_classes, run.num_classes)
    return sample_labels(run, n, per_class=True, seed=seed)


def make_image_artefacts(run_dir: Path, progress: bool = True) -> dict:
    """Draw every sample artefact of an image run; returns a small summary for eval.json."""
    run = load_run(run_dir)
    scfg = run.cfg.sample
    labels = _labels(run, scfg.n, scfg.seed)
    scfg = dataclasses.replace(scfg, n=len(labels) if labels is not None else scfg.n)
    samples = draw_samples(run, scfg, labels=labels, progress=progress)
    save_run_samples(run, samples, labels, scfg)
    few = dataclasses.replace(scfg, n=min(COMPARE_N, scfg.n))
    few_labels = labels[:: max(1, len(labels) // few.n)][: few.n] if labels is not None else None
    other = OTHER_SAMPLER.get(scfg.sampler, "ddpm")
    # DDPM gets 20x the steps (DDPM-1000 against DDIM-50), DDIM the run's own step count
    limit = getattr(run.denoiser.schedule, "num_steps", 1000)
    other_steps = min(limit, 20 * scfg.steps) if other == "ddpm" else scfg.steps
    other_cfg = dataclasses.replace(few, sampler=other, steps=other_steps)
    # the run's own weights (sample.use_ema) beside the other kind
    ema_run = run if run.ema else load_run(run_dir, use_ema=True)
    raw_run = load_run(run_dir, use_ema=False) if run.ema else run
    compare = {
        "ema": draw_samples(ema_run, few, labels=few_labels, progress=False).numpy(),
        "raw": draw_samples(raw_run, few, labels=few_labels, progress=False).numpy(),
        "other": draw_samples(run, other_cfg, labels=few_labels, progress=False).numpy(),
    }
    savez_atomically(
        run_dir / "samples" / "compare.npz",
        **compare,
        sampler=few.sampler,
        steps=few.steps,
        other_sampler=other,
        other_steps=other_steps,
    )
    _trajectory(run, run_dir, scfg)
    _real_images(run, run_dir)
    _, std = grids.pixel_diversity(samples.numpy())
    return {
        "n": len(samples),
        "sampler": scfg.sampler,
        "steps": scfg.steps,
        "guidance": scfg.guidance if labels is not None else None,
        "ema": run.ema,
        "pixel_std_across_samples": std,
    }


class FrameRecorder(Recorder):
    """A Recorder of chosen sampler steps only (and the final sample): the states a GIF shows,
    chosen before sampling so that 1000 steps of thousands of points stay small."""

    def __init__(self, keep, num_steps: int, max_items: int | None = None):
        super().__init__(every=1, max_items=max_items)
        self.keep, self.num_steps, self.kept = {int(i) for i in keep}, num_steps, []

    def __call__(self, state) -> None:
        if state.i in self.keep:
            super().__call__(state)
            self.kept.append(state.i)
        else:
            self.final = state.x_next[: self.max_items].detach().float().cpu()

    def steps(self) -> np.ndarray:
        """(F + 1,) the sampler step of each kept state, the last = the number of steps."""
        return np.array([*self.kept, self.num_steps])


def frame_recorder(run: LoadedRun, scfg: SampleConfig, max_frames: int) -> FrameRecorder:
    """A recorder of at most `max_frames` states of `scfg`'s grid, near-uniform in log-SNR."""
    _, _, ts = build.build_sampler(scfg, run.denoiser.schedule)
    picks = gifs.frame_indices(run.denoiser.schedule.log_snr(ts).numpy(), max_frames)
    return FrameRecorder(picks[:-1], len(ts) - 1)  # the last state is the sample


def state_lams(cfg: RunConfig, ts: np.ndarray) -> np.ndarray:
    """(S + 1,) log-SNR of recorded states: start times `ts` (S,), then the sample at t = 0."""
    schedule = build.build_schedule(cfg.diffusion)
    return schedule.log_snr(torch.from_numpy(np.append(ts, 0.0))).numpy()


def _trajectory(run: LoadedRun, run_dir: Path, scfg: SampleConfig) -> None:
    conditioner = run.model.conditioner  # one image per class (or 8 unconditional ones)
    k = conditioner.num_classes or 8
    labels = conditioner.request(k, per_class=True) if run.model.kind.conditional else None
    states = record_states(run, dataclasses.replace(scfg, n=k), labels)
    save_trajectory(
        run_dir,
        states,
        # a text model's conditions are prompts, not classes: no names under the columns
        labels=labels.numpy() if labels is not None and labels.dim() == 1 else np.zeros(0, int),
        class_names=np.array(run.class_names),
    )


def record_states(
    run: LoadedRun, scfg: SampleConfig, labels=None, max_frames: int | None = None
) -> dict:
    """scfg's sampler at up to `max_frames` of its states, near-uniform in log-SNR, for scfg.n
    samples (default: GIF_FRAMES): {"ts" (F,), "steps" (F + 1,), "xs" (F + 1, n, ...),
    "x0_hats" (F, n, ...), "sampler"}."""
    recorder = frame_recorder(run, scfg, max_frames or GIF_FRAMES)
    draw_samples(run, scfg, labels=labels, progress=False, recorder=recorder)
    states = {
        "ts": np.array(recorder.ts),
        "steps": recorder.steps(),
        "xs": recorder.trajectory().numpy(),
        "x0_hats": torch.stack(recorder.x0_hats).numpy(),
        "sampler": scfg.sampler,
    }
    return decoded_states(run.model.codec, states) if run.model.kind.latent else states


def save_trajectory(run_dir: Path, states: dict, **extra) -> Path:
    """samples/trajectory.npz (atomically): the recorded states and what a kind of run adds."""
    path = run_dir / "samples" / "trajectory.npz"
    savez_atomically(path, **states, **extra)
    return path


def _real_images(run: LoadedRun, run_dir: Path, count: int = 6) -> None:
    """A few training images, kept so the forward-process figure needs no dataset later."""
    stream = build.build_data(run.cfg, seed=run.cfg.train.seed)
    images, _ = stream.next_batch(count)
    savez_atomically(run_dir / "samples" / "real.npz", images=images.numpy())


def _load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def plot_image_run(run_dir: Path, cfg: RunConfig) -> list[Path]:
    """Every figure of an image run, from the artefacts under samples/."""
    s, plots = run_dir / "samples", run_dir / "plots"
    main, compare = _load(s / "samples.npz"), _load(s / "compare.npz")
    traj, real = _load(s / "trajectory.npz"), _load(s / "real.npz")["images"]
    names = [str(n) for n in traj["class_names"]] or None
    labels = main.get("labels")
    if labels is not None:
        paths = [grids.class_grid(main["samples"], labels, plots / "samples.png", names)]
    else:
        paths = [grids.save_grid(main["samples"][:100], plots / "samples.png")]
    schedule = build.build_schedule(cfg.diffusion)
    forward = charts.forward_samples(schedule, real, charts.FORWARD_TS)
    first = f"{compare['sampler']} {int(compare['steps'])} steps"
    second = f"{compare['other_sampler']} {int(compare['other_steps'])} steps"
    paths += [
        grids.forward_process_images(
            real,
            forward,
            plots / "forward.png",
        ),
        gifs.denoising_gif(
            traj["ts"],
            traj["xs"],
            traj["x0_hats"],
            plots / "denoising.gif",
            traj["labels"] if len(traj["labels"]) else None,
            names,
            lams=state_lams(cfg, traj["ts"]),
            steps=traj.get("steps"),  # absent in runs made before issue 19
        ),
        *latent_gif(traj, plots, names, state_lams(cfg, traj["ts"])),
        grids.trajectory_strip(traj["xs"], plots / "trajectory_strip.png"),
        grids.comparison_figure(
            {"EMA weights": compare["ema"], "raw weights": compare["raw"]}, plots / "raw_vs_ema.png"
        ),
        grids.comparison_figure(
            {first: compare["ema"], second: compare["other"]}, plots / "sampler_comparison.png"
        ),
        grids.diversity_figure(main["samples"], plots / "diversity.png", labels),
    ]
    history = sorted((int(p.stem.split("-")[-1]), p) for p in s.glob("grid-step-*.png"))
    if history:
        paths.append(grids.grid_history(history, plots / "grid_history.png"))
    return paths
