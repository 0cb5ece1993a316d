"""Benchmark: time to a good MNIST model, the `mnist` preset against its old recipe (issue 18).

Both are trained here, one after the other, on this machine, then judged alike:
1. the old recipe: the `mnist` preset as it was before issue 18 (fp32, 2,600 steps, constant
   learning rate), i.e. the preset with `train.precision=fp32 train.steps=2600
   train.lr_schedule=constant`;
2. the `mnist` preset as it is now (train.precision=auto: bf16 where the CPU has bf16 units);
3. for each, the training wall time (the whole `train` call: data, steps, checkpoints) and
   1,000 class-balanced samples by DDPM-50 at guidance 1.25 judged by the MNIST judge:
   accuracy on the requested classes, judge Frechet distance to the test split; the FD of
   1,000 real training images to the test split beside them (the floor at this n).

Targets (issue 18): the preset reaches judge accuracy >= 0.99 and an FD no worse than the old
recipe's 7.4 in at most 10.5 minutes of wall time (the old recipe: 20 min 52 s on the AMD CPU).

With --flow, `mnist-flow` (the mnist recipe as a rectified flow, issue 12) is trained on the
same machine too and judged with its own sampler (DPM-Solver++(2M), 10 steps); its wall time
must not exceed the `mnist` preset's. With --same, the old recipe is trained once more with
only train.precision=bf16: the same run in the other precision, whose judged figures must
agree with the fp32 run's within their noise.

    python bench/mnist_time.py --root ../shared/data [--judge J] [--work DIR] [--only NAME]
        [--flow] [--same]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from difflab.config import apply_overrides, preset
from difflab.evaluation.classifier import judge_features, judge_predict
from difflab.evaluation.frechet import feature_statistics, frechet_distance
from difflab.files import write_text_atomically
from difflab.runs import draw_samples, load_run, sample_labels
from difflab.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from mnist import balanced_images_of, images_of, judge_for, to_judge_size

OLD_RECIPE = ["train.precision=fp32", "train.steps=2600", "train.lr_schedule=constant"]
# name -> (preset, overrides); "flow" (--flow) is mnist-flow on the same budget (issue 12);
# "old-bf16" (--same) is the old recipe with only the precision changed: quality must not move
RECIPES = {
    "old": ("mnist", OLD_RECIPE),
    "new": ("mnist", []),
    "flow": ("mnist-flow", []),
    "old-bf16": ("mnist", [*OLD_RECIPE, "train.precision=bf16"]),  # the old run, only in bf16
}


def trained(name: str, args) -> tuple[Path, float]:
    """Train the recipe (or reuse a finished run and its recorded wall time)."""
    run_dir = Path(args.work) / name
    wall_file = run_dir / "bench_wall_s.json"
    if wall_file.exists():
        return run_dir, json.loads(wall_file.read_text())["train_wall_s"]
    name_of_preset, overrides = RECIPES[name]
    cfg = apply_overrides(preset(name_of_preset), [f"data.root={args.root}", *overrides])
    t0 = time.perf_counter()
    train(cfg, run_dir, progress=True)
    wall = time.perf_counter() - t0
    write_text_atomically(wall_file, json.dumps({"train_wall_s": wall}) + "\n")
    return run_dir, wall


def judged(run_dir: Path, judge, test_stats, own_sampler: bool = False) -> dict:
    """1,000 class-balanced samples by DDPM-50 at guidance 1.25 (or, with own_sampler, the
    preset's own sampler and steps), judged."""
    run = load_run(run_dir)
    labels = sample_labels(run, 1000, per_class=True)
    scfg = dataclasses.replace(run.cfg.sample, n=1000, batch_size=250, precision="fp32")
    if not own_sampler:
        scfg = dataclasses.replace(
            scfg, sampler="ddpm", steps=50, spacing="quadratic", guidance=1.25
        )
    t0 = time.perf_counter()
    x = to_judge_size(draw_samples(run, scfg, labels=labels, progress=True))
    acc = float((judge_predict(judge, x) == labels).float().mean())
    fd = frechet_distance(*feature_statistics(judge_features(judge, x)), *test_stats)
    return {
        "preset": run.cfg.preset,
        "sampler": f"{scfg.sampler}-{scfg.steps}",
        "guidance": scfg.guidance,
        "step": run.step,
        "precision": run.cfg.train.precision,
        "steps": run.cfg.train.steps,
        "lr_schedule": run.cfg.train.lr_schedule,
        "accuracy": acc,
        "fd": fd,
        "sample_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw/")
    ap.add_argument("--judge", default="bench/results/judge-mnist.safetensors")
    ap.add_argument("--work", default="/tmp/difflab-mnist-time", help="run directories")
    ap.add_argument("--only", choices=sorted(RECIPES), help="one recipe (default: old, new)")
    ap.add_argument("--flow", action="store_true", help="also mnist-flow (its own sampler)")
    ap.add_argument("--same", action="store_true", help="also the old recipe in bf16")
    ap.add_argument("--out", default="bench/results/mnist_time.json")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    judge = judge_for(args.root, Path(args.judge))
    test_stats = feature_statistics(judge_features(judge, images_of(args.root, "test")))
    real = balanced_images_of(args.root, "train", 100)
    result = {
        "benchmark": "mnist_time",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "fd_train_vs_test": frechet_distance(
            *feature_statistics(judge_features(judge, real)), *test_stats
        ),
    }
    names = (
        [args.only]
        if args.only
        else (["old", "new"] + ["flow"] * args.flow + ["old-bf16"] * args.same)
    )
    for name in names:
        run_dir, wall = trained(name, args)
        judged_file = run_dir / "bench_judged.json"  # seeded: judging again gives the same
        if judged_file.exists():
            row = json.loads(judged_file.read_text())
        else:
            row = judged(run_dir, judge, test_stats, own_sampler=name == "flow")
            write_text_atomically(judged_file, json.dumps(row) + "\n")
        row = {"run": str(run_dir), "train_wall_s": wall, **row}
        result[name] = row
        print(
            f"{name}: {row['steps']} steps, {row['precision']}, trained in {wall:.0f} s; "
            f"{row['sampler']} g{row['guidance']}: accuracy {row['accuracy']:.4f}, "
            f"FD {row['fd']:.2f}"
        )
    if "old" in result and "old-bf16" in result:
        result["same_run_bf16_minus_fp32"] = {
            k: result["old-bf16"][k] - result["old"][k] for k in ("accuracy", "fd")
        }
    if "old" in result and "new" in result:
        result["wall_ratio"] = result["new"]["train_wall_s"] / result["old"]["train_wall_s"]
        new = result["new"]
        result["targets"] = {
            "accuracy>=0.99": new["accuracy"] >= 0.99,
            "fd<=old": new["fd"] <= result["old"]["fd"],
            "wall<=10.5min": new["train_wall_s"] <= 630,
        }
        print(f"new / old wall time {result['wall_ratio']:.3f}; targets {result['targets']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
