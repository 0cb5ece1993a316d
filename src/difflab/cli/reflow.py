"""`difflab reflow RUN`: draw a flow run's (noise, ODE endpoint) pairs into RUN/reflow/ (resumable:
run the same command again after a kill), train the rectified flow of the next round on them
(initialised from RUN unless --no-init) and report the straightness of both (Liu et al. 2023).
Running it on the reflow run gives the third round the same way."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from difflab.config import ConfigError


def cmd_reflow(args: argparse.Namespace) -> int:
    from difflab.cli.sample_flags import ema_choice, sample_config
    from difflab.files import write_text_atomically
    from difflab.flow.pairs import check_flow_run, draw_pairs
    from difflab.flow.reflow import reflow_config
    from difflab.flow.straightness import straightness
    from difflab.runs import load_run

    run = load_run(
        args.run, checkpoint=args.checkpoint, use_ema=ema_choice(args), device=args.device
    )
    scfg = sample_config(run.cfg.sample, args)
    check_flow_run(run.model, scfg)  # before anything is written
    name = args.name or f"{run.run_dir.name}-reflow"
    out_dir = Path(args.runs) / name if args.runs else run.run_dir.parent / name
    if not args.pairs_only:
        cfg = reflow_config(run.cfg, out_dir, None if args.no_init else run.checkpoint, args.set)
        if (out_dir / "checkpoints").is_dir():
            raise ConfigError(
                f"{out_dir} is already a run; pass --name for a new one, or continue it with "
                f"`difflab train --resume {out_dir}`"
            )
    start = time.perf_counter()
    folder = draw_pairs(run, scfg, args.pairs, args.chunk, progress=not args.quiet)
    pair_s = time.perf_counter() - start
    print(f"difflab: {args.pairs} pairs in {folder} ({pair_s:.0f} s)")
    if args.pairs_only:
        return 0
    cfg = reflow_config(run.cfg, folder, None if args.no_init else run.checkpoint, args.set)
    start = time.perf_counter()
    ckpt = _train(cfg, out_dir, quiet=args.quiet)
    train_s = time.perf_counter() - start
    before = straightness(run.model, scfg)[0]
    after_run = load_run(out_dir, device=args.device)
    after = straightness(after_run.model, dataclasses.replace(scfg))[0]
    summary = {
        "source": str(run.checkpoint),
        "pairs": str(folder),
        "n_pairs": args.pairs,
        "pairs_seconds": pair_s,
        "train_seconds": train_s,
        "checkpoint": str(ckpt),
        "straightness": {"source": before, "reflow": after},
        "sampler": scfg.sampler,
        "steps": scfg.steps,
    }
    write_text_atomically(out_dir / "reflow.json", json.dumps(summary, indent=2) + "\n")
    print(f"difflab: straightness S(Z): {run.run_dir.name} {before:.4g}, {name} {after:.4g}")
    if not args.no_finish:
        from difflab.report.run import finish_run

        finish_run(out_dir, progress=not args.quiet)
    return 0


def _train(cfg, out_dir: Path, quiet: bool) -> Path:
    """Train the reflow run under the run lock and signal guard, as `difflab train` does."""
    from difflab.report.run import training_hooks
    from difflab.training import faults
    from difflab.training.loop import train

    print(f"difflab: run directory {out_dir}")
    with faults.RunLock(out_dir, enabled=True), faults.StopSignals():
        return train(cfg, out_dir, resume=False, progress=not quiet, hooks=training_hooks())
