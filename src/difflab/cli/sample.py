"""`difflab sample`, `difflab plot` and `difflab bench`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from difflab.cli.parsers import sample_config


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.runs import draw_samples, load_run, sample_labels, save_samples
    from difflab.training.faults import out_of_memory

    run = load_run(args.run, checkpoint=args.checkpoint, use_ema=not args.raw, device=args.device)
    scfg = sample_config(run.cfg.sample, args)
    labels = sample_labels(run, scfg.n, args.class_label, args.per_class, scfg.seed)
    start = time.perf_counter()
    batch, advice = f"--batch-size {scfg.batch_size}", "a smaller --batch-size (same samples)"
    with out_of_memory("sampling", batch, advice):
        samples = draw_samples(run, scfg, labels=labels, progress=not args.quiet)
    meta = dict(
        sampler=scfg.sampler,
        steps=scfg.steps,
        seed=scfg.seed,
        ema=scfg.use_ema,
        checkpoint=str(run.checkpoint),
    )
    if labels is not None:
        meta["guidance"] = scfg.guidance
    path = save_samples(args.out, samples, labels, **meta)
    print(
        f"difflab: {len(samples)} samples ({scfg.sampler}, {scfg.steps} steps) in "
        f"{time.perf_counter() - start:.1f} s -> {path}"
    )
    if run.model.kind.is_image:
        from difflab.report.grids import class_grid, save_grid

        png = path.with_suffix(".png")
        if labels is not None:
            class_grid(samples.numpy(), labels.numpy(), png, run.class_names)
        else:
            save_grid(samples[:100].numpy(), png)
        print(f"difflab: grid -> {png}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from difflab.report.run import plot_run

    for path in plot_run(Path(args.run), resample=args.resample, progress=not args.quiet):
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from difflab.benchmark import bench_main

    text, json_path, md_path = bench_main(args)
    print(text)
    print(f"difflab: wrote {json_path} and {md_path}")
    return 0
