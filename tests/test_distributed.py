"""Training in several processes (DDP over gloo on the CPU): 2 processes of batch 32 must equal 1
process of batch 64, resume with another number of processes, and stop cleanly when one dies."""

import signal
from types import SimpleNamespace

import pytest
import torch

from conftest import SMALL_TOY, SUM_ORDER, assert_same_weights, run_difflab, train_here
from difflab import cli
from difflab.build import build_schedule
from difflab.config import ConfigError, apply_overrides, preset
from difflab.diffusion.objectives import LossSpec, diffusion_loss, draw_noise
from difflab.diffusion.prediction import Denoiser
from difflab.training.checkpoint import list_checkpoints, remove_leftovers, verify_checkpoint
from difflab.training.distributed import (
    FAULT_EXIT,
    PEER_LOST_EXIT,
    World,
    _first_cause,
    check_world,
    env_world,
    setup,
)
from difflab.training.logging import read_metrics

FLAGS = ["--no-finish", "--quiet"]


def _cfg(*extra):
    return apply_overrides(preset("toy2d"), [*SMALL_TOY, *extra])


def _train_set(steps):
    return ["--set", *SMALL_TOY, f"train.steps={steps}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/one: 4 steps in this process; runs/two: the same with `difflab train --nproc 2`."""
    root = tmp_path_factory.mktemp("runs")
    train_here(_cfg("train.steps=4"), root / "one")
    two = run_difflab(
        "train", "--nproc", "2", "--runs", str(root), "--name", "two", *FLAGS, *_train_set(4)
    )
    assert two.returncode == 0, two.stderr
    return root


def test_two_processes_equal_one(runs):
    for step in (2, 4):
        assert_same_weights(
            runs / "one/checkpoints" / f"step-{step}",
            runs / f"two/checkpoints/step-{step}",
            atol=SUM_ORDER,
        )


def test_only_rank_zero_writes_and_logs_the_global_batch(runs):
    one, two = read_metrics(runs / "one/metrics.jsonl"), read_metrics(runs / "two/metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # one row per log step, not one per rank
    for a, b in zip(one, two, strict=True):  # loss sums and counts gathered from both ranks
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["loss_by_t"] == pytest.approx(a["loss_by_t"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    ckpts = runs / "two/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-2", "step-4"]
    assert all(verify_checkpoint(p) is None for p in ckpts.iterdir())
    assert (runs / "two/config.json").exists()


def test_resume_with_another_number_of_processes(runs, tmp_path, one_thread):
    """Stopped after 2 steps of a torchrun launch of 2 processes, resumed to 4 steps in 1."""
    torchrun = ["--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "logs")]
    half = run_difflab(
        *torchrun,
        *("-m", "difflab", "train", "--runs", str(tmp_path), "--name", "half", *FLAGS),
        *_train_set(2),
        module="torch.distributed.run",
    )
    assert half.returncode == 0, half.stderr
    argv = ["train", "--resume", str(tmp_path / "half"), "--set", "train.steps=4", *FLAGS]
    assert cli.main(argv) == 0
    assert_same_weights(
        runs / "one/checkpoints/step-4", tmp_path / "half/checkpoints/step-4", atol=SUM_ORDER
    )
    assert [r["step"] for r in read_metrics(tmp_path / "half/metrics.jsonl")] == [1, 2, 3, 4]


def test_a_killed_rank_stops_the_run_without_a_partial_checkpoint(runs, tmp_path, one_thread):
    fault = {"DIFFLAB_FAULT_RANK": "1", "DIFFLAB_FAULT_STEP": "3"}  # the test hook
    run = tmp_path / "killed"
    argv = ["train", "--nproc", "2", "--runs", str(tmp_path), "--name", "killed", *FLAGS]
    result = run_difflab(*argv, *_train_set(4), env=fault)
    assert result.returncode == 1
    assert (
        f"difflab: error: training process rank 1 failed (exit {FAULT_EXIT}); the run can be "
        f"resumed from its last checkpoint with --resume {run}"
    ) in result.stderr.splitlines()
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-2"]  # nothing half-written
    assert all(verify_checkpoint(p) is None for p in ckpts.iterdir())
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    # What a process killed while saving leaves (a temporary folder) is cleared on resume, and the
    # run ends where one uninterrupted process ends.
    (ckpts / ".tmp-step-4-12345").mkdir()
    assert cli.main(["train", "--resume", str(run), *FLAGS]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-2", "step-4"]
    assert_same_weights(runs / "one/checkpoints/step-4", ckpts / "step-4", atol=SUM_ORDER)


def _gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize(
    ("argv", "gpus", "env", "message"),
    [
        (["--nproc", "0"], 0, {}, "--nproc must be >= 1, got 0"),
        (
            ["--nproc", "3"],
            0,
            {},
            "train.batch_size (64) is the global batch and must be divisible",
        ),
        (["--nproc", "2", "--set", "train.grad_accum=64"], 0, {}, "must be divisible by the 2"),
        (["--nproc", "2"], 1, {}, "asked for 2 processes but only 1 GPUs are visible"),
        (["--nproc", "2", "--set", "train.device=cuda:1"], 2, {}, "each process uses cuda:"),
        (["--nproc", "2"], 0, {"WORLD_SIZE": "2"}, "--nproc starts its own processes"),
        ([], 0, {"WORLD_SIZE": "3"}, "must be divisible by the 3 processes"),  # under torchrun
    ],
)
def test_bad_input_stops_before_any_work(tmp_path, monkeypatch, capsys, argv, gpus, env, message):
    _gpus(monkeypatch, gpus)
    for key, value in ({**env, "RANK": "0", "LOCAL_RANK": "0"} if env else {}).items():
        monkeypatch.setenv(key, value)  # as torchrun sets them
    base = ["train", "--runs", str(tmp_path), "--name", "bad", "--set", *SMALL_TOY, *FLAGS]
    assert cli.main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error: ") and message in err[0], err
    assert not (tmp_path / "bad").exists()


def test_torchrun_needs_a_run_name(tmp_path, monkeypatch, capsys):
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["train", "--runs", str(tmp_path), *FLAGS]) == 2
    assert "pass --name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_single_process_world_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world() == World() and setup(_cfg()) == World()
    x = torch.arange(6.0)
    assert World().shard(x, None) == (x, None)
    world = World(rank=1, size=2)
    assert torch.equal(world.shard(x)[0], torch.tensor([3.0, 4.0, 5.0]))
    with pytest.raises(ConfigError, match=r"use e\.g\. train\.batch_size=65"):
        check_world(_cfg(), 5)


def test_slices_of_the_global_noise_give_the_global_loss():
    """What lets N ranks equal one process: the loss of each slice, with its slice of the noise
    drawn for the whole batch, is the slice of the whole batch's loss; and drawing the noise
    apart from the loss consumes the generator exactly as the loss did alone."""
    net = torch.nn.Linear(2, 2)
    den = Denoiser(lambda x, t, y=None: net(x) * t[:, None], build_schedule(_cfg().diffusion), "v")
    spec = LossSpec(t_sampling="stratified")
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    whole, t = diffusion_loss(den, x0, None, spec, torch.Generator().manual_seed(1))
    noise = draw_noise(den.schedule, x0.shape, spec, torch.Generator().manual_seed(1))
    assert torch.equal(noise[0], t)
    for rank in range(4):
        x0_r, *noise_r = World(rank=rank, size=4).shard(x0, *noise)
        part, _ = diffusion_loss(den, x0_r, None, spec, noise=noise_r)
        torch.testing.assert_close(part, whole[2 * rank : 2 * rank + 2], rtol=1e-6, atol=0)


def test_the_launcher_reports_the_rank_that_failed_first():
    def failures(**codes):
        return {int(r[1:]): SimpleNamespace(exitcode=c) for r, c in codes.items()}

    sigterm = -signal.SIGTERM  # ranks the launcher stopped, or that lost their peer, come last
    assert _first_cause(failures(r0=sigterm, r1=FAULT_EXIT)) == (1, FAULT_EXIT)
    assert _first_cause(failures(r0=PEER_LOST_EXIT, r1=-signal.SIGKILL)) == (1, -signal.SIGKILL)
    assert _first_cause(failures(r0=1, r1=sigterm)) == (0, 1)


def test_leftovers_of_a_killed_save_are_tidied(tmp_path):
    (tmp_path / ".tmp-step-8-1").mkdir()
    (tmp_path / ".old-best-1").mkdir()  # moved aside; the new best was never renamed in
    (tmp_path / "step-4").mkdir()
    assert remove_leftovers(tmp_path) == [".old-best-1", ".tmp-step-8-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step-4"]
    assert list_checkpoints(tmp_path) == [tmp_path / "step-4"]
