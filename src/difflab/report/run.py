"""A run's report: the sample artefacts, the 2-D metrics and every figure, all under the run dir.

`finish_run` is what `difflab train` does after training; `plot_run` is `difflab plot`. Figures
are drawn from files only (config.json, metrics.jsonl, samples/*.npz), so they can be rebuilt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from difflab.config import RunConfig
from difflab.evaluation.compare import quality_keys
from difflab.evaluation.reconstruction import feature_judge
from difflab.evaluation.sampled import TrainingEvaluator, sampling_provenance
from difflab.evaluation.toy2d import evaluate_toy
from difflab.files import write_text_atomically
from difflab.model import RunKind
from difflab.report import charts, grids
from difflab.report.attention import make_attention_artefacts, plot_attention
from difflab.report.consistency import consistency_figures
from difflab.report.few_step import few_step_figures
from difflab.report.html import write_report
from difflab.report.images import make_image_artefacts, plot_image_run
from difflab.report.latent import make_autoencoder_artefacts, plot_autoencoder_run
from difflab.report.toy import plot_toy_run, record_trajectories
from difflab.runs import (
    check_run_dir,
    draw_samples,
    is_weights_file,
    load_run,
    run_kind,
    save_run_samples,
)
from difflab.training.hooks import Hooks
from difflab.training.logging import MetricsLog, read_metrics


def training_hooks() -> Hooks:
    """difflab's training-time evaluator and sample grids, for train(..., hooks=...)."""
    return Hooks(evaluator=TrainingEvaluator, grid=draw_grid, judge=feature_judge)


def draw_grid(samples, path: Path, model) -> Path:
    """samples/grid-step-N.png: an image grid (a row per class) or a 2-D scatter."""
    if model.kind.is_image:
        return grids.save_grid(samples, path, nrow=model.kind.num_classes or None)
    return charts.scatter(samples, path, path.stem.replace("grid-", "").replace("-", " "))


def plot_compare(result: dict, run_dir: Path, out: Path | None = None) -> dict:
    """RUN/plots/compare.png of an `eval --compare` result, or OUT.png beside the JSON `out`
    when the run is a weights file (nothing written into the package); returns the result with
    its "plot" (None when there is nowhere to draw it)."""
    rows = result["rows"]
    if is_weights_file(run_dir):
        if out is None:
            return {**result, "plot": None}
        compare, tradeoff = out.with_suffix(".png"), out.with_name(f"{out.stem}_tradeoff.png")
    else:
        compare, tradeoff = run_dir / "plots" / "compare.png", None
    plot = charts.compare_plot(rows, compare, quality_keys(rows))
    fd = next((k for k in ("fd_judge", "fid") if k in rows[0]), None)
    if "guidance_method" in rows[0] and fd and "accuracy" in rows[0]:  # --guidance-methods
        path = tradeoff or run_dir / "plots" / "guidance_tradeoff.png"
        tradeoff = charts.tradeoff_plot(rows, path, fd, "accuracy")
        return {**result, "plot": str(plot), "tradeoff_plot": str(tradeoff)}
    return {**result, "plot": str(plot)}


def format_table(result: dict) -> str:
    width = max(len(k) for k in result)
    lines = []
    for k, v in result.items():
        lines.append(f"{k:<{width}}  {v:.5f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """What the report of one kind of run draws: `make(run_dir, progress)` writes the sample
    artefacts `files` (under samples/) and returns the evaluation, `plot(run_dir, cfg)` draws the
    figures from them."""

    make: Callable[[Path, bool], dict]
    plot: Callable[[Path, RunConfig], list[Path]]
    files: tuple[str, ...]


def report_of(kind: RunKind, net: str = "") -> Report:
    """The report of a run of `kind` with the network `net` (model.name): an autoencoder's
    reconstructions, or samples of images (with a transformer's attention maps) or of points
    (the one place that dispatches on the kind of run)."""
    if kind.autoencoder:  # codec, reconstructions
        return Report(
            _logged(make_autoencoder_artefacts),
            lambda run_dir, cfg: plot_autoencoder_run(run_dir),
            ("reconstructions.npz",),
        )
    if kind.is_image and net == "dit":  # the image report, plus attention maps
        return Report(
            _with_attention(_logged(make_image_artefacts)),
            lambda run_dir, cfg: [*plot_image_run(run_dir, cfg), *plot_attention(run_dir)],
            ("samples.npz", "trajectory.npz", "attention.npz"),
        )
    if kind.is_image:
        return Report(
            _logged(make_image_artefacts), plot_image_run, ("samples.npz", "trajectory.npz")
        )
    return Report(make_toy_artefacts, plot_toy_run, ("samples.npz", "trajectory.npz"))


def _logged(make: Callable[[Path, bool], dict]) -> Callable[[Path, bool], dict]:
    """`make`, which also writes the evaluation it returns as a row of metrics.jsonl."""

    def make_and_log(run_dir: Path, progress: bool = True) -> dict:
        result = make(run_dir, progress)
        MetricsLog(run_dir / "metrics.jsonl").write({"eval": result})
        return result

    return make_and_log


def _with_attention(make: Callable[[Path, bool], dict]) -> Callable[[Path, bool], dict]:
    """`make`, followed by samples/attention.npz of one sample (report/attention.py)."""

    def make_both(run_dir: Path, progress: bool = True) -> dict:
        result = make(run_dir, progress)
        make_attention_artefacts(run_dir)
        return result

    return make_both


def make_artefacts(run_dir: Path, progress: bool = True) -> dict:
    """Draw the run's sample artefacts and log its evaluation row; returns the evaluation."""
    net = RunConfig.load(check_run_dir(run_dir) / "config.json").model.name
    return report_of(run_kind(run_dir), net).make(run_dir, progress)


def make_toy_artefacts(run_dir: Path, progress: bool = True) -> dict:
    """A 2-D run's samples, trajectories and evaluation row; returns the evaluation."""
    run = load_run(run_dir)  # the weights its sample.use_ema names
    scfg = run.cfg.sample
    samples = draw_samples(run, scfg, progress=progress)
    step = run.step
    save_run_samples(run, samples, None, scfg)
    record_trajectories(run, run_dir, scfg)
    conditional = run.model.kind.conditional
    result = {
        "step": step,
        "eval": {
            **evaluate_toy(samples.numpy(), run.cfg.data.name),
            **sampling_provenance(run, scfg, conditional),  # as image rows: nfe, seed, ...
        },
    }
    MetricsLog(run_dir / "metrics.jsonl").write(result)
    return result["eval"]


def plot_run(
    run_dir: Path, resample: bool = False, progress: bool = True, report: bool = True
) -> list[Path]:
    """Every figure of a run, from its files (sample artefacts are drawn first if missing),
    and with `report` the page RUN/report.html that holds them all."""
    run_dir = check_run_dir(run_dir)
    cfg, kind = RunConfig.load(run_dir / "config.json"), run_kind(run_dir)
    of_kind = report_of(kind, cfg.model.name)
    if resample or not all((run_dir / "samples" / name).exists() for name in of_kind.files):
        of_kind.make(run_dir, progress)
    paths = of_kind.plot(run_dir, cfg)
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
    if kind.consistency:  # curriculum, student beside teacher
        paths += consistency_figures(run_dir, cfg, kind, resample)
    if kind.second_time:  # MeanFlow, shortcut: 1, 2, 4, 8 steps from the same noise
        paths += few_step_figures(run_dir, kind, resample)
    if report:
        paths.append(write_report(run_dir))
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
    paths = plot_run(run_dir, progress=progress, report=False)
    print(format_table(result))
    print(f"difflab: figures in {run_dir / 'plots'}:")
    for p in paths:
        print(f"  {p}")
    write_text_atomically(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    print(f"difflab: report {write_report(run_dir)}")  # after eval.json, which it shows
    return result
