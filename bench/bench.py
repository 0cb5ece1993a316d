"""Benchmark: training and sampling speed of a named configuration, difflab against diffusers.

The same as `difflab bench NAME` (the work is `difflab.benchmark`): training images/s, step-time
spread, peak memory, FLOPs per step and achieved FLOP/s as a share of the device's matmul peak
measured in the same run; ms per image for each sampler and NFE budget; the ratios difflab /
diffusers, with the two libraries taking turns. Needs diffusers for its columns:
pip install -e '.[bench]'. Writes bench/results/bench-NAME-DEVICE.json and .md.

    python bench/bench.py cifar10-ddpm [--batch-size 16] [--steps 6] [--warmup 2]
                          [--samplers ddim,dpmpp_2m,heun] [--nfe 10,50] [--precision bf16]
                          [--compile] [--channels-last] [--device cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys

from difflab.benchmark import add_arguments, bench_main
from difflab.config import ConfigError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    try:
        text, json_path, md_path = bench_main(ap.parse_args())
    except ConfigError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"-> {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
