"""2-D figures and the frame choice shared by every sampling GIF."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from difflab import build
from difflab.config import preset
from difflab.report import loss_label
from difflab.viz import log_axis
from difflab.viz_gifs import frame_indices


def toy2d_lams(steps: int = 1000) -> np.ndarray:
    """(steps + 1,) log-SNR of the toy2d preset's sampler grid, ending at +inf (t = 0)."""
    cfg = preset("toy2d")
    cfg.sample.steps = steps
    schedule = build.build_schedule(cfg.diffusion)
    _, _, ts = build.build_sampler(cfg.sample, schedule)
    return schedule.log_snr(ts).numpy()


def test_frames_are_uniform_in_log_snr_on_a_1000_step_grid():
    lams = toy2d_lams(1000)
    assert np.isinf(lams[-1])
    picks = frame_indices(lams, 60)
    assert picks[0] == 0 and picks[-1] == len(lams) - 1 and len(picks) <= 60
    assert (np.diff(picks) > 0).all()  # monotone in steps, so monotone in t
    gaps = np.diff(lams[picks[:-1]])  # the infinite end is shown, not spaced
    # the grid's own log-SNR steps near t = 0 are ~0.8 (8.4 -> 9.2), so a frame can miss its
    # target by up to half of one; the gaps' target is 19.3 / 58 = 0.33
    target = (lams[-2] - lams[0]) / 58
    assert np.all(np.abs(gaps - target) < 0.5 * target + 0.8)
    assert np.median(np.abs(gaps / target - 1)) < 0.1
    # structure forms mid-animation: frames reach log-SNR 2 about 2/3 of the way, where evenly
    # spaced steps reach it after 89% (see frame_indices)
    assert 0.55 < np.argmax(lams[picks] > 2) / len(picks) < 0.75


def test_few_states_are_all_shown_and_bad_input_is_refused():
    assert list(frame_indices(toy2d_lams(20), 60)) == list(range(21))
    with pytest.raises(ValueError, match="non-decreasing"):
        frame_indices([1.0, 0.0, 2.0], 10)
    with pytest.raises(ValueError, match=">= 2"):
        frame_indices([0.0, 1.0, 2.0], 1)


@pytest.mark.parametrize("low, high, at_least", [(0.3, 1.0, 5), (0.02, 1.5, 5), (1e-3, 10, 4)])
def test_log_axes_label_enough_ticks(low, high, at_least):
    fig, ax = plt.subplots()
    values = np.geomspace(low, high, 50)
    ax.plot(np.arange(50), values)
    log_axis(ax, values)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = [
        t.get_text()
        for t in ax.get_yticklabels()
        if t.get_text() and lo <= t.get_position()[1] <= hi
    ]
    plt.close(fig)
    assert len(labels) >= at_least, labels


def test_loss_label_says_what_is_measured():
    cfg = preset("toy2d")
    assert loss_label(cfg) == "loss (MSE of v)"
    cfg.diffusion.target, cfg.diffusion.weighting = "eps", "min_snr"
    assert loss_label(cfg) == "loss (MSE of eps, min_snr-weighted in x0 space)"
