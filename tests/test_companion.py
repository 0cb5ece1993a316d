"""Autoguidance's companion net (train.guide_model, training/companion.py): trained beside the
main net on its batches, saved as RUN/guide, resumed bit for bit, and the default weak model of
`--guidance-method auto`."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL_TOY, SUM_ORDER, assert_same_weights, run_difflab, train_here
from difflab import cli
from difflab.config import ConfigError, apply_overrides, preset
from difflab.runs import load_run
from difflab.training.checkpoint import load_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: a second thread only waits
GUIDED = ["train.guide_model=0.5", "train.guide_steps=3"]


def _cfg(*extra):
    sampling = ["sample.sampler=ddim", "sample.steps=4", "sample.n=16", "sample.batch_size=16"]
    return apply_overrides(preset("toy2d"), [*SMALL_TOY, "train.steps=4", *sampling, *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("companion") / "run"
    train_here(_cfg(*GUIDED), path)
    return path


def test_companion_is_smaller_stops_after_its_steps_and_is_a_run(run_dir):
    weak = load_run(run_dir / "guide", device="cpu")
    strong = load_run(run_dir, device="cpu")
    assert weak.step == 3  # guide_steps, published at the next main checkpoint (step 4)
    assert weak.cfg.model.mlp.width == strong.cfg.model.mlp.width // 2
    count = lambda r: sum(p.numel() for p in r.model.net.parameters())  # noqa: E731
    assert count(weak) < count(strong)
    state = load_state(run_dir / "checkpoints" / "step-4")["guide"]
    assert state["updates"] == 3 and state["ema"]["num_updates"] == 3
    # the published EMA weights are the ones the checkpoint carries on
    published = load_file(run_dir / "guide" / "checkpoints" / "step-3" / "ema.safetensors")
    for k, v in published.items():
        assert torch.equal(v, state["ema_net"][k]), k


def test_main_net_trains_to_the_same_numbers_with_the_companion_on_or_off(run_dir, tmp_path):
    train_here(_cfg(), tmp_path / "plain")
    assert not (tmp_path / "plain" / "guide").exists()
    assert "guide" not in load_state(tmp_path / "plain" / "checkpoints" / "step-4")
    last = "checkpoints/step-4"
    assert_same_weights(run_dir / last, tmp_path / "plain" / last)


def test_resume_continues_the_companion_bit_for_bit(run_dir, tmp_path):
    cfg = _cfg(*GUIDED)
    train_here(cfg, tmp_path / "r", stop_after=2)
    assert (tmp_path / "r" / "guide" / "checkpoints" / "step-2").is_dir()
    train_here(cfg, tmp_path / "r", resume=True)
    straight, resumed = run_dir / "guide" / "checkpoints", tmp_path / "r" / "guide" / "checkpoints"
    assert [p.name for p in resumed.iterdir()] == ["step-3"]
    assert_same_weights(straight / "step-3", resumed / "step-3")
    a = load_state(run_dir / "checkpoints" / "step-4")["guide"]
    b = load_state(tmp_path / "r" / "checkpoints" / "step-4")["guide"]
    for k in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][k].items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)


def test_auto_without_guide_with_uses_the_companion(run_dir, tmp_path):
    flags = ["--guidance-method", "auto", "--guidance", "2.0", "--n", "16", "--quiet"]
    own, named = tmp_path / "own.npz", tmp_path / "named.npz"
    assert cli.main(["sample", str(run_dir), "--out", str(own), *flags]) == 0
    argv = ["sample", str(run_dir), "--out", str(named), *flags]
    assert cli.main([*argv, "--guide-with", str(run_dir / "guide")]) == 0
    plain = tmp_path / "plain.npz"
    assert cli.main(["sample", str(run_dir), "--out", str(plain), "--n", "16", "--quiet"]) == 0
    with np.load(own) as a, np.load(named) as b, np.load(plain) as c:
        assert a["guide_with"].item() == str(run_dir / "guide")
        assert np.array_equal(a["samples"], b["samples"])
        assert not np.allclose(a["samples"], c["samples"])  # the companion guided them
    rows = tmp_path / "e.json"
    argv = ["eval", str(run_dir), "--out", str(rows), *flags]
    assert cli.main(argv) == 0
    row = json.loads(rows.read_text())  # a 2-D run's evaluation: one flat row
    assert row["guidance_method"] == "auto" and row["guide_with"] == str(run_dir / "guide")


@pytest.mark.parametrize(
    "bad, message",
    [
        (["train.guide_model=1.5", "train.guide_steps=2"], "train.guide_model must be"),
        (["train.guide_model=0.5", "train.guide_steps=9"], "train.guide_steps must be in"),
        (["train.guide_steps=2"], "train.guide_steps needs train.guide_model"),
    ],
)
def test_bad_companion_settings_write_nothing(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        train_here(_cfg(*bad), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_run_without_companion_refuses_auto_in_one_line(tmp_path, capsys):
    train_here(_cfg("train.steps=2", "train.checkpoint_every=2"), tmp_path / "p")
    out = tmp_path / "s.npz"
    argv = ["sample", str(tmp_path / "p"), "--out", str(out), "--guidance-method", "auto"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.guide_model" in err[0] and "--guide-with" in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_train_the_companion_as_one(run_dir, tmp_path):
    # each rank's share of the micro-batch, its gradients averaged over the ranks
    sets = [*SMALL_TOY, "train.steps=4", *GUIDED, "sample.sampler=ddim", "sample.steps=4"]
    argv = ["train", "--nproc", "2", "--runs", str(tmp_path), "--name", "two"]
    two = run_difflab(*argv, "--no-finish", "--quiet", "--set", *sets)
    assert two.returncode == 0, two.stderr
    step = "guide/checkpoints/step-3"
    assert_same_weights(run_dir / step, tmp_path / "two" / step, atol=SUM_ORDER)
