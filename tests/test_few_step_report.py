"""The figure of a one-step model from scratch (report/few_step.py): its samples at 1, 2, 4 and 8
steps from the same noise, each count the one its sampler takes (a shortcut model's powers of
two up to its lattice), each equal to `difflab sample --steps K` of the same seed."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difflab import cli
from difflab.model import DataKind, RunKind
from difflab.report.run import plot_run
from difflab.samplers.few_step import step_counts

SMALL = [
    "model.mlp.width=32",
    "model.mlp.depth=1",
    "train.batch_size=64",
    "train.steps=3",
    "train.threads=1",
    "shortcut.max_steps=4",
]


def test_the_step_counts_are_those_the_sampler_takes():
    shortcut, meanflow = (SimpleNamespace(step_grid=g) for g in ("shortcut:4", "meanflow"))
    assert step_counts(shortcut, (1, 2, 3, 4, 8)) == [1, 2, 4]
    assert step_counts(meanflow, (1, 2, 3, 8)) == [1, 2, 3, 8]
    toy = DataKind((2,), 0)
    assert RunKind("shortcut", toy).second_time and RunKind("meanflow", toy).second_time
    assert not RunKind("flow", toy).second_time and not RunKind("consistency", toy).second_time


@pytest.mark.parametrize("preset", ["toy2d-shortcut", "toy2d-meanflow"])
def test_the_figure_holds_each_step_count_from_the_same_noise(preset, tmp_path):
    threads = torch.get_num_threads()
    try:
        argv = ["train", "--preset", preset, "--no-finish", "--quiet", "--runs", str(tmp_path)]
        assert cli.main([*argv, "--name", "r", "--set", *SMALL]) == 0
        run = tmp_path / "r"
        paths = plot_run(run, report=False, progress=False)
        assert run / "plots" / "steps_compare.png" in paths
        with np.load(run / "samples" / "steps_compare.npz") as f:
            drawn = {key: f[key] for key in f.files}
        counts = [1, 2, 4] if preset == "toy2d-shortcut" else [1, 2, 4, 8]
        assert sorted(drawn) == [f"steps_{c}" for c in counts]
        for count in (1, 4):
            out = tmp_path / f"s{count}.npz"
            sample = ["sample", str(run), "--steps", str(count), "--n", "4000", "--quiet"]
            assert cli.main([*sample, "--out", str(out)]) == 0
            with np.load(out) as f:
                np.testing.assert_array_equal(drawn[f"steps_{count}"], f["samples"])
        assert np.abs(drawn["steps_1"] - drawn["steps_4"]).max() > 1e-4  # not one count twice
    finally:
        torch.set_num_threads(threads)
