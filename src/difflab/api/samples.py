"""What `Run.sample` and `Run.trajectory` return: samples with how they were drawn, shown as a
grid in Jupyter (`_repr_png_`), saved as a PNG grid or a `difflab sample` .npz."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflab.config import ConfigError
from difflab.files import replace_atomically
from difflab.report import charts, gifs, grids
from difflab.report.figure import figure_image, subplots
from difflab.runs import save_samples


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _save_png(image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))  # never half a PNG
    return path


@dataclass(repr=False)
class Samples:
    """Samples of a run: `tensor` (N, *shape) in [-1, 1] (points (N, 2), images (N, C, H, W)),
    `labels` (N,) of a class run, `prompts` (N) of a text run, `meta` what a samples .npz of
    `difflab sample` records (sampler, steps, nfe, seed, ema, checkpoint, guidance)."""

    tensor: torch.Tensor
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    meta: dict = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    @property
    def is_image(self) -> bool:
        return self.tensor.dim() == 4

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def images(self) -> list:
        """One PIL image per sample (mode L or RGB); image runs only."""
        if not self.is_image:
            raise ConfigError(
                "these samples are 2-D points, not images: use .tensor, or .grid() for a scatter"
            )
        from PIL import Image

        pixels = grids.to_uint8(self.tensor.numpy())  # (N, H, W, C)
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]

    def grid(self, nrow: int | None = None):
        """A PIL image: the images tiled `nrow` per row (default ceil(sqrt(N))), or for 2-D
        points one scatter panel."""
        x = self.tensor.numpy()
        if not self.is_image:
            sampler = f"{self.meta.get('sampler', '')} {self.meta.get('steps', '')}".strip()
            return figure_image(charts.scatter_figure(x, f"{len(x)} samples ({sampler})", 2.0))
        return grids.image_grid(x, nrow or math.ceil(math.sqrt(len(x))))

    def save(self, path: str | Path) -> Path:
        """Write the samples atomically: a .npz as `difflab sample --out` writes it (samples,
        labels, how they were drawn), or a PNG of `grid()` for any other suffix (.png)."""
        path = Path(path)
        if path.suffix == ".npz":
            labels = self.labels if self.prompts is None else None  # prompts go in as text
            return save_samples(path, self.tensor, labels, **self.meta)
        if path.suffix.lower() != ".png":
            raise ConfigError(f"Samples.save writes .png or .npz, got {path}")
        return _save_png(self.grid(), path)

    def _repr_png_(self) -> bytes:
        return _png(self.grid())

    def __repr__(self) -> str:
        kind = "x".join(map(str, self.tensor.shape[1:]))
        what = f"{len(self)} {'images' if self.is_image else 'points'} {kind}"
        how = f"{self.meta.get('sampler', '?')} {self.meta.get('steps', '?')} steps"
        how += f", seed {self.meta.get('seed', '?')}"
        if self.prompts is not None:
            how += f", {len(set(self.prompts))} prompt(s)"
        elif self.labels is not None:
            classes = sorted(set(self.labels.tolist()))
            how += f", classes {classes}" if len(classes) <= 4 else f", {len(classes)} classes"
        return f"Samples({what}, {how})"


@dataclass(repr=False)
class Trajectory:
    """A sampler's states for the first K samples: `ts` (S,) the start time of each step,
    `xs` (S + 1, K, *shape) from x_T to the samples, `x0_hats` (S, K, *shape) the denoiser's
    estimate at each step, `lams` (S + 1,) their log-SNR (frames of GIFs are spaced in it)."""

    ts: np.ndarray
    xs: np.ndarray
    x0_hats: np.ndarray
    lams: np.ndarray
    sampler: str
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()

    @property
    def is_image(self) -> bool:
        return self.xs.ndim == 5

    def gif(self, path: str | Path, max_frames: int = 50) -> Path:
        """An animated GIF: x_t over x0_hat for images (report's denoising GIF), the points
        moving from noise to data for 2-D runs (the reverse GIF)."""
        path = Path(path)
        if path.suffix.lower() != ".gif":
            raise ConfigError(f"a trajectory is saved as a .gif, got {path}")
        if self.is_image:
            names = list(self.class_names) or None
            return gifs.denoising_gif(
                self.ts, self.xs, self.x0_hats, path, self.labels, names, max_frames, lams=self.lams
            )
        return gifs.reverse_gif(
            self.ts, self.xs, path, lams=self.lams, max_frames=max_frames, name=self.sampler
        )

    def grid(self, frames: int = 8):
        """A PIL image of `frames` states (near-uniform in log-SNR): for images one row per
        sample, x_T on the left and the sample on the right; for points their paths."""
        picks = gifs.frame_indices(self.lams, max(frames, 2))
        if self.is_image:
            states = self.xs[picks].swapaxes(0, 1)  # (K, F, C, H, W)
            return grids.image_grid(states.reshape(-1, *states.shape[2:]), len(picks))
        fig, ax = subplots(figsize=(4, 4))
        paths = self.xs[:, :, :2]  # (S + 1, K, 2)
        ax.plot(paths[:, :, 0], paths[:, :, 1], lw=0.6, alpha=0.6, color="C0")
        ax.scatter(*paths[-1].T, s=6, color="C1", zorder=3)
        ax.set_aspect("equal")
        ax.set_title(f"{paths.shape[1]} paths, {self.sampler} {len(self.ts)} steps", fontsize=9)
        return figure_image(fig)

    def _repr_png_(self) -> bytes:
        return _png(self.grid())

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.xs.shape[2:]))
        return (
            f"Trajectory({self.xs.shape[1]} samples {shape}, {self.sampler} "
            f"{len(self.ts)} steps, {len(self.xs)} states)"
        )
