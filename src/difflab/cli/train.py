"""`difflab train`: one process, torchrun, or --nproc N processes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from difflab.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    preset,
)
from difflab.files import check_writable


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.training import distributed

    world = distributed.env_world()  # this process's rank when torchrun started it
    if args.resume:
        from difflab.runs import check_run_dir

        run_dir = check_run_dir(args.resume)
        cfg = apply_overrides(RunConfig.load(run_dir / "config.json"), args.set)
    else:
        cfg = RunConfig.load(args.config) if args.config else preset(args.preset)
        cfg = apply_overrides(cfg, args.set)
        if world.size > 1 and not args.name:  # a default name has the time in it
            raise ConfigError("under torchrun every process must open the same run: pass --name")
        run_dir = default_run_dir(cfg, args.runs, args.name)
    check_writable(run_dir, f"--resume {run_dir}" if args.resume else f"--runs {args.runs}")
    if args.nproc is not None:
        if world.size > 1:
            raise ConfigError("--nproc starts its own processes; leave it out under torchrun")
        distributed.check_world(cfg, args.nproc)
        if args.nproc > 1:
            return _launch_train(args, cfg, run_dir)
    return run_training(
        cfg,
        run_dir,
        world,
        resume=bool(args.resume),
        progress=not args.quiet,
        finish=not args.no_finish,
    )


def default_run_dir(cfg: RunConfig, runs: str | Path, name: str | None) -> Path:
    """RUNS/NAME, or RUNS/<preset>-<time> without a name."""
    return Path(runs) / (name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_training(
    cfg: RunConfig, run_dir: Path, world, *, resume: bool, progress: bool, finish: bool
) -> int:
    """Train `cfg` into `run_dir` as `difflab train` does, in this process (one rank of a
    world): the run lock, checkpoint-then-stop on SIGINT / SIGTERM, out-of-memory advice, and
    on rank 0 the figures and report (`finish`). Shared by `difflab train` and
    `difflab.train`; returns the command's exit code (0, 130 interrupted, 128 + signal)."""
    from difflab.report.run import finish_run, training_hooks
    from difflab.training import distributed, faults
    from difflab.training.loop import train

    if world.is_main:
        print(f"difflab: run directory {run_dir}")
    start = time.perf_counter()
    oom = faults.out_of_memory("training", *faults.train_memory_advice(cfg))
    lock = faults.RunLock(run_dir, enabled=world.is_main)  # one trainer per run directory
    try:
        with lock, faults.StopSignals() as stop, oom:  # SIGINT / SIGTERM: checkpoint, then stop
            ckpt = train(cfg, run_dir, resume=resume, progress=progress, hooks=training_hooks())
    except KeyboardInterrupt:
        if world.is_main:
            print(
                f"\ndifflab: interrupted; continue with `difflab train --resume {run_dir}`",
                file=sys.stderr,
            )
        return 130
    except RuntimeError as e:  # a collective failed: the rank that died is the one to report
        if world.size == 1 or not distributed.lost_peer(e):
            raise
        distributed.leave_after_lost_peer(world)
    if stop.exit_code:  # stopped by a signal, with a checkpoint
        if world.is_main:
            print(
                f"difflab: stopped; continue with `difflab train --resume {run_dir}`",
                file=sys.stderr,
            )
        return stop.exit_code
    if not world.is_main:  # rank 0 alone samples, evaluates and draws
        return 0
    print(f"difflab: trained in {time.perf_counter() - start:.0f} s; checkpoint {ckpt}")
    if finish:
        finish_run(run_dir, progress=progress)
    return 0


def _launch_train(args: argparse.Namespace, cfg: RunConfig, run_dir: Path) -> int:
    """`difflab train --nproc N`: this command in N processes, as torchrun would start them,
    each told the run's directory (so they agree on a default name)."""
    from difflab.training.distributed import launch
    from difflab.training.parts import check_train_config

    check_train_config(cfg)  # one message here rather than one per process
    if args.resume:
        argv = ["train", "--resume", str(run_dir)]
    else:
        argv = ["train", "--preset", args.preset, "--runs", str(run_dir.parent)]
        argv += ["--name", run_dir.name] + (["--config", args.config] if args.config else [])
    argv += ["--set", *args.set] if args.set else []
    argv += [flag for flag, on in (("--no-finish", args.no_finish), ("--quiet", args.quiet)) if on]
    return launch(argv, args.nproc, run_dir)
