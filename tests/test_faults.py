"""Faults (issue 17): non-finite losses, signals, a second trainer, full disks, memory, kills.

Every fault is made deterministic by a test hook or a monkeypatch, never by sleeping: NaN losses
at a chosen step (DIFFLAB_FAULT_NAN_STEP), a signal a process sends itself after a chosen step
(DIFFLAB_FAULT_SIGNAL*), an OSError raised by the writer, a lock holder that says when it holds.
"""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL_TOY, assert_same_weights, run_difflab, train_here
from difflab import cli
from difflab.config import apply_overrides, preset
from difflab.training.checkpoint import list_checkpoints, load_state, verify_checkpoint
from difflab.training.faults import RunLock, TrainingFault
from difflab.training.logging import MetricsLog, read_metrics
from difflab.training.nonfinite import NonFiniteMonitor

# As small as a run gets; a constant lr, so a run extended on resume equals a straight one.
SMALL = [*SMALL_TOY, "train.keep_checkpoints=10", "train.warmup_steps=0"]
STEPS = 6
FLAGS = ["--no-finish", "--quiet"]


def _cfg(*extra):
    return apply_overrides(preset("toy2d"), [*SMALL, f"train.steps={STEPS}", *extra])


def _train_argv(root: Path, name: str, *extra):
    return ["train", "--runs", str(root), "--name", name, *FLAGS, "--set", *SMALL, *extra]


def _weights(ckpt: Path):
    return [load_file(ckpt / f"{w}.safetensors") for w in ("model", "ema")]


def _all_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(v).all() for w in _weights(ckpt) for v in w.values())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The last checkpoint of a run trained straight through, STEPS steps."""
    return train_here(_cfg(), tmp_path_factory.mktemp("straight") / "run")


# 1. Non-finite losses and gradients ---------------------------------------------------------------
def test_a_nan_loss_stops_at_its_step_and_nothing_non_finite_is_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_FAULT_NAN_STEP", "3")
    with pytest.raises(TrainingFault) as info:
        train_here(_cfg(), tmp_path / "run")
    message = str(info.value)
    assert "stopped at step 3" in message and "precision fp32" in message and "lr 0.002" in message
    assert f"last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-2'}" in message
    assert "train.lr" in message and "\n" not in message
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts] == ["step-2"]  # not step-4 with NaN weights
    assert _all_finite(ckpts[0]) and _all_finite(tmp_path / "run" / "checkpoints" / "best")
    assert all(r["step"] <= 2 for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_skip_drops_the_update_counts_it_and_keeps_training(tmp_path, monkeypatch, straight):
    monkeypatch.setenv("DIFFLAB_FAULT_NAN_STEP", "3")
    cfg = _cfg("train.nonfinite=skip", "train.checkpoint_every=1")
    train_here(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    assert_same_weights(ckpt / "step-2", ckpt / "step-3")  # no optimizer or EMA step at step 3
    assert all(_all_finite(c) for c in list_checkpoints(ckpt)) and _all_finite(ckpt / "best")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 0, 0, 0]
    assert all(r["loss_smoothed"] is not None for r in rows)
    # the skipped step drew its noise as usual: later steps draw what a run without NaN draws
    ours, theirs = load_state(ckpt / "step-4"), load_state(straight.parent / "step-4")
    assert torch.equal(ours["loss_generator"], theirs["loss_generator"])


def test_skip_stops_after_max_skips_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_FAULT_NAN_STEP", "2-6")
    with pytest.raises(TrainingFault, match=r"step 4: 3 updates in a row .*max_skips=3"):
        train_here(_cfg("train.nonfinite=skip", "train.nonfinite_max_skips=3"), tmp_path / "run")
    assert [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-2"]


def test_skip_mode_without_a_nan_is_bitwise_the_default(tmp_path, straight):
    assert_same_weights(straight, train_here(_cfg("train.nonfinite=skip"), tmp_path / "run"))


def test_a_diverging_run_is_one_line_through_the_cli(tmp_path, capsys):
    argv = _train_argv(tmp_path, "run", "train.steps=6", "train.lr=1e6", "train.grad_clip=0")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error: training stopped at step ")
    assert "train.grad_clip=1" in err[0] and "Traceback" not in err[0]
    ckpt = tmp_path / "run" / "checkpoints"
    assert all(_all_finite(c) for c in list_checkpoints(ckpt))
    assert not (ckpt / "best").exists() or _all_finite(ckpt / "best")


def test_fp16_scaler_skips_are_counted_not_failures():
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    monitor = NonFiniteMonitor(_cfg(), torch.device("cpu"), lambda s: 0.1, fp16=True)
    before = net.weight.detach().clone()
    scaler.scale(net(torch.ones(1, 2)).sum() * float("inf")).backward()
    monitor.scaler_step(scaler, optimizer)
    assert torch.equal(net.weight, before)  # the scaler skipped the update
    assert monitor.row() == {"nonfinite_skips": 0, "scaler_skips": 1}
    assert monitor.row()["scaler_skips"] == 0  # counts are per logging interval


# 2. Signals
@pytest.mark.parametrize(
    "name, code", [("TERM", 143), pytest.param("INT", 130, marks=pytest.mark.slow)]
)
def test_a_signal_stops_with_a_checkpoint_and_resume_is_bitwise(tmp_path, straight, name, code):
    hook = {"DIFFLAB_FAULT_SIGNAL": name, "DIFFLAB_FAULT_SIGNAL_STEP": "3"}  # after step 3
    first = run_difflab(*_train_argv(tmp_path, "run", f"train.steps={STEPS}"), env=hook)
    assert first.returncode == code, first.stderr
    run = tmp_path / "run"
    assert f"continue with `difflab train --resume {run}`" in first.stderr
    assert "Traceback" not in first.stderr
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-2", "step-3"]
    assert not (run / ".lock").exists()  # released on the way out
    second = run_difflab("train", "--resume", str(run), *FLAGS)
    assert second.returncode == 0, second.stderr
    assert_same_weights(straight, run / "checkpoints" / f"step-{STEPS}")
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_a_second_signal_exits_at_once_and_the_previous_checkpoint_stays(tmp_path, straight):
    hook = {"DIFFLAB_FAULT_SIGNAL": "INT", "DIFFLAB_FAULT_SIGNAL_STEP": "3"}
    first = run_difflab(
        *_train_argv(tmp_path, "run", f"train.steps={STEPS}"),
        env=hook | {"DIFFLAB_FAULT_SIGNAL_COUNT": "2"},
    )
    assert first.returncode == 130, first.stderr
    assert "SIGINT again; stopping now without a checkpoint" in first.stderr
    run = tmp_path / "run"
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step-2"] and verify_checkpoint(ckpts[0]) is None
    second = run_difflab(
        "train", "--resume", str(run), *FLAGS
    )  # the dead holder's lock is taken over
    assert second.returncode == 0, second.stderr
    assert "taking over the lock" in second.stderr
    assert_same_weights(straight, run / "checkpoints" / f"step-{STEPS}")


# 3. The run lock
HOLD = (
    "import sys; from difflab.training.faults import RunLock\n"
    "with RunLock(sys.argv[1]):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


def test_a_second_trainer_on_a_live_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"  # it holds the lock now
        assert cli.main(_train_argv(tmp_path, "run", "train.steps=2")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and f"being trained by another process (PID {holder.pid} on host" in err[0]
        )
        assert not (run / "config.json").exists()
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not run.exists()  # the holder removed what it created


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999 elsewhere\n")  # its holder died: no flock on it
    with pytest.warns(UserWarning, match="PID 999999 on host elsewhere"), RunLock(run) as lock:
        assert (run / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(TrainingFault, match=f"PID {os.getpid()} on host"):
            RunLock(run).acquire()  # a second holder, even in this process
        assert lock.fd is not None
    assert not (run / ".lock").exists() and run.exists()


# 4. Write failures
def _disk_full(monkeypatch, module, name, after: int):
    """Make module.name raise ENOSPC from its `after`+1-th call on."""
    real, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import difflab.training.checkpoint

    _disk_full(
        monkeypatch, difflab.training.checkpoint, "save_file", after=3
    )  # step-4's ema weights
    with pytest.raises(TrainingFault) as info:
        train_here(_cfg(), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    message = str(info.value)
    assert f"cannot write {ckpt / 'step-4'}: No space left on device" in message
    assert "needs about" in message and "kB" in message and "--resume" in message
    assert [c.name for c in list_checkpoints(ckpt)] == ["step-2"]
    assert verify_checkpoint(ckpt / "step-2") is None
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    train_here(_cfg(), tmp_path / "run", resume=True)  # and it resumes from step 2


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    real = Path.open

    def full(self, *args, **kwargs):
        if self.name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(TrainingFault, match=r"metrics.jsonl: No space left on device; it needs"):
        log.write({"step": 1, "loss": 0.5})


# 5. Out of memory
def test_out_of_memory_in_training_names_the_batch_and_what_to_try(tmp_path, monkeypatch, capsys):
    import difflab.training.loop

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(difflab.training.loop, "train_step", oom)
    assert cli.main(_train_argv(tmp_path, "run", "train.steps=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory while training with train.batch_size=64" in err[0]
    for hint in ("train.grad_accum=2", "model.unet.checkpointing=true", "train.batch_size"):
        assert hint in err[0]


def test_out_of_memory_in_sampling_names_the_batch_size(straight, tmp_path, monkeypatch, capsys):
    import difflab.runs

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(difflab.runs, "draw_samples", oom)
    out = tmp_path / "s.npz"
    argv = ["sample", str(straight.parent.parent), "--out", str(out), "--batch-size", "512"]
    assert cli.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "out of memory while sampling with --batch-size 512" in err and not out.exists()


def test_interrupted_sampling_leaves_no_half_written_file(straight, tmp_path, monkeypatch):
    import difflab.runs

    def interrupted(file, **arrays):  # the write is cut short by Ctrl-C
        Path(file.name if hasattr(file, "name") else file).write_bytes(b"PK\x03\x04half")
        raise KeyboardInterrupt

    monkeypatch.setattr(difflab.runs.np, "savez", interrupted)
    out = tmp_path / "s.npz"
    argv = ["sample", str(straight.parent.parent), "--out", str(out), "--n", "10", "--quiet"]
    assert cli.main(argv) == 130
    assert list(tmp_path.iterdir()) == []


# 6. Kills at random moments
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_steps_then_resume_is_bitwise(tmp_path, straight, seed):
    """SIGKILL after seeded random steps (possibly several per run), resuming after each."""
    steps = sorted(random.Random(seed).sample(range(1, STEPS), 3))
    run = tmp_path / "run"
    argv = _train_argv(tmp_path, "run", f"train.steps={STEPS}")
    for at in steps:
        hook = {"DIFFLAB_FAULT_SIGNAL": "KILL", "DIFFLAB_FAULT_SIGNAL_STEP": str(at)}
        done = max([int(c.name[5:]) for c in list_checkpoints(run / "checkpoints")], default=0)
        if at <= done:
            continue
        result = run_difflab(*argv, env=hook)
        assert result.returncode == -signal.SIGKILL, result.stderr
        argv = ["train", "--resume", str(run), *FLAGS]  # from step 0 if none was complete
    result = run_difflab(*argv)
    assert result.returncode == 0, result.stderr
    assert_same_weights(straight, run / "checkpoints" / f"step-{STEPS}")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_launcher_forwards_a_signal_and_every_rank_stops_with_a_checkpoint(
    tmp_path, signum, code
):
    """SIGTERM / SIGINT to `difflab train --nproc 2` once its first checkpoint is visible: the
    ranks stop together, rank 0 writes one checkpoint there, and the launcher returns 143 / 130."""
    run = tmp_path / "run"
    argv = _train_argv(tmp_path, "run", "train.steps=100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "difflab", argv[0], "--nproc", "2", *argv[1:]],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240  # waits for an event, not for an amount of time
        while not list_checkpoints(run / "checkpoints"):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        launcher.send_signal(signum)
        _, err = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode == code, err
    assert f"continue with `difflab train --resume {run}`" in err
    last = list_checkpoints(run / "checkpoints")[-1]
    assert verify_checkpoint(last) is None and int(last.name[5:]) < 100000
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert max(logged) == int(last.name[5:])  # every rank stopped at the checkpointed step
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    hook = {"DIFFLAB_FAULT_SIGNAL": "TERM", "DIFFLAB_FAULT_SIGNAL_STEP": "3"}
    hook["DIFFLAB_FAULT_SIGNAL_RANK"] = "1"  # rank 0 was not signalled; it must stop too
    argv = _train_argv(tmp_path, "run", f"train.steps={STEPS}")
    result = run_difflab(argv[0], "--nproc", "2", *argv[1:], env=hook)
    assert result.returncode == 143, result.stderr
    run = tmp_path / "run"
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-2", "step-3"]
    assert f"continue with `difflab train --resume {run}`" in result.stderr
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 3


@pytest.mark.slow
def test_ranks_decide_alike_about_a_nan_on_one_of_them(tmp_path):
    hook = {"DIFFLAB_FAULT_NAN_STEP": "3", "DIFFLAB_FAULT_NAN_RANK": "1"}
    argv = _train_argv(tmp_path, "skip", f"train.steps={STEPS}", "train.nonfinite=skip")
    result = run_difflab(argv[0], "--nproc", "2", *argv[1:], "train.checkpoint_every=1", env=hook)
    assert result.returncode == 0, result.stderr
    ckpt = tmp_path / "skip" / "checkpoints"
    assert_same_weights(ckpt / "step-2", ckpt / "step-3")  # both ranks dropped step 3's update
    rows = [r for r in read_metrics(tmp_path / "skip" / "metrics.jsonl") if "loss" in r]
    assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 0, 0, 0]
    argv = _train_argv(tmp_path, "stop", f"train.steps={STEPS}")
    result = run_difflab(argv[0], "--nproc", "2", *argv[1:], env=hook)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("training stopped at step 3") == 1  # said once, by rank 0
    assert "Traceback" not in result.stderr
    assert [c.name for c in list_checkpoints(tmp_path / "stop" / "checkpoints")] == ["step-2"]


# 7. A crash before the first checkpoint
class Killed(BaseException):
    """What kill -9 does to a process, as far as the files go: the write stops where it is."""


def _kill_during_the_first_checkpoint(monkeypatch, run: Path) -> None:
    """Train `run` until the first checkpoint (step 2) is being written, and stop it halfway
    through its model weights: what is left is what a run killed then leaves (config.json, its
    folders, metrics up to step 2, and a temporary checkpoint folder with half a file)."""
    import difflab.training.checkpoint

    real = difflab.training.checkpoint.save_file

    def half_then_killed(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise Killed

    monkeypatch.setattr(difflab.training.checkpoint, "save_file", half_then_killed)
    with pytest.raises(Killed):
        train_here(_cfg(), run)
    monkeypatch.undo()
    ckpt = run / "checkpoints"
    assert not list_checkpoints(ckpt) and (run / "config.json").is_file()
    assert [p.name.startswith(".tmp-step-2-") for p in ckpt.iterdir()] == [True]


def _cli(argv, capsys) -> tuple[int, list[str], list[str]]:
    threads = torch.get_num_threads()
    try:
        code = cli.main(argv)
    finally:
        torch.set_num_threads(threads)  # train.threads=1 set it for the whole process
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0_bitwise(
    tmp_path, straight, monkeypatch, capsys
):
    run = tmp_path / "run"
    _kill_during_the_first_checkpoint(monkeypatch, run)
    capsys.readouterr()
    code, out, err = _cli(["train", "--resume", str(run), *FLAGS], capsys)
    assert code == 0, err
    said = [line for line in out if "step 0" in line]
    assert said == [
        f"difflab: no complete checkpoint in {run / 'checkpoints'} (the run stopped before its "
        "first); starting from step 0"
    ]
    assert_same_weights(straight, run / "checkpoints" / f"step-{STEPS}")
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the killed run's rows are not doubled
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_run_without_a_checkpoint_refuses_a_changed_config_and_a_fresh_start(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    _kill_during_the_first_checkpoint(monkeypatch, run)
    capsys.readouterr()
    argv = ["train", "--resume", str(run), *FLAGS, "--set", "model.mlp.width=16"]
    code, _, err = _cli(argv, capsys)
    assert code == 2 and len(err) == 1
    assert (
        f"cannot resume {run}: the config differs from its config.json in model.mlp.width"
        in (err[0])
    )
    code, _, err = _cli(_train_argv(tmp_path, "run"), capsys)  # --name run again
    assert code == 2 and len(err) == 1
    assert f"{run} already holds a run; resume it with --resume {run}" in err[0]
    assert "from step 0 if none is complete" in err[0]
    assert not list_checkpoints(run / "checkpoints")  # neither touched it


def test_a_folder_killed_before_its_config_was_written_trains_fresh(tmp_path, capsys):
    run = tmp_path / "run"
    for sub in ("checkpoints", "samples", "plots"):
        (run / sub).mkdir(parents=True)
    code, _, err = _cli(_train_argv(tmp_path, "run", "train.steps=2"), capsys)
    assert code == 0, err
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-2"]
