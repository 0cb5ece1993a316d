"""MeanFlow and shortcut models on 2 gloo processes: a run of 2 steps resumed to 4 equals 4
steps in one process (the losses draw their times and noise for the global batch, so the split
changes only the order in which gradients are summed)."""

import pytest

from conftest import SMALL_TOY, SUM_ORDER, assert_same_weights, run_difflab, train_here
from difflab.config import apply_overrides, preset
from difflab.training.logging import read_metrics

FLAGS = ["--no-finish", "--quiet"]


@pytest.mark.parametrize("name", ["toy2d-meanflow", "toy2d-shortcut"])
def test_two_gloo_processes_resume_to_the_one_process_weights(name, tmp_path, one_thread):
    sets = [*SMALL_TOY, "shortcut.bootstrap_fraction=0.5"]
    train_here(apply_overrides(preset(name), [*sets, "train.steps=4"]), tmp_path / "one")
    argv = ["train", "--preset", name, "--nproc", "2", "--runs", str(tmp_path), "--name", "two"]
    half = run_difflab(*argv, *FLAGS, "--set", *sets, "train.steps=2")
    assert half.returncode == 0, half.stderr
    resume = ["train", "--resume", str(tmp_path / "two"), "--nproc", "2", *FLAGS]
    resumed = run_difflab(*resume, "--set", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr
    for step in (2, 4):
        one, two = (tmp_path / f"{run}/checkpoints/step-{step}" for run in ("one", "two"))
        assert_same_weights(one, two, atol=SUM_ORDER)
    assert [r["step"] for r in read_metrics(tmp_path / "two/metrics.jsonl")] == [1, 2, 3, 4]
