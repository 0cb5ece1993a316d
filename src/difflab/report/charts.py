"""Figures and GIFs, drawn from the files of a run directory only (config, metrics, sample .npz).

Each function reads what it needs, writes one file, and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import ticker
from matplotlib.lines import Line2D

from difflab.errors import ConfigError
from difflab.evaluation.protocol import HIGHER_IS_BETTER
from difflab.files import replace_atomically
from difflab.report.figure import subplots
from difflab.training.logging import read_metrics

LIMITS = (-1.5, 1.5)  # data panels
NOISE_LIMITS = (-3.0, 3.0)  # panels that show noisy points


def _square_axes(ax, title: str | None = None, limits: tuple[float, float] = LIMITS) -> None:
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _scatter(ax, points: np.ndarray, color: str = "C0", size: float = 0.5) -> None:
    ax.scatter(
        points[:, 0], points[:, 1], s=size, c=color, alpha=0.5, linewidths=0, rasterized=True
    )


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".") or "png"  # a crash leaves the old figure or the new one
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format=fmt))
    return path


def real_vs_generated(
    real: np.ndarray, generated: np.ndarray, path: Path, titles: tuple[str, str]
) -> Path:
    """Two scatter panels: real points and generated points."""
    fig, axes = subplots(1, 2, figsize=(8, 4))
    for ax, pts, title, color in zip(axes, (real, generated), titles, ("C1", "C0"), strict=True):
        _scatter(ax, pts, color)
        _square_axes(ax, title)
    return _save(fig, path)


def scatter(points: np.ndarray, path: Path, title: str) -> Path:
    """One scatter panel of 2-D points (N, 2)."""
    return _save(scatter_figure(points, title), path)


def scatter_figure(points: np.ndarray, title: str | None = None, size: float = 0.5):
    """The Figure of `scatter`: one square panel of 2-D points (N, 2)."""
    fig, ax = subplots(figsize=(4, 4))
    _scatter(ax, points, "C0", size)
    _square_axes(ax, title)
    return fig


def forward_process(real: np.ndarray, noisy: list[tuple[float, np.ndarray]], path: Path) -> Path:
    """The data diffused to several t: panels of q(x_t | x0) samples."""
    panels = [(0.0, real), *noisy]
    fig, axes = subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (t, pts) in zip(axes, panels, strict=True):
        _scatter(ax, pts, "C1")
        _square_axes(ax, f"t = {t:.2f}", NOISE_LIMITS)
    fig.suptitle("forward process q(x_t | x_0)", fontsize=10)
    return _save(fig, path)


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential smoothing with bias correction (as TensorBoard's smoothing slider)."""
    out, acc = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def log_axis(ax, values: np.ndarray, axis: str = "y") -> None:
    """A log scale with enough labelled ticks: matplotlib labels only powers of ten, so a loss
    spanning one or two decades showed one or two labels. Under 1.5 decades every 1..9 x 10^k
    is labelled, under 4 decades 1, 2 and 5 x 10^k; plain numbers (0.05), not 5 x 10^-2."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    if not len(values):
        return
    decades = np.log10(values.max() / values.min())
    if decades >= 4:
        return
    subs = np.arange(1.0, 10.0) if decades < 1.5 else (1.0, 2.0, 5.0)
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(ticker.LogLocator(subs=subs))
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    target.set_minor_formatter(ticker.NullFormatter())


def loss_curve(metrics_path: Path, path: Path, ylabel: str = "loss") -> Path:
    """Training loss per logging interval, raw and smoothed, on a log scale."""
    rows = [r for r in read_metrics(metrics_path) if r.get("loss") is not None]
    if not rows:
        raise ConfigError(f"{metrics_path} has no loss rows yet")
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, color="C0", alpha=0.35, label="loss")
    ax.plot(steps, smooth(loss), color="C0", label="smoothed")
    log_axis(ax, loss)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def loss_by_t(metrics_path: Path, path: Path, curves: int = 4, ylabel: str = "loss") -> Path:
    """Loss per t-bucket at a few points of training."""
    rows = [r for r in read_metrics(metrics_path) if r.get("loss_by_t")]
    if not rows:
        raise ConfigError(f"{metrics_path} has no loss_by_t rows yet")
    picks = sorted({int(i) for i in np.linspace(0, len(rows) - 1, min(curves, len(rows)))})
    fig, ax = subplots(figsize=(6, 3.5))
    shown = []
    for k, i in enumerate(picks):
        values = np.array([np.nan if v is None else v for v in rows[i]["loss_by_t"]], dtype=float)
        shown.append(values)
        centres = (np.arange(len(values)) + 0.5) / len(values)
        ax.plot(
            centres,
            values,
            marker="o",
            color=matplotlib.colormaps["viridis"](k / max(len(picks) - 1, 1)),
            label=f"training step {rows[i]['step']}",
        )
    log_axis(ax, np.concatenate(shown))
    ax.set_xlabel("t (diffusion time, bucket centre; 0 = data, 1 = noise)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def trajectories(
    paths: np.ndarray,
    path: Path,
    *,
    background: np.ndarray | None = None,
    title: str = "sampler paths",
    line: str = "path",
    lw: float = 0.9,
) -> Path:
    """Paths of a few points from x_T (open circle) to x_0 (dot), over faint background points.

    Each path is coloured by the angle of its start, so neighbouring noise reads as neighbouring
    colour and one sees where each region of the prior is carried.

    Args:
        paths: (S + 1, K, 2) states, paths[0] = x_T, paths[-1] = the samples.
        background: optional (N, 2) points drawn faintly (the data).
        line: what the lines are, for the legend (e.g. "probability-flow ODE path").
        lw: line width (thinner for zig-zagging stochastic paths).
    """
    paths = np.asarray(paths, dtype=np.float32)
    fig, ax = subplots(figsize=(5.5, 5.5))
    if background is not None:
        _scatter(ax, background, "0.6", size=1.0)
    starts = paths[0]
    angle = np.arctan2(starts[:, 1], starts[:, 0]) / (2 * np.pi)
    colours = matplotlib.colormaps["hsv"](angle % 1.0)
    for k in range(paths.shape[1]):
        ax.plot(paths[:, k, 0], paths[:, k, 1], color=colours[k], lw=lw, alpha=0.85)
    ax.scatter(*starts.T, s=22, facecolors="white", edgecolors="k", linewidths=0.8, zorder=3)
    ax.scatter(*paths[-1].T, s=16, c=colours, edgecolors="k", linewidths=0.6, zorder=4)
    half = max(LIMITS[1], float(np.abs(paths).max()) * 1.05)
    _square_axes(ax, title, (-half, half))
    handles = [
        Line2D([], [], color="0.6", marker=".", ls="", label="data"),
        Line2D([], [], color="C0", lw=1, label=line),
        Line2D([], [], marker="o", mfc="white", mec="k", ls="", label="x_T (start: noise)"),
        Line2D([], [], marker="o", mfc="C0", mec="k", ls="", label="x_0 (end: sample)"),
    ]
    ax.legend(  # below the axes: inside, it hid points at the frame's edge
        handles=handles[background is None :],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=2,
        frameon=False,
    )
    return _save(fig, path)


FORWARD_TS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # the forward-process figures' times, 2-D and images


def forward_samples(
    schedule, real: np.ndarray, ts: tuple[float, ...], seed: int = 0
) -> list[tuple[float, np.ndarray]]:
    """q(x_t | x0) draws of `real` at each t (fixed noise): the one forward process both the
    2-D figure (`forward_process`) and the image strip (`grids.forward_process_images`) draw."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(real).float()
    out = []
    for t in ts:
        eps = torch.randn(x0.shape, generator=g)
        out.append((t, schedule.q_sample(x0, torch.full((len(x0),), t), eps).numpy()))
    return out


def compare_plot(rows: list[dict], path: Path, keys: list[str]) -> Path:
    """Each quality value in `keys` against model evaluations, one line per sampler, grid and
    guidance; for sliced W2 the dotted line is the true-vs-true floor."""
    panels = [
        (key, f"{key} ({'higher' if key in HIGHER_IS_BETTER else 'lower'} is better)")
        for key in keys
    ]
    fig, axes = subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)

    def line_of(r: dict) -> tuple:
        return r["sampler"], r["spacing"], r.get("guidance"), r.get("guidance_method")

    lines = sorted({line_of(r) for r in rows}, key=str)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for k, line in enumerate(lines):
            pts = sorted((r["nfe"], r[key]) for r in rows if line_of(r) == line)
            name = f"{line[0]} ({line[1]})" + (f" w={line[2]:g}" if line[2] is not None else "")
            name += f" {line[3]}" if line[3] else ""
            style = "-" if k < 10 else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=name)
        if key == "sliced_w2":
            floor = float(np.mean([r["sliced_w2_floor"] for r in rows]))
            ax.axhline(floor, color="k", ls=":", lw=1, label="floor (true vs true)")
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("sample quality against NFE")
    return _save(fig, path)


def tradeoff_plot(rows: list[dict], path: Path, fd_key: str, accuracy_key: str) -> Path:
    """Judge accuracy against Frechet distance, one curve per guidance method (and sampler and
    NFE), its points the guidance scales: the trade of accuracy for variety at a glance."""
    fig, ax = subplots(figsize=(6, 4.2))
    curve_of = lambda r: (r.get("guidance_method") or "cfg", r["sampler"], r["nfe"])  # noqa: E731
    for curve in sorted({curve_of(r) for r in rows}, key=str):
        pts = sorted(
            (r["guidance"], r[fd_key], r[accuracy_key]) for r in rows if curve_of(r) == curve
        )
        calls = sorted({r["net_calls"] for r in rows if curve_of(r) == curve and "net_calls" in r})
        label = f"{curve[0]} ({curve[1]}, {curve[2]} NFE"
        label += f", {'/'.join(f'{c:g}' for c in calls)} net calls)" if calls else ")"
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=label)
        for w, fd, accuracy in pts:
            ax.annotate(
                f"{w:g}", (fd, accuracy), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel(f"{fd_key} (lower is better)")
    ax.set_ylabel(f"{accuracy_key} (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("accuracy against Frechet distance, by guidance method (labels: scale)")
    return _save(fig, path)


def eval_history(metrics_path: Path, path: Path) -> Path | None:
    """The training-time metric (metrics.jsonl rows {"step", "eval": {"metric", ...}}) against
    step, with the best value marked; None when the run logged no such rows."""
    rows = [r for r in read_metrics(metrics_path) if "step" in r and "metric" in r.get("eval", {})]
    if not rows:
        return None
    metric = rows[-1]["eval"]["metric"]
    pts = [(r["step"], r["eval"][metric]) for r in rows if r["eval"]["metric"] == metric]
    steps, values = zip(*pts, strict=True)
    best = (max if metric in HIGHER_IS_BETTER else min)(range(len(values)), key=values.__getitem__)
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(steps, values, marker="o", ms=3)
    ax.plot(
        steps[best], values[best], "r*", ms=12, label=f"best: {values[best]:.4g} at {steps[best]}"
    )
    ax.set_xlabel("training step")
    ax.set_ylabel(rows[-1]["eval"].get("label", metric))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{metric} during training (EMA weights, fixed noise)")
    return _save(fig, path)


def posthoc_sweep_plot(rows: list[dict], path: Path, metric: str, best: dict) -> Path:
    """A post-hoc EMA sweep (`difflab ema --sweep`): `metric` against sigma_rel, the best one
    marked."""
    fig, ax = subplots(figsize=(6, 4))
    points = sorted((r["sigma_rel"], r["value"]) for r in rows)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3)
    ax.plot([best["sigma_rel"]], [best["value"]], marker="*", ms=12, color="C3", ls="none")
    ax.annotate(
        f"best {best['sigma_rel']:.3f}",
        (best["sigma_rel"], best["value"]),
        fontsize=7,
        xytext=(4, 4),
        textcoords="offset points",
    )
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    ax.set_xlabel("sigma_rel (post-hoc EMA length, EDM2)")
    ax.set_ylabel(f"{metric} ({better} is better)")
    ax.grid(alpha=0.3)
    ax.set_title("post-hoc EMA: quality against EMA length")
    return _save(fig, path)
