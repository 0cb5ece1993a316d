"""2-D figures and the frame choice shared by every sampling GIF."""

import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image, ImageSequence

from difflab import build
from difflab.cli import main
from difflab.config import apply_overrides, preset
from difflab.report import run as report
from difflab.report import toy as report_toy
from difflab.report.charts import log_axis
from difflab.report.gifs import LAM_WINDOW, _follow, frame_indices
from difflab.report.images import state_lams
from difflab.report.run import finish_run, loss_label
from difflab.samplers import SampleNoise
from difflab.training.loop import train

TINY = [
    "model.mlp.width=32",
    "model.mlp.depth=1",
    "train.steps=50",
    "train.batch_size=128",
    "train.log_every=10",
    "train.checkpoint_every=50",
    "sample.n=600",
]


def toy2d_lams(steps: int = 1000) -> np.ndarray:
    """(steps + 1,) log-SNR of the toy2d preset's sampler grid, ending at +inf (t = 0)."""
    cfg = preset("toy2d")
    cfg.sample.steps = steps
    schedule = build.build_schedule(cfg.diffusion)
    _, _, ts = build.build_sampler(cfg.sample, schedule)
    return schedule.log_snr(ts).numpy()


def test_frames_are_uniform_in_log_snr_on_a_1000_step_grid():
    lams = toy2d_lams(1000)
    assert np.isinf(lams[-1]) and lams[0] < LAM_WINDOW[0] and lams[-2] > LAM_WINDOW[1]
    picks = frame_indices(lams, 60)
    assert picks[0] == 0 and picks[-1] == len(lams) - 1 and len(picks) <= 60
    assert (np.diff(picks) > 0).all()  # monotone in steps, so monotone in t
    inner = lams[picks[1:-1]]  # x_T and the sample are shown on top of the spaced frames
    assert abs(inner[0] - LAM_WINDOW[0]) < 0.05 and abs(inner[-1] - LAM_WINDOW[1]) < 0.5
    gaps = np.diff(inner)
    # 58 targets over the window are 12 / 57 = 0.21 apart; the grid's own log-SNR steps near
    # t = 0 are up to ~0.5 (lams[-10:]), so a frame can miss its target by half of one there
    target = (LAM_WINDOW[1] - LAM_WINDOW[0]) / 57
    assert np.all(np.abs(gaps - target) < 0.5 * target + 0.3), gaps
    assert np.median(np.abs(gaps / target - 1)) < 0.1
    # structure forms mid-animation: frames reach log-SNR 2 well before the end, where evenly
    # spaced steps reach it after 89% (see frame_indices)
    assert 0.5 < np.argmax(lams[picks] > 2) / len(picks) < 0.65


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


def _run(tmp_path_factory, name: str, *sample) -> tuple:
    cfg = apply_overrides(preset("toy2d"), [*TINY, *sample])
    run_dir = tmp_path_factory.mktemp("runs") / name
    train(cfg, run_dir, progress=False)
    finish_run(run_dir, progress=False)
    return run_dir, cfg


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A stochastic sampler: the ODE paths come from DDIM with eta = 0."""
    return _run(tmp_path_factory, "ddpm", "sample.sampler=ddpm", "sample.steps=200")


def _npz(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_trajectories_start_at_the_prior_and_end_at_the_run_samples(ddpm_run):
    run_dir, cfg = ddpm_run
    traj = _npz(run_dir / "samples" / "trajectory.npz")
    samples = _npz(run_dir / "samples" / "samples.npz")["samples"]
    prior = SampleNoise(cfg.sample.seed, 0).randn((len(samples), 2), 0, "cpu").numpy()
    assert np.array_equal(traj["xs"][0], prior)  # x_T of sample k, whatever sampler follows
    assert np.allclose(traj["xs"][-1], samples, atol=1e-5)  # the run's own samples
    k = report_toy.ODE_POINTS
    assert traj["ode_xs"].shape == (report_toy.ODE_STEPS + 1, k, 2)
    assert str(traj["ode_sampler"]) == "ddim" and not bool(traj["ode_is_sampler"])
    assert np.array_equal(traj["ode_xs"][0], prior[:k])
    assert len(traj["ode_ts"]) == len(traj["ode_xs"]) and traj["ode_ts"][-1] == 0
    # the ODE is deterministic: the paths end where DDIM (eta = 0) sends the same noise
    assert np.abs(traj["ode_xs"][-1] - samples[:k]).max() > 1e-3  # not DDPM's samples


def test_reverse_gif_frames_are_monotone_and_uniform_in_log_snr(ddpm_run):
    run_dir, cfg = ddpm_run
    traj = _npz(run_dir / "samples" / "trajectory.npz")
    steps, lams = traj["steps"], state_lams(cfg, traj["ts"])
    assert steps[0] == 0 and steps[-1] == 200 and (np.diff(steps) > 0).all()
    assert len(steps) <= report_toy.GIF_FRAMES and len(steps) == len(traj["xs"])
    assert (np.diff(traj["ts"]) < 0).all() and np.isinf(lams[-1])
    gaps = np.diff(lams[1:-1])  # between x_T and the sample, spaced over LAM_WINDOW
    target = (LAM_WINDOW[1] - LAM_WINDOW[0]) / (len(gaps))
    assert np.median(np.abs(gaps / target - 1)) < 0.15, gaps
    with Image.open(run_dir / "plots" / "reverse.gif") as gif:
        frames = list(ImageSequence.Iterator(gif))
        assert len(frames) == len(steps) and gif.info["duration"] == 1000  # the last is held


def test_view_follows_the_cloud_and_only_zooms_in():
    rng = np.random.default_rng(0)
    scales = np.geomspace(3.0, 1.0, 20)  # a cloud shrinking from noise to data
    xs = rng.standard_normal((20, 500, 2)) * scales[:, None, None]
    centres, halves = _follow(xs)
    assert (np.diff(halves) <= 1e-9).all() and np.abs(centres).max() < 0.5
    assert 2.0 < halves[0] / halves[-1] < 4.0


def test_figures_rebuild_from_the_run_directory_alone(ddpm_run, monkeypatch, capsys):
    run_dir, _ = ddpm_run
    shutil.rmtree(run_dir / "plots")

    def no_model(*args, **kwargs):
        raise AssertionError("plotting must not load the model")

    monkeypatch.setattr(report, "load_run", no_model)
    monkeypatch.setattr(report_toy, "draw_samples", no_model)
    assert main(["plot", str(run_dir), "--quiet"]) == 0
    for name in (
        "trajectories.png",
        "trajectories_stochastic.png",
        "reverse.gif",
        "loss.png",
        "loss_by_t.png",
    ):
        assert (run_dir / "plots" / name).stat().st_size > 1000, name


def test_old_trajectory_files_still_plot(ddpm_run, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(ddpm_run[0], run_dir)
    shutil.rmtree(run_dir / "plots")
    traj = _npz(run_dir / "samples" / "trajectory.npz")
    every = 2  # what report.py wrote before issue 19: every k-th step, no step numbers
    ts = np.linspace(1.0, 0.005, 100)
    xs = np.repeat(traj["xs"][-1:], 101, axis=0) * np.append(ts, 0)[:, None, None] ** every
    np.savez(run_dir / "samples" / "trajectory.npz", ts=ts, xs=xs, x0_hats=xs[1:])
    report.plot_run(run_dir, progress=False)
    assert (run_dir / "plots" / "trajectories.png").stat().st_size > 1000
    assert not (run_dir / "plots" / "trajectories_stochastic.png").exists()
    with Image.open(run_dir / "plots" / "reverse.gif") as gif:
        assert 2 < sum(1 for _ in ImageSequence.Iterator(gif)) <= 60


def test_a_deterministic_sampler_is_its_own_ode(tmp_path_factory):
    run_dir, _ = _run(tmp_path_factory, "ddim", "sample.sampler=ddim", "sample.steps=20")
    traj = _npz(run_dir / "samples" / "trajectory.npz")
    samples = _npz(run_dir / "samples" / "samples.npz")["samples"]
    assert bool(traj["ode_is_sampler"]) and traj["ode_xs"].shape[0] == 21
    assert np.allclose(traj["ode_xs"][-1], samples[: report_toy.ODE_POINTS], atol=1e-5)
    assert len(traj["steps"]) == 21  # fewer states than frames: every step is kept
    assert not (run_dir / "plots" / "trajectories_stochastic.png").exists()
