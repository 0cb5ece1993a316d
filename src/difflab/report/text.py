"""Figures of a text model: a prompt grid (one row per prompt, the prompt as its caption) and a
denoising GIF per prompt (x_t over x0_hat, as the run's own denoising GIF)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from difflab.config import SampleConfig
from difflab.report import gifs, grids
from difflab.report.figure import subplots
from difflab.report.images import record_states, state_lams
from difflab.runs import LoadedRun


def prompt_grid(images, prompts: list[str], path: Path) -> Path:
    """One row per distinct prompt (in first-seen order), its images left to right.

    Args:
        images: (N, C, H, W) in [-1, 1].
        prompts: (N,) the prompt of each image.
    """
    x = grids.check_images(images)
    if len(prompts) != len(x):
        raise ValueError(f"{len(prompts)} prompts for {len(x)} images")
    rows = list(dict.fromkeys(prompts))
    members = [[i for i, p in enumerate(prompts) if p == row] for row in rows]
    per_row = max(len(m) for m in members)
    blank = np.full_like(x[:1], -1.0)
    cells = np.concatenate(
        [np.concatenate([x[m], np.repeat(blank, per_row - len(m), axis=0)]) for m in members]
    )
    grid = grids.image_grid(cells, per_row)
    width = 0.07 * max(len(r) for r in rows)  # inches of caption to the left
    fig, ax = subplots(figsize=grids._figsize(grid, (max(width, 0.8), 0.0)))
    grids._show(ax, grid)
    ax.set_yticks(grids._centres(len(rows), x.shape[2]), [r or '"" (null)' for r in rows])
    ax.tick_params(length=0, labelsize=8)
    return grids._save(fig, Path(path))


def slug(prompt: str) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "empty"


def prompt_gifs(
    run: LoadedRun,
    scfg: SampleConfig,
    prompts: list[str],
    folder: Path,
    prefix: str = "prompt",
    per_prompt: int = 8,
) -> list[Path]:
    """A denoising GIF per prompt: `per_prompt` samples of it, scfg's sampler and guidance."""
    paths = []
    for k, prompt in enumerate(prompts):
        cond = run.model.conditioner.prompts([prompt] * per_prompt)
        states = record_states(run, dataclasses.replace(scfg, n=per_prompt), cond)
        path = Path(folder) / f"{prefix}-denoising-{k:02d}-{slug(prompt)}.gif"
        paths.append(
            gifs.denoising_gif(
                states["ts"],
                states["xs"],
                states["x0_hats"],
                path,
                lams=state_lams(run.cfg, states["ts"]),
                steps=states["steps"],
            )
        )
    return paths
