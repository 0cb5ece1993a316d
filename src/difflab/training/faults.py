"""What training does when something goes wrong: signals, a second trainer, full disks, memory.

- `StopSignals`: SIGINT / SIGTERM ask training to stop after the current step with a checkpoint
  (every rank at the same step: `stop_requested` agrees by an all-reduce); a second signal leaves
  at once, and the previous checkpoint, written atomically, stays whole.
- `RunLock`: RUN/.lock (PID and host, held with fcntl.flock) refuses a second trainer on the same
  run directory; a lock whose holder died (its flock is gone) is taken over with a warning.
- `write_failure`: a failed checkpoint or metrics write (disk full, read-only folder) as one line
  naming the path and about how many bytes it needed.
- `out_of_memory`: an out-of-memory error as one line naming the batch size and what to try.
Non-finite losses and gradients are `nonfinite.py`'s.

Test hooks (off unless set): DIFFLAB_FAULT_SIGNAL=TERM|INT|KILL and DIFFLAB_FAULT_SIGNAL_STEP=s make
rank DIFFLAB_FAULT_SIGNAL_RANK (default 0) send itself the signal after step s,
DIFFLAB_FAULT_SIGNAL_COUNT (default 1) times, so signal tests need no sleeping.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import warnings
from pathlib import Path

import torch

from difflab.config import ConfigError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingFault(ConfigError):
    """A fault that stops training with one line saying what happened and what to try.
    `everywhere`: every rank raised the same one (rank 0 alone says it)."""

    everywhere = False


# 1. Signals --------------------------------------------------------------------------------------
class StopSignals:
    """While active, SIGINT / SIGTERM set `received` instead of stopping the process; the training
    loop reads it at the next step boundary. A second signal exits at once with 128 + signum."""

    active: StopSignals | None = None  # the guard of this process, if any

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self.agreed: int | None = None  # the signal the ranks stopped for (any rank's)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if StopSignals.active is None and _main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
            StopSignals.active = self
        return self

    def __exit__(self, *exc) -> None:
        if StopSignals.active is self:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            StopSignals.active = None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the user insists: leave now, the last checkpoint is whole
            os.write(2, f"\ndifflab: {name} again; stopping now without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = signum
        os.write(
            2,
            f"\ndifflab: {name} received; stopping after this step with a checkpoint "
            "(send it again to stop at once)\n".encode(),
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal the run stopped for (130 SIGINT, 143 SIGTERM); 0 if none."""
        signum = self.received or self.agreed
        return 128 + signum if signum else 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stop_requested(world, step: int) -> bool:
    """At the boundary after `step`: whether any rank was asked to stop (the same answer on every
    rank, so all stop at this step). Runs the DIFFLAB_FAULT_SIGNAL test hook first."""
    _signal_hook(world.rank, step)
    guard = StopSignals.active
    signum = (guard.received or 0) if guard else 0
    if world.size > 1:
        import torch.distributed as dist

        t = torch.tensor([float(signum)], device=world.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        signum = int(t.item())
    if signum and guard is not None:
        guard.agreed = signum
    return bool(signum)


def _signal_hook(rank: int, step: int) -> None:
    env = os.environ
    name, at = env.get("DIFFLAB_FAULT_SIGNAL"), env.get("DIFFLAB_FAULT_SIGNAL_STEP")
    if name is None or at is None or int(at) != step:
        return
    if int(env.get("DIFFLAB_FAULT_SIGNAL_RANK", "0")) != rank:
        return
    for _ in range(int(env.get("DIFFLAB_FAULT_SIGNAL_COUNT", "1"))):
        signal.raise_signal(getattr(signal, f"SIG{name.upper()}"))  # handled before it returns


# 2. The run lock ---------------------------------------------------------------------------------
class RunLock:
    """RUN/.lock, held for as long as a trainer uses RUN: it holds "PID host" and an exclusive
    flock, which the operating system drops when the process dies however it dies.

    Args:
        run_dir: the run directory (created if missing; removed again on release if nothing but
            the lock was ever put in it).
        enabled: False on ranks other than 0, which write nothing.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / ".lock"
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise TrainingFault(
                    f"{self.run_dir} is being trained by another process ({holder}); wait for "
                    "it to finish or stop it, or train under another --name"
                ) from None
            try:  # a holder that released by deleting the file: lock the new one instead
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            warnings.warn(
                f"taking over the lock {self.path} left by {stale}, which no longer holds it "
                "(the process ended without releasing it)",
                stacklevel=2,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # still locked: a waiting opener retries on the new file
        os.close(self.fd)
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):  # only if empty: a run that wrote nothing
                self.run_dir.rmdir()


def _read_holder(fd: int) -> str:
    """ "PID p on host h" from a lock file's text, or "" if empty."""
    words = os.pread(fd, 256, 0).decode(errors="replace").split()
    if len(words) < 2:
        return " ".join(words)
    return f"PID {words[0]} on host {words[1]}"


# 3. Write failures -------------------------------------------------------------------------------
def tensor_bytes(*objs) -> int:
    """Bytes of every tensor in modules, dicts, lists and tuples: about what a save writes."""
    total = 0
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            total += tensor_bytes(*obj.values())
        elif isinstance(obj, list | tuple):
            total += tensor_bytes(*obj)
    return total


def write_failure(path: Path, error: OSError, nbytes: int, what: str = "write") -> TrainingFault:
    """One line for a failed write of about `nbytes` to `path`."""
    reason = error.strerror or str(error)
    hint = {
        errno.ENOSPC: "free some space on that disk or move the run",
        errno.EDQUOT: "free some of your disk quota or move the run",
        errno.EROFS: "the folder is read-only: move the run to a writable disk",
        errno.EACCES: "check the folder's permissions",
    }.get(error.errno, "check the disk")
    return TrainingFault(
        f"cannot {what} {path}: {reason}; it needs about {_size(nbytes)}. The previous "
        f"checkpoint is intact: {hint}, then continue with `difflab train --resume "
        f"{_run_of(path)}`"
    )


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _run_of(path: Path) -> Path:
    """The run directory above a checkpoint or metrics path."""
    for parent in (path, *path.parents):
        if parent.name == "checkpoints":
            return parent.parent
    return path.parent


# 4. Out of memory --------------------------------------------------------------------------------
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError})


@contextlib.contextmanager
def out_of_memory(what: str, batch: str, advice: str):
    """Turn an out-of-memory error inside the block into one line: `what` ran out of memory with
    `batch` (e.g. "train.batch_size=128"); `advice` says what to try."""
    try:
        yield
    except OOM_ERRORS:
        if os.environ.get("DIFFLAB_TRACEBACK"):
            raise
        raise TrainingFault(f"out of memory while {what} with {batch}; try {advice}") from None


def train_memory_advice(cfg) -> tuple[str, str]:
    """(batch, advice) for an out-of-memory error in training."""
    t = cfg.train
    batch = f"train.batch_size={t.batch_size} (micro-batches of {t.batch_size // t.grad_accum})"
    advice = (
        f"train.grad_accum={2 * t.grad_accum} (the same batch in smaller pieces), "
        "model.unet.checkpointing=true (recompute activations), or a smaller train.batch_size; "
        "resume with --resume RUN"
    )
    return batch, advice
