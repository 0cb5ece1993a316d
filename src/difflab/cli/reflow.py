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

from difflab.config import ConfigError, SampleConfig


def cmd_reflow(args: argparse.Namespace) -> int:
    from difflab.cli.sample_flags import ema_choice, sample_config
    from difflab.runs import load_run

    run = load_run(
        args.run, checkpoint=args.checkpoint, use_ema=ema_choice(args), device=args.device
    )
    run_reflow(
        run,
        sample_config(run.cfg.sample, args),
        reflow_dir(run.run_dir, args.name, args.runs),
        n_pairs=args.pairs,
        chunk=args.chunk,
        init=not args.no_init,
        overrides=args.set,
        pairs_only=args.pairs_only,
        progress=not args.quiet,
        finish=not args.no_finish,
    )
    return 0


def reflow_dir(source: Path, name: str | None, runs: str | Path | None) -> Path:
    """The reflow run's directory: RUNS/NAME, where both default to beside the source run and
    its name + '-reflow'. A weights file's default RUNS is runs/, as `difflab train`'s: a
    shipped one lies in the installed package, where nothing is written."""
    from difflab.flow.pairs import source_name

    name = name or f"{source_name(source)}-reflow"
    if runs:
        return Path(runs) / name
    return source.parent / name if source.is_dir() else Path("runs") / name


def run_reflow(
    run,
    scfg: SampleConfig,
    out_dir: Path,
    *,
    n_pairs: int,
    chunk: int,
    init: bool,
    overrides: list[str],
    pairs_only: bool,
    progress: bool,
    finish: bool,
) -> dict | None:
    """One round of reflow from a loaded flow run (`runs.LoadedRun`), as `difflab reflow` runs
    it: the pairs with `scfg`'s deterministic sampler, the next run trained on them in
    `out_dir` (from the run's weights when `init`), both straightnesses in out_dir/reflow.json,
    then the figures (`finish`). Shared by `difflab reflow` and `difflab.reflow`; returns the
    summary written to reflow.json (None with `pairs_only`)."""
    from difflab.files import write_text_atomically
    from difflab.flow.pairs import check_flow_run, draw_pairs, pairs_home
    from difflab.flow.reflow import reflow_config

    check_flow_run(run.model, scfg)  # before anything is written
    init_from = run.checkpoint if init else None
    if not pairs_only:
        reflow_config(run.cfg, out_dir, init_from, overrides)  # bad --set refused here
        if (out_dir / "checkpoints").is_dir():
            raise ConfigError(
                f"{out_dir} is already a run; pass --name for a new one, or continue it with "
                f"`difflab train --resume {out_dir}`"
            )
    start = time.perf_counter()
    home = pairs_home(run.run_dir, out_dir)
    folder = draw_pairs(run, scfg, n_pairs, chunk, progress=progress, home=home)
    pair_s = time.perf_counter() - start
    print(f"difflab: {n_pairs} pairs in {folder} ({pair_s:.0f} s)")
    if pairs_only:
        return None
    cfg = reflow_config(run.cfg, folder, init_from, overrides)
    start = time.perf_counter()
    ckpt = _train(cfg, out_dir, progress)
    train_s = time.perf_counter() - start
    summary = _summary(run, scfg, out_dir, folder, ckpt, (n_pairs, pair_s, train_s))
    write_text_atomically(out_dir / "reflow.json", json.dumps(summary, indent=2) + "\n")
    before, after = summary["straightness"].values()
    print(
        f"difflab: straightness S(Z): {run.run_dir.name} {before:.4g}, {out_dir.name} {after:.4g}"
    )
    if finish:
        from difflab.report.run import finish_run

        finish_run(out_dir, progress=progress)
    return summary


def _summary(run, scfg, out_dir: Path, folder: Path, ckpt: Path, counts: tuple) -> dict:
    """reflow.json: where the pairs came from, the times, and the straightness of both flows."""
    from difflab.flow.straightness import default_paths, straightness
    from difflab.runs import load_run

    n_pairs, pair_s, train_s = counts
    n = default_paths(run.model.kind.shape)
    before = straightness(run.model, scfg, n=n)[0]
    after_run = load_run(out_dir, device=str(run.device))
    after = straightness(after_run.model, dataclasses.replace(scfg), n=n)[0]
    return {
        "source": str(run.checkpoint),
        "pairs": str(folder),
        "n_pairs": n_pairs,
        "pairs_seconds": pair_s,
        "train_seconds": train_s,
        "checkpoint": str(ckpt),
        "straightness": {"source": before, "reflow": after},
        "straightness_paths": n,
        "sampler": scfg.sampler,
        "steps": scfg.steps,
    }


def _train(cfg, out_dir: Path, progress: bool) -> Path:
    """Train the reflow run under the run lock and signal guard, as `difflab train` does."""
    from difflab.report.run import training_hooks
    from difflab.training import faults
    from difflab.training.loop import train

    print(f"difflab: run directory {out_dir}")
    with faults.RunLock(out_dir, enabled=True), faults.StopSignals():
        return train(cfg, out_dir, resume=False, progress=progress, hooks=training_hooks())
