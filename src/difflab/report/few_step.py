"""The figure of a one-step model trained from scratch (train.loss = meanflow or shortcut): its
samples at 1, 2, 4 and 8 network calls a step count from the same noise (the run's sample seed)
and the same labels, side by side, drawn once into samples/steps_compare.npz and plotted from
it. A consistency run has its own (report/consistency.py: student beside teacher)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from difflab.files import savez_atomically
from difflab.model import RunKind
from difflab.report import charts, grids
from difflab.report.figure import subplots
from difflab.runs import draw_samples, load_run, sample_labels
from difflab.samplers.few_step import step_counts

STEPS = (1, 2, 4, 8)


def step_samples(run_dir: Path, kind: RunKind, n: int) -> Path:
    """samples/steps_compare.npz: the run's own sampler (and guidance) at each of STEPS it
    takes, every count from seed cfg.sample.seed (the same x_T) with the same labels."""
    run = load_run(run_dir)  # the weights its sample.use_ema names
    labels = sample_labels(run, n, per_class=True) if kind.condition == "classes" else None
    arrays = {}
    for steps in step_counts(run.model.denoiser, STEPS):
        scfg = dataclasses.replace(
            run.cfg.sample, steps=steps, n=n, batch_size=min(n, run.cfg.sample.batch_size)
        )
        arrays[f"steps_{steps}"] = draw_samples(run, scfg, labels=labels, progress=False).numpy()
    path = run_dir / "samples" / "steps_compare.npz"
    savez_atomically(path, **arrays)
    return path


def panels_figure(panels: dict[str, np.ndarray], path: Path, kind: RunKind) -> Path:
    """Titled panels side by side: image grids, or scatter plots of 2-D points."""
    if kind.is_image:
        return grids.comparison_figure(panels, path)
    fig, axes = subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, points) in zip(axes, panels.items(), strict=True):
        charts._scatter(ax, points, "C0")
        charts._square_axes(ax, title)
    return charts._save(fig, path)


def steps_figure(npz: Path, path: Path, kind: RunKind) -> Path:
    with np.load(npz, allow_pickle=False) as f:
        counts = sorted(int(key.split("_")[1]) for key in f.files)
        panels = {f"{c} step{'s' if c > 1 else ''}": f[f"steps_{c}"] for c in counts}
    return panels_figure(panels, path, kind)


def few_step_figures(run_dir: Path, kind: RunKind, resample: bool = False) -> list[Path]:
    """plots/steps_compare.png of a MeanFlow or shortcut run (`kind`)."""
    npz = run_dir / "samples" / "steps_compare.npz"
    if resample or not npz.exists():
        npz = step_samples(run_dir, kind, 40 if kind.is_image else 4000)
    return [steps_figure(npz, run_dir / "plots" / "steps_compare.png", kind)]
