"""Every family on a DiT, with no change outside nets/ and build (issue 39): a rectified flow
trains and samples, every prediction kind takes a step, ECT and CD start from a DiT teacher,
and a DiT run stopped and resumed on 2 gloo processes equals one process's run.

All on a tiny class-conditional DiT (width 32, 2 blocks, 4x4 patches of 16x16 grey images) and
MNIST-shaped synthetic data: two classes of stripes, horizontal and vertical."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import SUM_ORDER, assert_same_weights, run_difflab, train_here
from difflab.cli import main
from difflab.config import apply_overrides, preset
from difflab.training.logging import read_metrics

TINY_DIT = [
    "data.name=imagefolder",
    "data.channels=1",
    "data.image_size=16",
    "model.name=dit",
    "model.dit.width=32",
    "model.dit.depth=2",
    "model.dit.heads=2",
    "model.dit.patch_size=4",
    "train.precision=fp32",
    "train.batch_size=8",
    "train.lr_schedule=constant",  # so that a run of 2 steps resumed to 4 is one of 4
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.time_limit_minutes=0",
    "train.threads=1",
    "sample.steps=3",
    "sample.n=4",
    "sample.batch_size=4",
]
FLAGS = ["--no-finish", "--quiet"]


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    """Two classes of 28x28 grey stripes ('h', 'v'), MNIST-shaped, resized to 16x16."""
    root = tmp_path_factory.mktemp("stripes")
    for name, axis in (("h", 0), ("v", 1)):
        (root / name).mkdir()
        for k in range(6):
            stripes = ((np.arange(28) // (2 + k % 3)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 28, axis=1 - axis)
            Image.fromarray(img).save(root / name / f"{k}.png")
    return root


def _cfg(name, root, *extra):
    return apply_overrides(preset(name), [f"data.root={root}", *TINY_DIT, *extra])


def _sets(root, *extra):
    return [x for s in (f"data.root={root}", *TINY_DIT, *extra) for x in ("--set", s)]


def _moved_from_zero(ckpt) -> bool:
    """adaLN-Zero's modulation starts at zero: any nonzero weight means a gradient arrived."""
    weights = load_file(ckpt / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    return bool(weights["blocks.0.modulation.weight"].abs().max() > 0)


def test_a_rectified_flow_trains_and_samples_on_a_dit(stripes, tmp_path):
    run = train_here(_cfg("mnist-flow", stripes, "train.steps=2"), tmp_path / "flow")
    assert _moved_from_zero(run)
    out = tmp_path / "s.npz"
    argv = ["sample", str(tmp_path / "flow"), "--n", "4", "--per-class", "--steps", "3"]
    assert main([*argv, "--guidance", "1.5", "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (4, 1, 16, 16) and np.isfinite(f["samples"]).all()
        assert f["labels"].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "prediction",
    [
        ["diffusion.prediction=eps"],
        ["diffusion.prediction=x0"],
        ["diffusion.prediction=v"],
        ["diffusion.schedule=edm", "diffusion.num_steps=0", "diffusion.prediction=edm"],
    ],
    ids=["eps", "x0", "v", "edm"],
)
def test_every_prediction_kind_builds_and_steps_on_a_dit(stripes, tmp_path, prediction):
    cfg = _cfg("mnist-dit", stripes, "train.steps=2", *prediction)
    run = train_here(cfg, tmp_path / "p")
    assert _moved_from_zero(run)
    losses = [r["loss"] for r in read_metrics(tmp_path / "p" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.fixture(scope="module")
def dit_teacher(stripes, tmp_path_factory):
    """A tiny class-conditional DiT diffusion run: the teacher of the ECT and CD runs here (the
    mnist preset with model.name=dit, as the students' presets are mnist's: same network)."""
    root = tmp_path_factory.mktemp("dit-teacher")
    train_here(_cfg("mnist", stripes, "train.steps=2"), root / "teacher")
    return root / "teacher"


@pytest.mark.parametrize("name", ["mnist-ect", "mnist-cd"])
def test_consistency_from_a_dit_teacher_takes_a_step(stripes, dit_teacher, tmp_path, name):
    from difflab.training.parts import build_parts

    sets = [f"consistency.teacher={dit_teacher}", "train.steps=1", "train.checkpoint_every=1"]
    cfg = _cfg(name, stripes, *sets)
    threads = torch.get_num_threads()
    try:
        parts = build_parts(cfg)
    finally:
        torch.set_num_threads(threads)
    ema = load_file(dit_teacher / "checkpoints/step-2/ema.safetensors")
    if name == "mnist-ect":  # ECT starts from the teacher's EMA weights
        assert all(torch.equal(v, ema[k]) for k, v in parts.net.state_dict().items())
    run = train_here(cfg, tmp_path / "student")
    student = load_file(run / "model.safetensors")
    assert student.keys() == ema.keys() and all(torch.isfinite(w).all() for w in student.values())
    assert any(not torch.equal(student[k], ema[k]) for k in ema)  # the step moved it
    loss = [r["loss"] for r in read_metrics(tmp_path / "student" / "metrics.jsonl") if "loss" in r]
    assert len(loss) == 1 and np.isfinite(loss[0])


def test_dit_resume_on_two_gloo_processes_equals_one_process(stripes, tmp_path, one_thread):
    """4 steps in this process against 2 steps on 2 processes resumed to 4 on 2 processes."""
    train_here(_cfg("mnist-dit", stripes, "train.steps=4"), tmp_path / "one")
    argv = ["train", "--preset", "mnist-dit", "--nproc", "2", "--runs", str(tmp_path)]
    half = run_difflab(*argv, "--name", "two", *FLAGS, *_sets(stripes, "train.steps=2"))
    assert half.returncode == 0, half.stderr
    resume = ["train", "--resume", str(tmp_path / "two"), "--nproc", "2", *FLAGS]
    resumed = run_difflab(*resume, "--set", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr
    for step in (2, 4):
        one, two = (
            tmp_path / f"one/checkpoints/step-{step}",
            tmp_path / f"two/checkpoints/step-{step}",
        )
        assert_same_weights(one, two, atol=SUM_ORDER)
    assert [r["step"] for r in read_metrics(tmp_path / "two/metrics.jsonl")] == [1, 2, 3, 4]
