"""Figures for image diffusion, drawn from numpy arrays only (sample grids, noise, diversity).

Images are float arrays (N, C, H, W) in [-1, 1] with C = 1 (grey) or 3 (RGB). Values outside
[-1, 1] are clipped when drawn (noisy x_t leaves that range by design); NaN or inf is an error.
Each figure function writes one file (parents created) and returns its path. The denoising GIF
lives in `gifs.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.files import replace_atomically
from difflab.report.charts import _save  # one dpi and bbox for every figure
from difflab.report.figure import subplots

PAD = 2  # pixels between and around the images of a grid (as torchvision's make_grid)
PAD_VALUE = 255  # white, so black-background digits stay visibly separate


def check_images(images, name: str = "images") -> np.ndarray:
    """Validate an image batch and return it as float32 (N, C, H, W); raises ValueError."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        hint = " (grey images need a channel axis: images[:, None])" if x.ndim == 3 else ""
        raise ValueError(
            f"{name} must be (N, C, H, W) with N >= 1, C = 1 or 3; got {x.shape}{hint}"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def to_uint8(images) -> np.ndarray:
    """Map [-1, 1] to [0, 255]: clip, then round (x + 1) * 127.5 half up.

    Args:
        images: (N, C, H, W) floats, nominally in [-1, 1].
    Returns:
        (N, H, W, C) uint8; -1 -> 0, 0 -> 128, 1 -> 255.
    """
    x = np.clip(check_images(images), -1.0, 1.0)
    return np.floor((x + 1.0) * 127.5 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(images, nrow: int) -> Image.Image:
    """Tile images row by row, `nrow` per row, with a PAD-pixel white border around each.

    With cols = min(nrow, N) and rows = ceil(N / cols), the grid is
    (rows * (H + PAD) + PAD) pixels high and (cols * (W + PAD) + PAD) wide. Image i sits in
    (r, c) = divmod(i, cols), its top-left pixel at y = PAD + r * (H + PAD),
    x = PAD + c * (W + PAD). Cells past N stay border-coloured.

    Args:
        images: (N, C, H, W) in [-1, 1].
        nrow: images per row (torchvision's name), >= 1.
    Returns:
        mode 'L' for C = 1, 'RGB' for C = 3.
    """
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    pixels = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = pixels.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + PAD) + PAD, cols * (w + PAD) + PAD, c), PAD_VALUE, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = PAD + r * (h + PAD), PAD + col * (w + PAD)
        grid[y : y + h, x : x + w] = pixels[i]
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def _centres(count: int, size: int) -> np.ndarray:
    """imshow coordinates of the middles of `count` cells of `size` pixels along one grid axis."""
    return PAD + np.arange(count) * (size + PAD) + size / 2 - 0.5


def _figsize(
    grid: Image.Image, extra: tuple[float, float] = (0.0, 0.0), min_width: float = 2.0
) -> tuple[float, float]:
    # about three screen pixels per image pixel at the dpi of `_save` (120), at most 16 inches
    w, h = grid.size
    return (min(max(w / 40, min_width), 16.0) + extra[0], min(max(h / 40, 2.0), 16.0) + extra[1])


def _show(ax, grid: Image.Image, title: str | None = None) -> None:
    pixels = np.asarray(grid)
    cmap = "gray" if pixels.ndim == 2 else None
    ax.imshow(pixels, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)


def save_grid(images, path: Path, nrow: int | None = None) -> Path:
    """PNG of `image_grid(images, nrow)` at native resolution; nrow defaults to ceil(sqrt(N))."""
    x = check_images(images)
    grid = image_grid(x, nrow or math.ceil(math.sqrt(len(x))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: grid.save(tmp, format="PNG"))  # never half a PNG
    return path


def _class_rows(x: np.ndarray, labels: np.ndarray, per_class: int) -> tuple[np.ndarray, list, int]:
    """Cells (classes * cols, C, H, W), short rows padded white; the sorted classes; cols."""
    classes = sorted(np.unique(labels).tolist())
    per_class = min(per_class, max(int((labels == k).sum()) for k in classes))  # no empty column
    blank = np.ones((1, *x.shape[1:]), np.float32)  # +1 draws white, like the border
    cells = []
    for k in classes:
        members = x[labels == k][:per_class]
        cells += [members, np.repeat(blank, per_class - len(members), axis=0)]
    return np.concatenate(cells), classes, per_class


def class_grid(images, labels, path: Path, class_names=None, per_class: int = 10) -> Path:
    """One row per class present (sorted), up to `per_class` images each, labelled by name.

    Args:
        images: (N, C, H, W) in [-1, 1].
        labels: (N,) integer classes.
        class_names: optional sequence indexed by class; the class index is shown otherwise.
    """
    x = check_images(images)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(x):
        raise ValueError(f"labels has {len(labels)} entries for {len(x)} images")
    cells, classes, per_class = _class_rows(x, labels, per_class)
    grid = image_grid(cells, per_class)
    fig, ax = subplots(figsize=_figsize(grid, (0.8, 0.0)))
    _show(ax, grid)
    names = [str(class_names[k]) if class_names is not None else str(k) for k in classes]
    ax.set_yticks(_centres(len(classes), x.shape[2]), names, fontsize=8)
    ax.tick_params(length=0)
    return _save(fig, Path(path))


def forward_process_images(x0, noisy: list[tuple[float, np.ndarray]], path: Path) -> Path:
    """Images diffused to several t: rows are K examples, columns t (x0 itself first, t = 0).

    Args:
        x0: (K, C, H, W) clean images in [-1, 1].
        noisy: [(t, x_t (K, C, H, W))], e.g. from `viz.forward_samples`.
    """
    x0 = check_images(x0, "x0")
    columns = [(0.0, x0)] + [(t, check_images(x_t, f"x_t at t = {t}")) for t, x_t in noisy]
    if any(x_t.shape != x0.shape for _, x_t in columns):
        raise ValueError(f"every x_t must have the shape of x0 {x0.shape}")
    cells = np.stack([x_t for _, x_t in columns], axis=1)  # (K, T, C, H, W)
    grid = image_grid(cells.reshape(-1, *x0.shape[1:]), len(columns))
    fig, ax = subplots(figsize=_figsize(grid, (0.0, 0.4), min_width=0.8 * len(columns)))
    _show(ax, grid)
    ax.xaxis.tick_top()
    ax.set_xticks(_centres(len(columns), x0.shape[3]), [f"t = {t:.2f}" for t, _ in columns])
    ax.tick_params(length=0, labelsize=8)
    ax.set_title("forward process q(x_t | x_0)", fontsize=10, pad=18)
    return _save(fig, Path(path))


def trajectory_strip(xs, path: Path, columns: int = 10) -> Path:
    """K rows, each `columns` evenly spaced sampler states from x_T (left) to x_0 (right).

    Args:
        xs: (S + 1, K, C, H, W) states, xs[0] = x_T noise and xs[-1] the samples.
    """
    xs = np.asarray(xs, dtype=np.float32)
    if xs.ndim != 5:
        raise ValueError(f"xs must be (S + 1, K, C, H, W); got {xs.shape}")
    last = len(xs) - 1
    picks = sorted(set(np.linspace(0, last, min(columns, last + 1)).round().astype(int).tolist()))
    cells = check_images(xs[picks].swapaxes(0, 1).reshape(-1, *xs.shape[2:]), "xs")
    grid = image_grid(cells, len(picks))
    fig, ax = subplots(figsize=_figsize(grid, (0.0, 0.4), min_width=0.5 * len(picks)))
    _show(ax, grid)
    ax.xaxis.tick_top()
    ax.set_xticks(_centres(len(picks), xs.shape[4]), [f"{i}/{last}" for i in picks])
    ax.tick_params(length=0, labelsize=7)
    ax.set_title("sampler states, x_T to x_0 (step / steps)", fontsize=10, pad=16)
    return _save(fig, Path(path))


def comparison_figure(panels: dict[str, np.ndarray], path: Path, nrow: int | None = None) -> Path:
    """Grids side by side with titles, e.g. {"raw": ..., "EMA": ...} or {"DDPM": ..., "DDIM": ...}.

    Args:
        panels: title -> (N, C, H, W) in [-1, 1]; N may differ between panels.
        nrow: images per grid row; ceil(sqrt(N)) of each panel by default.
    """
    if not panels:
        raise ValueError("panels is empty")
    grids = {}
    for title, images in panels.items():
        x = check_images(images, f"panel {title!r}")
        grids[title] = image_grid(x, nrow or math.ceil(math.sqrt(len(x))))
    w, h = _figsize(max(grids.values(), key=lambda g: g.size[0] * g.size[1]))
    fig, axes = subplots(1, len(grids), figsize=(w * len(grids), h + 0.4), squeeze=False)
    for ax, (title, grid) in zip(axes[0], grids.items(), strict=True):
        _show(ax, grid, title)
    return _save(fig, Path(path))


def pixel_diversity(images) -> tuple[np.ndarray, float]:
    """Per-pixel variance across the batch, averaged over channels, and the mean per-pixel std.

    Args:
        images: (N, C, H, W); not clipped, so this measures the arrays as given.
    Returns:
        variance (H, W) with ddof = 0, and mean over pixels of sqrt(variance).
    """
    # shifted by the first image, so identical images give exactly 0 (np.var leaves ~1e-16)
    x = check_images(images).astype(np.float64)
    shifted = x - x[:1]
    variance = (shifted**2).mean(axis=0) - shifted.mean(axis=0) ** 2  # (C, H, W)
    variance = np.maximum(variance, 0.0).mean(axis=0)  # (H, W)
    return variance, float(np.sqrt(variance).mean())


def diversity_figure(images, path: Path, labels=None) -> Path:
    """Heat map of per-pixel variance across the batch; with labels, also one per class (<= 10).

    A collapsed sampler (the same image every time) shows an all-zero map. Every panel shares one
    colour scale so classes compare directly.

    Args:
        images: (N, C, H, W) in [-1, 1].
        labels: optional (N,) integer classes.
    """
    x = check_images(images)
    groups = [("all", x)]
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(x):
            raise ValueError(f"labels has {len(labels)} entries for {len(x)} images")
        groups += [(f"class {k}", x[labels == k]) for k in sorted(np.unique(labels).tolist())[:10]]
    maps = [(name, *pixel_diversity(members)) for name, members in groups]
    vmax = max(max(float(v.max()) for _, v, _ in maps), 1e-8)
    cols = min(len(maps), 6)
    rows = math.ceil(len(maps) / cols)
    fig, axes = subplots(rows, cols, figsize=(2.2 * cols + 0.6, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(maps) :]:
        ax.axis("off")
    for ax, (name, variance, mean_std) in zip(axes.flat, maps, strict=False):
        shown = ax.imshow(variance, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}: mean std {mean_std:.3f}", fontsize=8)
    fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8, label="per-pixel variance")
    return _save(fig, Path(path))


def grid_history(paths: list[tuple[int, Path]], path: Path, last: int = 6) -> Path:
    """The `last` sample grids saved during training, in step order, titled "step N".

    Args:
        paths: [(step, png path)], e.g. the grids `save_grid` wrote at each sampling interval.
    """
    if not paths:
        raise ValueError("grid_history needs at least one (step, png path)")
    chosen = sorted(paths, key=lambda item: item[0])[-last:]
    cols = min(len(chosen), 3)
    rows = math.ceil(len(chosen) / cols)
    fig, axes = subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (step, png) in zip(axes.flat, chosen, strict=False):
        with Image.open(png) as grid:
            _show(ax, grid.convert("RGB"), f"step {step}")
    fig.suptitle("samples during training", fontsize=10)
    return _save(fig, Path(path))
