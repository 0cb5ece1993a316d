"""report.grids and report.gifs on synthetic gradients: sizes, pixels, files, frames, errors."""

import math

import numpy as np
import pytest
from PIL import Image, ImageSequence

from difflab.report import grids as report_grids
from difflab.report.gifs import denoising_gif, frame_indices
from difflab.report.grids import (
    PAD,
    check_images,
    class_grid,
    comparison_figure,
    diversity_figure,
    forward_process_images,
    grid_history,
    image_grid,
    pixel_diversity,
    save_grid,
    to_uint8,
    trajectory_strip,
)


def gradients(n: int = 8, channels: int = 1, size: int = 16) -> np.ndarray:
    """(n, channels, size, size) linear ramps in [-1, 1], image k pointing at angle 2 pi k / n."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    angles = 2 * np.pi * np.arange(n) / n
    ramps = (np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy) / math.sqrt(2)
    signs = (-1.0) ** np.arange(channels)  # channels differ, so RGB is not grey
    return (ramps[:, None] * signs[None, :, None, None]).astype(np.float32)


def trajectory(steps: int, k: int = 3, channels: int = 1):
    """ts (S,), xs (S + 1, K, C, H, W) fading noise into gradients, x0_hats (S, K, C, H, W)."""
    x0 = gradients(k, channels)
    noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    ts = np.linspace(1.0, 0.0, steps + 1)
    xs = np.stack([(1 - t) * x0 + t * noise for t in ts])
    return ts[:-1], xs, np.repeat(x0[None], steps, axis=0)


def test_to_uint8_endpoints_and_clipping():
    x = np.array([-1.0, 0.0, 1.0, -1.5, 3.0, 0.5]).reshape(1, 1, 1, 6)
    # (x + 1) * 127.5 rounded half up: 0, 127.5 -> 128, 255; clipped ends; 191.25 -> 191
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 0, 255, 191]
    assert to_uint8(gradients(2, 3)).shape == (2, 16, 16, 3)
    assert to_uint8(gradients(2, 3)).dtype == np.uint8


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_image_grid_size_and_placement(channels, mode):
    images = gradients(8, channels)  # 8 images, 3 per row -> 3 rows, last one short
    grid = image_grid(images, nrow=3)
    # width = cols * (W + PAD) + PAD, height = rows * (H + PAD) + PAD
    assert grid.mode == mode
    assert grid.size == (3 * (16 + PAD) + PAD, 3 * (16 + PAD) + PAD) == (56, 56)
    pixels = np.asarray(grid).reshape(56, 56, channels)
    expected = to_uint8(images)
    np.testing.assert_array_equal(pixels[PAD : PAD + 16, PAD : PAD + 16], expected[0])
    y, x = PAD + 1 * (16 + PAD), PAD + 2 * (16 + PAD)  # image 5 = row 1, column 2
    np.testing.assert_array_equal(pixels[y : y + 16, x : x + 16], expected[5])
    assert (pixels[:PAD] == 255).all() and (pixels[:, :PAD] == 255).all()  # white border
    assert (pixels[-18:, -18:] == 255).all()  # the ninth cell is empty
    assert image_grid(images, nrow=20).size == (8 * 18 + PAD, 18 + PAD)  # one row of 8


def test_class_rows_pads_short_classes():
    labels = np.array([5, 2, 0, 2, 2, 2])
    cells, classes, cols = report_grids._class_rows(gradients(6), labels, per_class=3)
    assert classes == [0, 2, 5] and cols == 3 and cells.shape == (9, 1, 16, 16)
    assert (cells[1:3] == 1).all() and (cells[7:] == 1).all()  # white fill after 1 image
    np.testing.assert_array_equal(cells[3:6], gradients(6)[[1, 3, 4]])  # first 3 of class 2
    _, _, cols = report_grids._class_rows(gradients(6), labels, per_class=10)
    assert cols == 4  # no column is empty in every row


@pytest.mark.parametrize("channels", [1, 3])
def test_every_function_writes_a_png(tmp_path, channels):
    images, labels = gradients(8, channels), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    noise = np.random.default_rng(1).standard_normal(images[:3].shape).astype(np.float32)
    noisy = [(t, math.sqrt(1 - t) * images[:3] + math.sqrt(t) * noise) for t in (0.25, 0.5, 1.0)]
    grids = [
        (s, save_grid(images * (s / 300), tmp_path / f"grid_{s}.png")) for s in (100, 200, 300)
    ]
    _, xs, _ = trajectory(12, channels=channels)
    written = [
        *(png for _, png in grids),
        class_grid(images, labels, tmp_path / "a" / "classes.png", class_names=["x", "y", "z"]),
        class_grid(images, labels, tmp_path / "classes_index.png", per_class=2),
        forward_process_images(images[:3], noisy, tmp_path / "forward.png"),
        trajectory_strip(xs, tmp_path / "strip.png", columns=5),
        comparison_figure({"raw": images, "EMA": -images[:4]}, tmp_path / "compare.png"),
        diversity_figure(images, tmp_path / "diversity.png"),
        diversity_figure(images, tmp_path / "diversity_by_class.png", labels=labels),
        grid_history(grids, tmp_path / "history.png"),
    ]
    for path in written:
        assert path.is_file() and path.stat().st_size > 0, path
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 16
    with Image.open(grids[0][1]) as image:  # save_grid: ceil(sqrt(8)) = 3 per row, native size
        assert image.size == (56, 56)


@pytest.mark.parametrize("steps, max_frames, expected", [(20, 50, 21), (30, 7, 7)])
def test_denoising_gif_frames(tmp_path, steps, max_frames, expected):
    ts, xs, x0_hats = trajectory(steps, k=3, channels=3)
    path = denoising_gif(
        ts,
        xs,
        x0_hats,
        tmp_path / "gif" / "denoise.gif",
        labels=[0, 1, 2],
        class_names=["zero", "one", "two"],
        max_frames=max_frames,
        scale=2,
    )
    with Image.open(path) as gif:
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
        assert gif.info["duration"] == 1000  # the last frame read is the one held
    assert len(frames) == expected
    assert len({frame.size for frame in frames}) == 1
    assert frames[0].width >= 3 * (16 + PAD) * 2  # upscaled by `scale`
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[-1]))


def test_diversity_known_cases(tmp_path, monkeypatch):
    variance, mean_std = pixel_diversity(np.repeat(gradients(1, 3), 5, axis=0))
    assert variance.shape == (16, 16) and (variance == 0).all() and mean_std == 0.0
    # channel 0 is -1 or +1 (variance 1), channels 1 and 2 constant: mean over channels 1/3
    images = np.zeros((4, 3, 8, 8), np.float32)
    images[:, 0] = np.array([-1, 1, -1, 1])[:, None, None]
    variance, mean_std = pixel_diversity(images)
    np.testing.assert_allclose(variance, 1 / 3, rtol=1e-6)
    assert mean_std == pytest.approx(math.sqrt(1 / 3))  # 0.577
    titles = []

    def capture(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        return original(fig, path)

    original = report_grids._save
    monkeypatch.setattr(report_grids, "_save", capture)
    diversity_figure(images, tmp_path / "d.png", labels=[0, 0, 1, 1])
    assert titles == ["all: mean std 0.577", "class 0: mean std 0.577", "class 1: mean std 0.577"]


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"channel axis"):
        to_uint8(np.zeros((8, 16, 16)))
    with pytest.raises(ValueError, match=r"C = 1 or 3"):
        save_grid(np.zeros((8, 2, 16, 16)), tmp_path / "g.png")
    bad = gradients(4)
    bad[2, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN"):
        image_grid(bad, nrow=2)
    assert check_images(gradients(2) * 3).max() > 1  # out of range is fine: clipped when drawn
    with pytest.raises(ValueError, match=r"labels has 3 entries for 8 images"):
        class_grid(gradients(8), [0, 1, 2], tmp_path / "c.png")
    ts, xs, x0_hats = trajectory(5)
    with pytest.raises(ValueError, match=r"S = len\(ts\) = 4"):
        denoising_gif(ts[:4], xs, x0_hats, tmp_path / "d.gif")
    with pytest.raises(ValueError, match=r"x0_hats must be"):
        denoising_gif(ts, xs, x0_hats[:3], tmp_path / "d.gif")
    with pytest.raises(ValueError, match=r"at least one"):
        grid_history([], tmp_path / "h.png")


def test_denoising_gif_spaces_frames_by_log_snr(tmp_path):
    ts, xs, x0_hats = trajectory(40, k=2)
    alpha = np.maximum(1 - ts, 1e-4)  # alpha = 1 - t, sigma = t; alpha(1) = 0 kept finite
    lams = np.append(np.log((alpha / ts) ** 2), np.inf)
    path = denoising_gif(ts, xs, x0_hats, tmp_path / "d.gif", max_frames=8, lams=lams)
    with Image.open(path) as gif:
        count = sum(1 for _ in ImageSequence.Iterator(gif))
    assert count == len(frame_indices(lams, 8)) and count <= 8
    with pytest.raises(ValueError, match="one log-SNR per state"):
        denoising_gif(ts, xs, x0_hats, tmp_path / "e.gif", lams=lams[:-1])
