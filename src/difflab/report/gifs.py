"""GIFs of sampling: which states become frames, and x_t beside the model's x0_hat for images.

Arrays only, as in `viz_images.py`: images are (.., C, H, W) floats in [-1, 1], C = 1 or 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from difflab.files import replace_atomically
from difflab.report.figure import figure_image, subplots
from difflab.report.grids import PAD, check_images, image_grid

FRAME_MS = 80  # per sampler step shown
HOLD_MS = 1000  # the final frame rests ~1 s before the loop restarts
LEFT, TOP, BOTTOM = 48, 18, 16  # caption margins in screen pixels


# The log-SNR window GIF frames are spaced over: below -5 (alpha^2 < 0.7% on a VP schedule) x_t
# looks like the prior, above 7 (sigma / alpha < 0.03) like the sample, for data of unit scale.
# Spread over -10..9 (toy2d's grid), a third of the frames showed identical noise.
LAM_WINDOW = (-5.0, 7.0)


def save_gif(frames: list[Image.Image], path: Path) -> Path:
    """An animated GIF at `path`, FRAME_MS a frame and the last held HOLD_MS, looping; written
    atomically (a crash or Ctrl-C leaves the old GIF or the new one, never a truncated one)."""
    durations = [FRAME_MS] * (len(frames) - 1) + [HOLD_MS]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(
        path,
        lambda tmp: frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0
        ),
    )
    return path


def frame_indices(lams, max_frames: int, window: tuple[float, float] = LAM_WINDOW) -> np.ndarray:
    """Which of a sampler's states to show: at most `max_frames`, near-uniform in log-SNR.

    Spaced evenly in steps, most frames of a 1000-step DDPM show noise: on the linear schedule
    its log-SNR stays below 0 for three quarters of the steps, and structure (log-SNR ~ 2)
    forms in the last tenth. Spaced evenly in log-SNR over `window`, it forms across the
    middle. The first (x_T) and last (the sample) state are always shown; when there are no
    more states than frames, every state is shown (the sampler's own steps).

    Args:
        lams: (N,) log-SNR of each state, non-decreasing (noise to data); the last may be +inf
            (t = 0).
        max_frames: the most frames, >= 2.
        window: the log-SNR range the frames between the first and last are spaced over
            (clipped to the states' range; the whole range if they do not meet it).
    Returns:
        (F,) increasing state indices, F <= max_frames, starting at 0 and ending at N - 1.
    """
    lams = np.asarray(lams, dtype=np.float64).reshape(-1)
    if max_frames < 2:
        raise ValueError(
            f"max_frames must be >= 2 to show the first and last state; got {max_frames}"
        )
    if np.isnan(lams).any() or (np.diff(lams) < 0).any():
        raise ValueError("lams must be non-decreasing log-SNRs (noise to data), without NaN")
    if len(lams) <= max_frames:
        return np.arange(len(lams))
    spaced = lams if np.isfinite(lams[-1]) else lams[:-1]  # an infinite end is shown, not spaced
    lo, hi = max(spaced[0], window[0]), min(spaced[-1], window[1])
    if lo >= hi:
        lo, hi = spaced[0], spaced[-1]
    targets = np.linspace(lo, hi, max_frames - 2)  # the first and last states come on top
    right = np.clip(np.searchsorted(spaced, targets), 1, len(spaced) - 1)
    nearer_left = targets - spaced[right - 1] < spaced[right] - targets
    picks = np.where(nearer_left, right - 1, right)
    return np.unique(np.concatenate([[0], picks, [len(lams) - 1]]))


def _frame(
    x_t: np.ndarray,
    x0_hat: np.ndarray,
    caption: str,
    names: list[str] | None,
    scale: int,
    min_width: int,
) -> Image.Image:
    """One RGB frame: x_t on the top row, x0_hat below, K columns, upscaled by `scale`."""
    k, _, h, w = x_t.shape
    grid = image_grid(np.concatenate([x_t, x0_hat]), k).convert("RGB")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default()
    width = max(LEFT + grid.width, min_width)
    frame = Image.new("RGB", (width, TOP + grid.height + (BOTTOM if names else 0)), "white")
    frame.paste(grid, (LEFT, TOP))
    draw = ImageDraw.Draw(frame)
    draw.text((4, 3), caption, fill="black", font=font)
    for row, label in enumerate(("x_t", "x0_hat")):
        y = TOP + (PAD + row * (h + PAD) + h / 2) * scale
        draw.text((4, y - 6), label, fill="black", font=font)  # no anchors: bitmap fonts lack them
    for col, name in enumerate(names or []):
        draw.text((LEFT + (PAD + col * (w + PAD)) * scale, TOP + grid.height), name, "black", font)
    return frame


def _check_trajectory(ts, xs, x0_hats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ts = np.asarray(ts, dtype=np.float64).reshape(-1)
    xs, x0_hats = np.asarray(xs, np.float32), np.asarray(x0_hats, np.float32)
    steps = len(ts)
    if xs.ndim != 5 or len(xs) != steps + 1:
        raise ValueError(
            f"xs must be (S + 1, K, C, H, W) with S = len(ts) = {steps}; got {xs.shape}"
        )
    if x0_hats.shape != (steps, *xs.shape[1:]):
        want = (steps, *xs.shape[1:])
        raise ValueError(f"x0_hats must be (S, K, C, H, W) = {want}; got {x0_hats.shape}")
    check_images(xs.reshape(-1, *xs.shape[2:]), "xs")  # shape of each state, NaN
    check_images(x0_hats.reshape(-1, *xs.shape[2:]), "x0_hats")
    return ts, xs, x0_hats


def denoising_gif(
    ts,
    xs,
    x0_hats,
    path: Path,
    labels=None,
    class_names=None,
    max_frames: int = 50,
    scale: int = 4,
    lams=None,
    steps=None,
) -> Path:
    """Animated sampling: each frame shows x_t (top) and x0_hat (below) for K images.

    Frames are at most `max_frames` states, near-uniform in log-SNR when `lams` is given (see
    `frame_indices`), else evenly spaced; always the first (x_T) and the last (the samples,
    shown in both rows). The caption reads "step i/S  t=0.123"; the last frame is held ~1 s.
    Images are upscaled `scale` times, nearest-neighbour.

    Args:
        ts: (S,) start time of each step, in [0, 1]; the final state is t = 0.
        xs: (S + 1, K, C, H, W) states, xs[0] = x_T.
        x0_hats: (S, K, C, H, W) the denoiser's estimate of x0 at each step.
        labels: optional (K,) classes, written under each column (by name if class_names).
        lams: optional (S + 1,) log-SNR of each state, the last +inf where t = 0.
        steps: optional (S + 1,) sampler step of each state, for the caption (when only some
            of the sampler's steps were recorded); the last is the sampler's step count.
    """
    ts, xs, x0_hats = _check_trajectory(ts, xs, x0_hats)
    if max_frames < 2:
        raise ValueError(
            f"max_frames must be >= 2 to show the first and last state; got {max_frames}"
        )
    states = len(ts)
    if lams is None:
        picks = sorted(set(np.linspace(0, states, min(max_frames, states + 1)).round().astype(int)))
    else:
        if np.size(lams) != states + 1:
            raise ValueError(
                f"lams must have one log-SNR per state ({states + 1}); got {np.size(lams)}"
            )
        picks = frame_indices(lams, max_frames)
    steps = np.arange(states + 1) if steps is None else np.asarray(steps).reshape(-1)
    names = None
    if labels is not None:
        names = [str(class_names[y] if class_names is not None else y) for y in np.ravel(labels)]
    captions = [f"step {steps[i]}/{steps[-1]}  t={ts[i] if i < states else 0.0:.3f}" for i in picks]
    # every frame must have one size, so the widest caption sets the width
    font = ImageFont.load_default()
    min_width = max(int(font.getlength(caption)) for caption in captions) + 8
    frames = []
    for i, caption in zip(picks, captions, strict=True):
        x0_hat = x0_hats[i] if i < states else xs[-1]  # at the end the estimate is the sample
        frames.append(_frame(xs[i], x0_hat, caption, names, scale, min_width))
    return save_gif(frames, path)


def _follow(xs: np.ndarray, margin: float = 1.15) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame view of a 2-D cloud (F, K, 2): centres (F, 2) and half-widths (F,).

    Robust extents (0.5 and 99.5 percentiles, around the median) so a few stragglers do not
    set the view; the half-width never grows from one frame to the next (the view only zooms
    in, ending on the samples) and, like the centre, is smoothed over 5 frames so it glides.
    """
    centre = np.median(xs, axis=1)  # (F, 2)
    lo, hi = np.percentile(xs, 0.5, axis=1), np.percentile(xs, 99.5, axis=1)
    half = np.maximum(hi - centre, centre - lo).max(axis=1) * margin  # (F,)
    half = np.maximum.accumulate(half[::-1])[::-1]

    def glide(values: np.ndarray) -> np.ndarray:
        padded = np.concatenate([values[:1].repeat(2, 0), values, values[-1:].repeat(2, 0)])
        return np.stack([padded[k : k + len(values)] for k in range(5)]).mean(axis=0)

    return glide(centre), np.exp(glide(np.log(np.maximum(half, 1e-6))))


def _cloud_frame(points: np.ndarray, title: str, centre: np.ndarray, half: float) -> Image.Image:
    fig, ax = subplots(figsize=(4.5, 4.5), dpi=100)
    size = float(np.clip(8000 / len(points), 2.0, 12.0))  # ~4 px^2 for 2,000 points
    ax.scatter(*points.T, s=size, c="C0", alpha=0.5, linewidths=0)
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)  # the ticks show the zoom: x_T spans ~6, the data ~2
    ax.grid(alpha=0.25)
    ax.set_title(title, fontsize=9, family="monospace")
    fig.tight_layout()
    return figure_image(fig)


def reverse_gif(
    ts, xs, path: Path, *, lams=None, steps=None, max_frames: int = 60, name: str = ""
) -> Path:
    """2-D points moving from noise to data, the view following the cloud.

    Frames are chosen as in `denoising_gif` (near-uniform in log-SNR when `lams` is given), the
    caption reads "step i/S  t=0.123  log-SNR 1.2", and the last frame is held ~1 s.

    Args:
        ts: (S,) start time of each recorded step; the final state is t = 0.
        xs: (S + 1, K, 2) states, xs[0] = x_T, xs[-1] the samples.
        lams: optional (S + 1,) log-SNR of each state.
        steps: optional (S + 1,) sampler step of each state (the last = the sampler's steps).
        name: the sampler, put before the caption.
    """
    ts, xs = np.asarray(ts, dtype=np.float64).reshape(-1), np.asarray(xs, dtype=np.float32)
    if xs.ndim != 3 or xs.shape[2] != 2 or len(xs) != len(ts) + 1:
        raise ValueError(f"xs must be (S + 1, K, 2) with S = len(ts) = {len(ts)}; got {xs.shape}")
    if lams is None:
        picks = np.unique(np.linspace(0, len(ts), min(max_frames, len(xs))).round().astype(int))
    else:
        picks = frame_indices(lams, max_frames)
    steps = np.arange(len(xs)) if steps is None else np.asarray(steps).reshape(-1)
    centres, halves = _follow(xs[picks])
    frames = []
    for i, centre, half in zip(picks, centres, halves, strict=True):
        caption = f"{name} step {steps[i]}/{steps[-1]}  t={ts[i] if i < len(ts) else 0.0:.3f}"
        if lams is not None:
            caption += f"  log-SNR {lams[i]:.1f}" if np.isfinite(lams[i]) else "  (sample)"
        frames.append(_cloud_frame(xs[i], caption.strip(), centre, half))
    return save_gif(frames, path)
