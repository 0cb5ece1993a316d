"""`difflab bench NAME`: training and sampling speed of a named configuration, against diffusers.

One run measures, on one device (CUDA when present, else the CPU):
- training, for difflab's real training step and for diffusers' UNet2DModel in the same layout
  (parameter counts checked): images/s, step-time spread, peak memory, FLOPs per step
  (FlopCounterMode) and achieved FLOP/s as a fraction of the device's matmul peak measured in
  the same run (and of the spec sheet for listed GPUs);
- sampling: ms per image for each sampler and NFE budget, difflab through `samplers.generate`,
  diffusers through its scheduler loop;
- the ratios difflab / diffusers. The libraries take turns, step by step, so that load changes
  on a shared machine hit both.

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
    resolve,
)
from difflab.benchmark.report import markdown, write_results
from difflab.benchmark.run import run_benchmark
from difflab.share.mapping import NoEquivalent, unet2d_config


def bench_main(args: argparse.Namespace) -> tuple[str, Path, Path]:
    """What `difflab bench` and bench/bench.py do: run, write both files, return the Markdown
    and the paths."""
    result = run_benchmark(options_from_args(args))
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
    "resolve",
    "run_benchmark",
    "unet2d_config",
    "write_results",
]
