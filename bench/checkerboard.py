"""Benchmark: the default checkerboard run, trained within a CPU time budget.

Trains the `toy2d` preset (or the preset with --set overrides) through `difflab.training.loop`, then
draws 20,000 samples with DDPM (1000 steps) and DDIM (50 steps) from the EMA weights and reports
the in-square fraction and sliced W2 against fresh true samples. The reference measured in the
same run is the floor of each metric: the same figures for a second set of true samples.

Target (issue 2): training <= 5 minutes on 2 CPU cores; in-square >= 0.97 (DDPM-1000) and
>= 0.95 (DDIM-50).

    python bench/checkerboard.py [--set key=value ...] [--out bench/results/checkerboard.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from difflab.config import apply_overrides, preset
from difflab.evaluation.toy2d import evaluate_toy
from difflab.files import write_text_atomically
from difflab.runs import draw_samples, load_run
from difflab.training.loop import train

SAMPLERS = [("ddpm", 1000), ("ddim", 50)]
TARGETS = {"ddpm": 0.97, "ddim": 0.95}
BUDGET_S = 300.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--set", action="append", default=[], help="config override, e.g. train.steps=4000"
    )
    ap.add_argument("--n", type=int, default=20000, help="samples per sampler")
    ap.add_argument("--out", default="bench/results/checkerboard.json")
    ap.add_argument("--run-dir", help="keep the run here (default: a temporary folder)")
    args = ap.parse_args()

    cfg = apply_overrides(preset("toy2d"), args.set)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp()) / "run"
    start = time.perf_counter()
    train(cfg, run_dir, progress=True)
    train_s = time.perf_counter() - start
    run = load_run(run_dir)
    rows = []
    for sampler, steps in SAMPLERS:
        scfg = dataclasses.replace(
            cfg.sample, sampler=sampler, steps=steps, n=args.n, batch_size=args.n
        )
        t0 = time.perf_counter()
        samples = draw_samples(run, scfg, progress=True).numpy()
        result = evaluate_toy(samples, "checkerboard")
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "sample_s": time.perf_counter() - t0,
                **result,
                "target_in_square": TARGETS[sampler],
                "met": result["in_square"] >= TARGETS[sampler],
            }
        )
    report = {
        "benchmark": "checkerboard",
        "train_s": train_s,
        "train_budget_s": BUDGET_S,
        "within_budget": train_s <= BUDGET_S,
        "train_steps": cfg.train.steps,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "overrides": args.set,
        "results": rows,
    }
    print(
        f"\ntraining: {train_s:.0f} s (budget {BUDGET_S:.0f} s), {cfg.train.steps} steps, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'sampler':<8} {'steps':>5} {'in_square':>9} {'target':>6} "
        f"{'sliced_w2':>9} {'floor':>7} {'time_s':>7}"
    )
    for r in rows:
        print(
            f"{r['sampler']:<8} {r['steps']:>5} {r['in_square']:>9.4f} "
            f"{r['target_in_square']:>6.2f} "
            f"{r['sliced_w2']:>9.4f} {r['sliced_w2_floor']:>7.4f} {r['sample_s']:>7.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
