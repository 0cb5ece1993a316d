"""Runs written before the one-model redesign still load, sample the same numbers bit for bit,
resume, and train to the same weights from the same config (tests/fixtures/make_legacy_runs.py
made them with commit 666a113)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab.config import RunConfig, SampleConfig, apply_overrides
from difflab.runs import draw_samples, load_run
from difflab.training.loop import train

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def expected():
    with np.load(LEGACY / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def _same_weights(a: Path, b: Path) -> None:
    for which in ("model", "ema"):
        wa, wb = load_file(a / f"{which}.safetensors"), load_file(b / f"{which}.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{which} {k}"


def test_a_legacy_toy_run_samples_the_same_numbers(expected, one_thread):
    run = load_run(LEGACY / "toy")
    ddim = SampleConfig(sampler="ddim", steps=20, n=1000, seed=3, batch_size=1000)
    samples = draw_samples(run, ddim, progress=False).numpy()
    assert np.array_equal(samples, expected["toy"])


def test_a_legacy_guided_image_run_samples_the_same_numbers(expected, one_thread):
    run = load_run(LEGACY / "stripes")
    guided = SampleConfig(sampler="ddim", steps=5, n=6, seed=4, batch_size=4, guidance=2.0)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    samples = draw_samples(run, guided, labels=labels, progress=False).numpy()
    assert np.array_equal(samples, expected["stripes"])


def test_the_same_config_trains_the_same_weights_and_a_legacy_run_resumes(tmp_path, one_thread):
    cfg = RunConfig.load(LEGACY / "toy" / "config.json")
    train(cfg, tmp_path / "again", progress=False)
    _same_weights(LEGACY / "toy/checkpoints/step-20", tmp_path / "again/checkpoints/step-20")
    # resumed past its end, the legacy run equals today's straight run of the longer schedule
    resumed = tmp_path / "resumed"
    shutil.copytree(LEGACY / "toy", resumed)
    longer = apply_overrides(cfg, ["train.steps=30"])
    train(longer, resumed, resume=True, progress=False)
    train(longer, tmp_path / "straight", progress=False)
    _same_weights(tmp_path / "straight/checkpoints/step-30", resumed / "checkpoints/step-30")
