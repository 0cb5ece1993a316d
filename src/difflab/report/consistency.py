"""The figures of a consistency run (train.loss = ct, ict, ect or cd): the loss and curriculum
(N(k), the target's EMA rate mu(k), ECT's stage) against step, from metrics.jsonl; and one- and
two-step samples beside the teacher's many-step samples from the same noise (the teacher named by
consistency.teacher: a run or a weights file), drawn once into samples/teacher_compare.npz and
plotted from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from difflab.config import RunConfig
from difflab.files import savez_atomically
from difflab.model import RunKind
from difflab.report import charts
from difflab.report.few_step import panels_figure
from difflab.report.figure import subplots
from difflab.runs import draw_samples, is_weights_file, load_run, sample_labels
from difflab.training.logging import read_metrics

CURRICULUM_KEYS = {
    "consistency_N": "N(k): discretisation steps",
    "target_decay": "mu(k): target EMA rate",
    "ect_stage": "ECT stage",
}


def curriculum_figure(metrics_path: Path, path: Path) -> Path | None:
    """Loss and every logged curriculum quantity against step; None when nothing is logged."""
    rows = [r for r in read_metrics(metrics_path) if r.get("loss") is not None]
    keys = [k for k in CURRICULUM_KEYS if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    fig, axes = subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2))
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows], dtype=float)
    axes[0].plot(steps, loss, lw=0.8, alpha=0.4, color="C0")
    axes[0].plot(steps, charts.smooth(loss), lw=1.5, color="C0")
    charts.log_axis(axes[0], loss)
    axes[0].set(xlabel="step", title="consistency loss")
    for ax, key in zip(axes[1:], keys, strict=True):
        ax.plot(steps, [r.get(key, np.nan) for r in rows], color="C1", drawstyle="steps-post")
        ax.set(xlabel="step", title=CURRICULUM_KEYS[key])
    fig.tight_layout()
    return charts._save(fig, path)


def teacher_samples(run_dir: Path, cfg: RunConfig, kind: RunKind, n: int) -> Path | None:
    """samples/teacher_compare.npz: the student's 1- and 2-step samples and the teacher's with
    its own sampler, all from seed cfg.sample.seed (the same x_T), with the same labels."""
    source = cfg.consistency.teacher
    if not source or not (is_weights_file(source) or (Path(source) / "config.json").is_file()):
        return None
    # the teacher's EMA weights: what the student was distilled from (training/teacher.py)
    student, teacher = load_run(run_dir), load_run(source, use_ema=True)
    labels = sample_labels(student, n, per_class=True) if kind.condition == "classes" else None
    arrays, names = {}, []
    for key, run, scfg in (
        ("one_step", student, dataclasses.replace(student.cfg.sample, steps=1)),
        ("two_step", student, dataclasses.replace(student.cfg.sample, steps=2)),
        ("teacher", teacher, teacher.cfg.sample),
    ):
        scfg = dataclasses.replace(
            scfg, n=n, batch_size=min(n, scfg.batch_size), seed=cfg.sample.seed
        )
        arrays[key] = draw_samples(run, scfg, labels=labels, progress=False).numpy()
        names.append(f"{scfg.sampler}-{scfg.steps}")
    path = run_dir / "samples" / "teacher_compare.npz"
    savez_atomically(path, **arrays, names=np.array(names))
    return path


def teacher_figure(npz: Path, path: Path, kind: RunKind) -> Path:
    with np.load(npz, allow_pickle=False) as f:
        names = [str(s) for s in f["names"]]
        panels = {
            f"{title} ({name})": f[key]
            for key, title, name in zip(
                ("one_step", "two_step", "teacher"),
                ("1 step", "2 steps", "teacher"),
                names,
                strict=True,
            )
        }
    return panels_figure(panels, path, kind)


def consistency_figures(
    run_dir: Path, cfg: RunConfig, kind: RunKind, resample: bool = False
) -> list[Path]:
    """plots/curriculum.png and plots/teacher_compare.png of a consistency run (`kind`)."""
    paths = []
    curve = curriculum_figure(run_dir / "metrics.jsonl", run_dir / "plots" / "curriculum.png")
    if curve:
        paths.append(curve)
    npz = run_dir / "samples" / "teacher_compare.npz"
    if resample or not npz.exists():
        npz = teacher_samples(run_dir, cfg, kind, 40 if kind.is_image else 4000)
    if npz is not None:
        paths.append(teacher_figure(npz, run_dir / "plots" / "teacher_compare.png", kind))
    return paths
