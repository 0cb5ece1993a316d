"""`difflab bench NAME`: training and sampling speed of a named configuration, against diffusers.

One run measures, on one device (CUDA when present, else the CPU):
- training, for difflab's real training step and for diffusers' UNet2DModel in the same layout
  (parameter counts checked): images/s, step-time spread, peak memory, FLOPs per step
  (FlopCounterMode) and achieved FLOP/s as a fraction of the device's matmul peak measured in
  the same run (and of the spec sheet for listed GPUs);
- sampling: ms per image for each sampler and NFE budget, difflab through `samplers.generate`,
  diffusers through its scheduler loop;
- the ratios difflab / diffusers. The libraries take turns, step by step, so that load changes
  on a shared machine hit both;
- with several precisions (`--precision fp32,bf16`, the default where the device has bf16
  units), all of the above once per precision and the comparison across them (precisions.py).

    from difflab.benchmark import BenchOptions, run_benchmark, write_results
    result = run_benchmark(BenchOptions("cifar10-ddpm", batch_size=16, steps=6, warmup=2))
    json_path, md_path = write_results(result, "bench/results")
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.benchmark.measure import count_flops, matmul_peak
from difflab.benchmark.options import (
    CONFIGS,
    BenchOptions,
    add_arguments,
    options_from_args,
    precisions_of,
    resolve,
)
from difflab.benchmark.precisions import run_precisions
from difflab.benchmark.report import markdown, write_results
from difflab.benchmark.run import run_benchmark
from difflab.share.mapping import NoEquivalent, unet2d_config


def bench_main(args: argparse.Namespace) -> tuple[str, Path, Path]:
    """What `difflab bench` and bench/bench.py do: run, write both files, return the Markdown
    and the paths."""
    opts = options_from_args(args)
    precisions = precisions_of(args.precision, args.device)
    result = run_precisions(opts, precisions) if len(precisions) > 1 else run_benchmark(opts)
    json_path, md_path = write_results(result, args.out)
    return markdown(result), json_path, md_path


__all__ = [
    "CONFIGS",
    "BenchOptions",
    "NoEquivalent",
    "add_arguments",
    "bench_main",
    "count_flops",
    "markdown",
    "matmul_peak",
    "options_from_args",
    "precisions_of",
    "resolve",
    "run_benchmark",
    "run_precisions",
    "unet2d_config",
    "write_results",
]
