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
    from difflab.report.run import finish_run, training_hooks
    from difflab.training import distributed, faults
    from difflab.training.loop import train

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
        run_dir = Path(args.runs) / (args.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(run_dir, f"--resume {run_dir}" if args.resume else f"--runs {args.runs}")
    if args.nproc is not None:
        if world.size > 1:
            raise ConfigError("--nproc starts its own processes; leave it out under torchrun")
        distributed.check_world(cfg, args.nproc)
        if args.nproc > 1:
            return _launch_train(args, cfg, run_dir)
    if world.is_main:
        print(f"difflab: run directory {run_dir}")
    start = time.perf_counter()
    oom = faults.out_of_memory("training", *faults.train_memory_advice(cfg))
    lock = faults.RunLock(run_dir, enabled=world.is_main)  # one trainer per run directory
    try:
        with lock, faults.StopSignals() as stop, oom:  # SIGINT / SIGTERM: checkpoint, then stop
            ckpt = train(
                cfg,
                run_dir,
                resume=bool(args.resume),
                progress=not args.quiet,
                hooks=training_hooks(),
            )
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
    if not args.no_finish:
        finish_run(run_dir, progress=not args.quiet)
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
