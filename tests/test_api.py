"""The Python API (difflab.load / difflab.train / Run.sample): the CLI's numbers, the run's own
sampling settings, short reprs, PNG display, round trips and one-line refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import difflab
from difflab import build
from difflab.api import Run
from difflab.cli import main
from difflab.config import ConfigError, apply_overrides, preset
from difflab.model import DataKind
from difflab.runs import LoadedRun

FAST = dict(
    train__steps=40,
    train__batch_size=128,
    train__log_every=10,
    train__checkpoint_every=20,
    sample__sampler="ddim",  # not SampleConfig's default (ddpm, 1000 steps): the run's own
    sample__steps=7,
    sample__n=200,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return difflab.train("toy2d", name="r", runs=runs, progress=False, **FAST)


def test_train_gives_the_cli_run_directory(run):
    """figures, report and samples as `difflab train` leaves them; the overrides applied"""
    for name in ("config.json", "report.html", "plots/scatter.png", "samples/samples.npz"):
        assert (run.path / name).is_file(), name
    assert run.step == 40 and run.cfg.train.steps == 40 and run.cfg.sample.steps == 7


def test_sample_equals_difflab_sample_bit_for_bit(run, tmp_path):
    out = tmp_path / "cli.npz"
    argv = ["sample", str(run.path), "--n", "24", "--steps", "5", "--seed", "3", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    samples = run.sample(24, steps=5, seed=3, progress=False)
    with np.load(out) as f:
        assert np.array_equal(f["samples"], samples.tensor.numpy())
        assert str(f["sampler"]) == samples.meta["sampler"] == "ddim"
    assert samples.tensor.shape == (24, 2)


def test_sample_starts_from_the_run_settings(run):
    samples = run.sample(8, progress=False)
    assert (samples.meta["sampler"], samples.meta["steps"]) == ("ddim", 7)
    assert samples.meta["seed"] == run.cfg.sample.seed
    other = run.sample(8, sampler="ddpm", steps=3, progress=False)
    assert (other.meta["sampler"], other.meta["steps"]) == ("ddpm", 3)
    # the same draw through Model.sample with the run's config: only n changed
    scfg = dataclasses.replace(run.cfg.sample, n=8)
    assert torch.equal(samples.tensor, run.model.sample(scfg))


def test_save_round_trips(run, tmp_path):
    samples = run.sample(10, seed=5, progress=False)
    path = samples.save(tmp_path / "s.npz")
    with np.load(path) as f:
        assert np.array_equal(f["samples"], samples.tensor.numpy())
        assert int(f["seed"]) == 5 and int(f["steps"]) == 7
    png = samples.save(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]  # no temporaries
    with pytest.raises(ConfigError, match=r"\.png or \.npz"):
        samples.save(tmp_path / "s.jpg")


def test_reprs_are_one_short_line(run):
    samples = run.sample(4, progress=False)
    trajectory = run.trajectory(3, steps=4)
    for text in (repr(run), repr(samples), repr(trajectory)):
        assert "\n" not in text and len(text) < 200, text
    assert "'r'" in repr(run) and "step 40" in repr(run) and "unconditional" in repr(run)
    assert repr(samples).startswith("Samples(4 points")


def test_notebook_display_is_png(run):
    samples = run.sample(4, progress=False)
    for obj in (samples, run.trajectory(2, steps=4)):
        assert obj._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="not images"):
        samples.images  # noqa: B018 - 2-D points have no images


def test_trajectory_ends_at_the_samples(run, tmp_path):
    """the recorded path of sample i ends where sample(...)[i] is (noise keyed by index)"""
    trajectory = run.trajectory(3, steps=4, seed=2)
    assert trajectory.xs.shape == (5, 3, 2) and trajectory.x0_hats.shape == (4, 3, 2)
    samples = run.sample(6, steps=4, seed=2, progress=False)
    # a batch of 3 against one of 6: the same arithmetic up to the BLAS kernel's blocking
    assert np.allclose(trajectory.xs[-1], samples.tensor[:3].numpy(), atol=1e-5)
    assert np.array_equal(trajectory.xs[-1], run.sample(3, steps=4, seed=2).tensor.numpy())
    gif = run.gif(tmp_path / "t.gif", 3, steps=4)
    assert gif.read_bytes()[:6] == b"GIF89a"


def test_load_weights_file_samples_as_the_run(run, tmp_path):
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(run.path), "--format", "ema", "--out", str(out)]) == 0
    light = difflab.load(out)
    assert light.step == run.step and light.name == "ema"
    a, b = light.sample(8, progress=False), run.sample(8, progress=False)
    assert torch.allclose(a.tensor, b.tensor, atol=0.05)  # fp16 weights, upcast


def test_the_weights_are_chosen_at_load_and_a_contrary_use_ema_is_refused(run):
    """A Run holds one set of weights: use_ema naming the other one cannot be honoured by a
    sample call (it would draw from the loaded weights and say so), so it is refused."""
    raw = difflab.load(run.path, raw=True)
    assert (run.loaded.ema, raw.loaded.ema) == (True, False)
    a, b = run.sample(8, use_ema=True, progress=False), raw.sample(8, use_ema=False, progress=False)
    assert (a.meta["ema"], b.meta["ema"]) == (True, False)
    assert not torch.equal(a.tensor, b.tensor)  # 40 steps of EMA lag behind the raw weights
    with pytest.raises(ConfigError, match=r"holds the EMA weights.*raw=True") as caught:
        run.sample(8, use_ema=False, progress=False)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"holds the raw weights.*raw=False"):
        raw.trajectory(4, use_ema=True)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda run: difflab.load(run.path.parent / "missing"), "does not exist"),
        (lambda run: run.sample(4, label=3), "no classes"),
        (lambda run: run.sample(4, prompt="a seven"), "not trained on text"),
        (lambda run: run.sample(0), "n must be >= 1"),
        (lambda run: run.sample(4, sampler="nope"), "nope"),
        (lambda run: run.sample(4, stepz=3), "unknown sampling option"),
        (lambda run: difflab.train("nope"), "unknown preset"),
        (lambda run: difflab.train("toy2d", steps=3), "section__key"),
        (lambda run: difflab.train("toy2d", train__stepz=3), "no such config key"),
    ],
)
def test_bad_input_is_one_config_error(run, call, message):
    with pytest.raises(ConfigError, match=message) as caught:
        call(run)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """An untrained 2-D model of 3 classes (no data set has 2-D classes): requests only."""
    sets = ["data.class_conditional=true", "sample.sampler=ddim", "sample.steps=3"]
    cfg = apply_overrides(preset("toy2d"), sets)
    model = build.build_model(cfg, DataKind((2,), 3, ("a", "b", "c")))
    model.net.eval().requires_grad_(False)
    path = tmp_path_factory.mktemp("class") / "c"
    return Run(LoadedRun(path, path, cfg, model, step=0))


def test_class_requests_are_the_cli_requests(class_run):
    assert "3 classes" in repr(class_run)
    assert class_run.sample(4, label=2, progress=False).labels.tolist() == [2] * 4
    per_class = class_run.sample(6, per_class=True, progress=False)
    assert per_class.labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match=r"out of range; this model has classes 0\.\.2"):
        class_run.sample(4, label=3)
    with pytest.raises(ConfigError, match="not trained on text"):
        class_run.sample(4, prompt="a seven")
    with pytest.raises(ConfigError, match="multiple of the 3 classes"):
        class_run.sample(4, per_class=True)


def test_editing_equals_difflab_sample_and_keeps_known_values(tmp_path):
    """SDEdit and RePaint through Run.sample: the CLI's numbers for the same settings, and the
    known coordinates back bit for bit"""
    toy = difflab.load("pretrained:toy2d", device="cpu")
    points = torch.linspace(-0.9, 0.9, 12).reshape(6, 2)
    keep = torch.tensor([[1.0, 0.0]]).expand(6, 2)
    np.savez(tmp_path / "init.npz", samples=points.numpy())
    np.savez(tmp_path / "mask.npz", samples=keep.numpy())
    init, mask = str(tmp_path / "init.npz"), str(tmp_path / "mask.npz")
    cases = [
        (["--strength", "0.5"], dict(strength=0.5)),
        (["--mask", mask, "--resample", "2", "--jump", "2"], dict(mask=keep, resample=2, jump=2)),
    ]
    for flags, kwargs in cases:
        out = tmp_path / "cli.npz"
        argv = ["sample", "pretrained:toy2d", "--init", init, "--steps", "6", "--seed", "4"]
        assert main([*argv, *flags, "--quiet", "--out", str(out)]) == 0
        samples = toy.sample(init=points, steps=6, seed=4, progress=False, **kwargs)
        with np.load(out) as f:
            assert np.array_equal(f["samples"], samples.tensor.numpy())
            assert float(f["strength"]) == samples.meta["strength"]
    assert torch.equal(samples.tensor[:, 0], points[:, 0])  # inpainting: known values exact
    assert not torch.equal(samples.tensor[:, 1], points[:, 1])
    with pytest.raises(ConfigError, match="give init="):
        toy.sample(4, strength=0.5)
