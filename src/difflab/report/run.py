"""A run's report: the sample artefacts, the 2-D metrics and every figure, all under the run dir.

`finish_run` is what `difflab train` does after training; `plot_run` is `difflab plot`. Figures
are drawn from files only (config.json, metrics.jsonl, samples/*.npz), so they can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from difflab.config import ConfigError, RunConfig
from difflab.data.toy2d import TOY2D
from difflab.evaluation.protocol import HIGHER_IS_BETTER
from difflab.evaluation.sampled import TrainingEvaluator, evaluate_images_of, timed_samples
from difflab.evaluation.toy2d import evaluate_toy
from difflab.files import write_text_atomically
from difflab.report import charts, grids
from difflab.report.images import make_image_artefacts, plot_image_run
from difflab.report.toy import plot_toy_run, record_trajectories
from difflab.runs import check_run_dir, draw_samples, load_run, save_run_samples
from difflab.samplers import SAMPLERS, deterministic_samplers, nfe_of, steps_for_nfe
from difflab.training.hooks import Hooks
from difflab.training.logging import MetricsLog, read_metrics


def training_hooks() -> Hooks:
    """difflab's training-time evaluator and sample grids, for train(..., hooks=...)."""
    return Hooks(evaluator=TrainingEvaluator, grid=draw_grid)


def draw_grid(samples, path: Path, model) -> Path:
    """samples/grid-step-N.png: an image grid (a row per class) or a 2-D scatter."""
    if model.kind.is_image:
        return grids.save_grid(samples, path, nrow=model.kind.num_classes or None)
    return charts.scatter(samples, path, path.stem.replace("grid-", "").replace("-", " "))


def compare_samplers(
    run_dir: Path,
    *,
    samplers: list[str] | None = None,
    nfes: list[int] = (5, 10, 20, 50),
    grids: list[str] | None = None,
    guidances: list[float] | None = None,
    changes: dict | None = None,
    checkpoint: int | str | None = None,
    device: str = "auto",
    image_eval: dict | None = None,
    progress: bool = True,
) -> dict:
    """Quality against model evaluations for every sampler x NFE budget x grid (x guidance).

    Every configuration starts from the same noise (the run's sample seed, or `changes`). 2-D
    runs are measured by sliced W2 (and in-square); image runs by `image_eval` = {"metrics",
    "reference", "extractors"} (see `evaluation.evaluate_images_of`). Each row also has the
    sampling speed (ms per sample) and peak memory. Writes plots/compare.png and returns
    {"rows": [...], "provenance": ..., "plot": path}.
    """
    run_dir = check_run_dir(run_dir)
    cfg = RunConfig.load(run_dir / "config.json")
    toy = cfg.data.name in TOY2D
    if not toy and image_eval is None:
        raise ConfigError("--compare on an image run needs image metrics (image_eval)")
    changes = dict(changes or {})
    use_ema = changes.pop("use_ema", True)
    run = load_run(run_dir, checkpoint=checkpoint, use_ema=use_ema, device=device)
    base = dataclasses.replace(run.cfg.sample, **changes)
    names = list(samplers or deterministic_samplers())  # SDEs need many more steps
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown:
        raise ConfigError(
            f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}"
        )
    if guidances and run.num_classes == 0:
        raise ConfigError("--guidances needs a class-conditional run")
    rows = []
    for name, nfe, grid, guidance in itertools.product(
        names, nfes, grids or [base.spacing], guidances or [base.guidance]
    ):
        steps = steps_for_nfe(name, nfe)
        scfg = dataclasses.replace(base, sampler=name, steps=steps, spacing=grid, guidance=guidance)
        row = {"sampler": name, "spacing": grid, "steps": steps, "nfe": nfe_of(name, steps)}
        if run.num_classes:
            row["guidance"] = guidance
        if toy:
            samples, timing = timed_samples(run, scfg, None)
            row.update(evaluate_toy(samples.numpy(), run.cfg.data.name), **timing)
        else:
            measured = evaluate_images_of(run, scfg, **image_eval)
            row.update({r["metric"]: r["value"] for r in measured})
            row["labels"] = {r["metric"]: r["label"] for r in measured}
            row.update({k: measured[0][k] for k in ("ms_per_sample", "peak_memory_mb")})
        rows.append(row)
        if progress:
            print(format_compare({"rows": [row]}, header=False))
    provenance = {
        "run": str(run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "ema": use_ema,
        "seed": base.seed,
        "n": base.n,
    }
    plot = charts.compare_plot(rows, run_dir / "plots" / "compare.png", _quality_keys(rows))
    return {"provenance": provenance, "rows": rows, "plot": str(plot)}


def _quality_keys(rows: list[dict]) -> list[str]:
    """The quality values of compare rows, main one first."""
    if "sliced_w2" in rows[0]:
        return ["sliced_w2"] + (["in_square"] if "in_square" in rows[0] else [])
    return list(rows[0]["labels"])


def format_compare(result: dict, header: bool = True) -> str:
    """One line per configuration, best first within each NFE budget."""
    rows = result["rows"]
    keys = _quality_keys(rows)
    sign = -1 if keys[0] in HIGHER_IS_BETTER else 1
    names = [rows[0].get("labels", {}).get(k, k) for k in keys]
    lines = []
    if header:
        lines.append(
            f"{'sampler':10s} {'grid':10s} {'NFE':>4s} {'guid':>5s} "
            + " ".join(f"{n:>14s}" for n in names)
            + f" {'ms/sample':>10s} {'peak MB':>8s}"
        )
    for row in sorted(rows, key=lambda r: (r["nfe"], sign * r[keys[0]])):
        guidance = f"{row['guidance']:5.2f}" if "guidance" in row else f"{'-':>5s}"
        lines.append(
            f"{row['sampler']:10s} {row['spacing']:10s} {row['nfe']:4d} {guidance} "
            + " ".join(f"{row[k]:14.4f}" for k in keys)
            + f" {row['ms_per_sample']:10.2f} {row['peak_memory_mb']:8.0f}"
        )
    if "plot" in result:
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    width = max(len(k) for k in result)
    lines = []
    for k, v in result.items():
        lines.append(f"{k:<{width}}  {v:.5f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def make_artefacts(run_dir: Path, progress: bool = True) -> dict:
    """Draw the run's sample artefacts and log its evaluation row; returns the evaluation."""
    cfg = RunConfig.load(run_dir / "config.json")
    if cfg.data.name not in TOY2D:
        result = make_image_artefacts(run_dir, progress)
        MetricsLog(run_dir / "metrics.jsonl").write({"eval": result})
        return result
    run = load_run(run_dir, use_ema=RunConfig.load(run_dir / "config.json").sample.use_ema)
    scfg = run.cfg.sample
    samples = draw_samples(run, scfg, progress=progress)
    step = run.step
    save_run_samples(run, samples, None, scfg)
    record_trajectories(run, run_dir, scfg)
    result = {
        "step": step,
        "eval": {
            **evaluate_toy(samples.numpy(), run.cfg.data.name),
            "sampler": scfg.sampler,
            "steps": scfg.steps,
            "ema": scfg.use_ema,
        },
    }
    MetricsLog(run_dir / "metrics.jsonl").write(result)
    return result["eval"]


def plot_run(run_dir: Path, resample: bool = False, progress: bool = True) -> list[Path]:
    """Every figure of a run, from its files; sample artefacts are drawn first if missing."""
    run_dir = check_run_dir(run_dir)
    cfg = RunConfig.load(run_dir / "config.json")
    if (
        resample
        or not (run_dir / "samples" / "samples.npz").exists()
        or not (run_dir / "samples" / "trajectory.npz").exists()
    ):
        make_artefacts(run_dir, progress)
    paths = (
        plot_image_run(run_dir, cfg) if cfg.data.name not in TOY2D else plot_toy_run(run_dir, cfg)
    )
    plots = run_dir / "plots"
    if any(r.get("loss") is not None for r in read_metrics(run_dir / "metrics.jsonl")):
        label = loss_label(cfg)
        paths += [
            charts.loss_curve(run_dir / "metrics.jsonl", plots / "loss.png", label),
            charts.loss_by_t(run_dir / "metrics.jsonl", plots / "loss_by_t.png", ylabel=label),
        ]
    history = charts.eval_history(run_dir / "metrics.jsonl", plots / "eval_history.png")
    if history:
        paths.append(history)
    return paths


def loss_label(cfg: RunConfig) -> str:
    """What the training loss measures, e.g. "loss (MSE of v)" or "loss (MSE of eps,
    min_snr-weighted in x0 space)", from the run's diffusion config."""
    d = cfg.diffusion
    text = f"loss ({d.loss.upper() if d.loss != 'huber' else 'Huber'} of {d.target or d.prediction}"
    return text + (f", {d.weighting}-weighted in x0 space)" if d.weighting != "none" else ")")


def finish_run(run_dir: Path, progress: bool = True) -> dict:
    """After training: sample, evaluate, draw every figure, and say where they are."""
    result = make_artefacts(run_dir, progress)
    paths = plot_run(run_dir, progress=progress)
    print(format_table(result))
    print(f"difflab: figures in {run_dir / 'plots'}:")
    for p in paths:
        print(f"  {p}")
    write_text_atomically(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result
