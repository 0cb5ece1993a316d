"""Many processes, one run: data-parallel training with DistributedDataParallel (DDP), and the
process group and launcher that `difflab sample` / `difflab eval` share (evaluation/sharded.py).

Start it with `torchrun --nproc_per_node N -m difflab train --name RUN ...` (add --nnodes M
--node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT across machines) or with
`difflab train --nproc N ...` (the same through torch.distributed's elastic agent). Each process
("rank") trains on `cuda:LOCAL_RANK` with NCCL when CUDA is used, else on the CPU with gloo.

How N processes stay one run:
- `train.batch_size` is the global batch. Every rank builds the same objects from train.seed,
  draws the same global batch from the data stream and the same global loss noise (label
  dropout, t, eps), and keeps only its slice [rank B/N, (rank + 1) B/N). DDP averages the
  gradients, so a step is one process's step on the whole batch, equal up to the order of float
  sums. The stream's state stays global, so a checkpoint holds no per-rank state and a run
  resumes with any number of processes (or nodes).
- EMA is updated from the synchronised parameters on every rank, so every rank's EMA is equal.
- Dropout draws from each rank's own torch RNG, seeded train.seed + 1000 rank after the
  identical weight init (after a resume, ranks > 0 reseed with the step added; rank 0 keeps the
  state the checkpoint saved).
- Global rank 0 alone writes (config, metrics, checkpoints, grids, evaluations); metrics are
  summed over ranks first, and the others wait at a barrier while it writes a checkpoint. A
  resume reads the checkpoint on every rank: every node must see the run directory.

Test hook: DIFFLAB_FAULT_RANK=r DIFFLAB_FAULT_STEP=s make rank r leave with os._exit(17) right
after its step s, as a crash would (DIFFLAB_FAULT_SAMPLE=0: once its share of samples is drawn).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from difflab.config import ConfigError, RunConfig
from difflab.training.checkpoint import list_checkpoints

FAULT_EXIT = 17  # exit code of the DIFFLAB_FAULT_* test hook
PEER_LOST_EXIT = 3  # a rank that stopped because another one died (not the cause)
# Rank 0 alone evaluates and draws grids while the others wait in their next collective, so the
# collectives may wait long; a rank that dies is noticed by the launcher, not by this timeout.
TIMEOUT = datetime.timedelta(hours=2)
# After SIGINT / SIGTERM the launcher forwards the signal and waits this long for the ranks to
# finish their step and write a checkpoint before it kills them.
SHUTDOWN_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; World() is a single process."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1  # processes on this machine
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # of collectives

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def shard(self, *batches: Tensor | None) -> tuple[Tensor | None, ...]:
        """This rank's slice of each global batch (B, ...) -> (B / size, ...); None stays None."""
        if self.size == 1:
            return batches
        return tuple(None if x is None else x.chunk(self.size)[self.rank] for x in batches)

    def barrier(self) -> None:
        if self.size > 1:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            dist.barrier(device_ids=ids)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (e.g. one rank reached a time limit)."""
        if self.size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_interval(self, stats) -> None:
        """Sum a logging interval (train.IntervalStats) over the ranks, in place: loss sums and
        counts per t-bucket and examples add up to the global batch's; the gradient norm, the
        same on every rank after DDP's averaging, is averaged."""
        if self.size == 1:
            return
        n, device = len(stats.sums), stats.sums.device
        examples = torch.tensor([float(stats.examples)], dtype=torch.float64, device=device)
        packed = torch.cat([stats.sums, stats.counts, stats.grad_norm.reshape(1), examples])
        packed = packed.to(self.device)
        dist.all_reduce(packed)
        packed = packed.to(device)
        stats.sums, stats.counts = packed[:n].clone(), packed[n : 2 * n].clone()
        stats.grad_norm = packed[2 * n] / self.size
        stats.examples = round(float(packed[2 * n + 1]))


def env_world() -> World:
    """The World torchrun describes in the environment (RANK, WORLD_SIZE, ...); no process
    group is joined and no device chosen: that is `setup`."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    if size == 1:
        return World()
    return World(
        int(env["RANK"]), int(env["LOCAL_RANK"]), size, int(env.get("LOCAL_WORLD_SIZE", size))
    )


def uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def check_world(cfg: RunConfig, nproc: int, local: int | None = None) -> None:
    """Refuse, before any work, what `nproc` processes (`local` of them on this machine) cannot
    do; raises ConfigError naming the fix."""
    t, local = cfg.train, nproc if local is None else local
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    share = nproc * t.grad_accum
    if t.batch_size % share:
        fit = -(-t.batch_size // share) * share  # the next multiple up
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) is the global batch and must be divisible by "
            f"the {nproc} processes x train.grad_accum ({t.grad_accum}); "
            f"use e.g. train.batch_size={fit}"
        )
    if nproc > 1 and t.device.startswith("cuda:"):
        raise ConfigError(
            f"train.device={t.device} with {nproc} processes: each process uses "
            "cuda:LOCAL_RANK; set train.device=auto, cuda or cpu"
        )
    if nproc > 1 and uses_cuda(t.device) and local > torch.cuda.device_count():
        raise ConfigError(
            f"asked for {local} processes but only {torch.cuda.device_count()} GPUs are "
            "visible; use fewer processes, or train.device=cpu"
        )


def cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def setup(cfg: RunConfig) -> World:
    """Join the process group torchrun (or --nproc) started, choosing this rank's device and
    CPU threads; a single process (no WORLD_SIZE > 1) returns World() and changes nothing."""
    world = env_world()
    if world.size > 1:
        check_world(cfg, world.size, world.local_size)
    return join(world, cfg.train.device, cfg.train.threads)


def join(world: World, device: str, threads: int = 0) -> World:
    """`world` with its process group joined: NCCL on cuda:LOCAL_RANK when `device` uses CUDA,
    else gloo on the CPU with the cores shared out (threads 0) among the machine's processes.
    Training, `difflab sample` and `difflab eval` all join here."""
    if world.size == 1:
        return world
    if uses_cuda(device):
        torch.cuda.set_device(world.local_rank)  # device auto / cuda now means this GPU
        dev, backend = torch.device("cuda", world.local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
        if threads == 0:  # share the cores (build_parts applies train.threads > 0)
            torch.set_num_threads(max(1, cpu_cores() // world.local_size))
    if not dist.is_initialized():
        nccl = dev if backend == "nccl" else None
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=nccl)
    return World(world.rank, world.local_rank, world.size, world.local_size, dev)


def attach(parts, cfg: RunConfig, world: World, start: int) -> None:
    """Make train.Parts train as one rank of `world`: the network behind DDP (gradients
    averaged in backward) and this rank's own dropout RNG."""
    if world.size == 1:
        return
    if world.rank or not start:  # rank 0 keeps the torch RNG a resumed checkpoint restored
        torch.manual_seed(cfg.train.seed + 1000 * world.rank + start)
    ids = [world.local_rank] if world.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(parts.forward.net, device_ids=ids)
    parts.forward = parts.forward.with_net(ddp)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def fault_hook(world: World, step: int, what: str = "STEP") -> None:
    """Test hook: leave at once, as a crash would, if DIFFLAB_FAULT_RANK and
    DIFFLAB_FAULT_<what> (STEP: training; SAMPLE: sharded sampling) name this rank and `step`."""
    rank, at = os.environ.get("DIFFLAB_FAULT_RANK"), os.environ.get(f"DIFFLAB_FAULT_{what}")
    if rank is not None and at is not None and int(rank) == world.rank and int(at) == step:
        sys.stderr.flush()
        os._exit(FAULT_EXIT)


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (that rank is the cause)."""
    if isinstance(error, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(error)
    return any(s in text for s in ("closed by peer", "reset by peer", "NCCL communicator"))


def leave_after_lost_peer(world: World) -> NoReturn:
    """Say that this rank stops because another failed, and leave at once with PEER_LOST_EXIT.

    A process group whose peer died cannot be torn down cleanly: at interpreter exit, gloo's
    threads are destroyed while still joinable and the C++ runtime aborts ("terminate called
    without an active exception", SIGABRT), which reads as this rank's own failure. os._exit
    skips that teardown; nothing is left to write (rank 0 writes checkpoints atomically between
    steps, and the launcher reports the rank that failed first)."""
    if not os.environ.get("DIFFLAB_LAUNCHED"):  # difflab's launcher says which one failed
        print(f"difflab: rank {world.rank} stopped: another process failed", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PEER_LOST_EXIT)


def launch(argv: list[str], nproc: int, run_dir: Path | None = None) -> int:
    """Run `python -m difflab <argv>` (train, sample or eval) in `nproc` processes, as torchrun
    --standalone does, and return the exit code: 0, 2 if a process refused bad input (it printed
    why), 130 / 143 after SIGINT / SIGTERM (forwarded to every process; training stops with a
    checkpoint), else 1 with one line naming the first process that failed. One failing process
    stops the others. `run_dir`: the run being trained (None: sample / eval, which write only
    when every process is done)."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not os.environ.get("DIFFLAB_TRACEBACK"):  # the agent's own failure report is long
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ["DIFFLAB_LAUNCHED"] = "1"  # the processes inherit it
    with tempfile.TemporaryDirectory(prefix="difflab-launch-") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port
            run_id=f"difflab-{uuid.uuid4().hex[:8]}",
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,  # a signal: time to finish the step and save
        )
        try:
            elastic_launch(config, sys.executable)("-m", "difflab", *argv)
        except ChildFailedError as e:
            rank, code = _first_cause(e.failures)
            if code in (2, 130, 143):  # bad input or a fault (it said why), or a signal: stopped
                return code
            print(f"difflab: error: {_failure_message(rank, code, run_dir)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # rank 0 says how to continue
            return 130
        except SignalException as e:  # forwarded to every rank; they stop with a checkpoint
            return 128 + int(e.sigval)
    return 0


def _first_cause(failures: dict) -> tuple[int, int]:
    """(rank, exit code) of the failure that caused the others: ranks the launcher stopped
    (SIGTERM) or that lost a peer (PEER_LOST_EXIT) come after the rest, then by rank."""
    knock_on = (-signal.SIGTERM, PEER_LOST_EXIT)
    rank = min(failures, key=lambda r: (failures[r].exitcode in knock_on, r))
    return rank, failures[rank].exitcode


def _failure_message(rank: int, code: int, run_dir: Path | None) -> str:
    how = f"exit {code}"
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    if run_dir is None:
        return f"process rank {rank} failed ({how}); nothing was written"
    if list_checkpoints(run_dir / "checkpoints"):
        after = f"the run can be resumed from its last checkpoint with --resume {run_dir}"
    else:
        after = "it wrote no checkpoint, so start it again"
    return f"training process rank {rank} failed ({how}); {after}"
