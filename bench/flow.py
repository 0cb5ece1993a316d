"""Benchmark (issue 12): rectified flow against diffusion on the checkerboard, reflow, and MNIST.

Checkerboard: the `toy2d` preset (diffusion) and `toy2d-flow` trained with the same network,
data and step budget (--steps, default the presets' 8,000); every deterministic sampler at 10
model evaluations on each's grids, sliced W2 over 20,000 samples against one reference set (the
evaluation's fixed seed), each preset's best; that sampler at 50 evaluations, share of 20,000
samples in correct squares.
Reflow: --pairs (noise, ODE endpoint) pairs of the flow (its best 50-NFE sampler), the
2-rectified flow trained on them from the flow's weights for --reflow-steps; both flows at 1,
2 and 4 Euler evaluations (sliced W2) and their straightness S(Z) (Liu et al. 2023, eq. 5), with
the reflow's cost (pairs, seconds).
--mnist FLOW_RUN DIFFUSION_RUN: 1,000 class-balanced samples of each at 10 evaluations (each
run's sampler at steps for 10 NFE), judge accuracy and judge FD to the test split.

    python bench/flow.py --work /tmp/flow [--steps 8000] [--threads 1] [--out OUT.json]
    python bench/flow.py --mnist RUN_FLOW RUN_MNIST --root ../shared/data --judge J.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from difflab.config import apply_overrides, preset
from difflab.evaluation.compare import compare_samplers
from difflab.evaluation.toy2d import evaluate_toy
from difflab.files import write_text_atomically
from difflab.flow.pairs import draw_pairs
from difflab.flow.reflow import reflow_config
from difflab.flow.straightness import straightness
from difflab.runs import draw_samples, load_run
from difflab.samplers import steps_for_nfe
from difflab.training.loop import train

GRIDS = {"toy2d": ["quadratic", "karras"], "toy2d-flow": ["uniform", "karras"]}


def trained(name: str, cfg, work: Path) -> tuple[Path, float]:
    run_dir = work / name
    t0 = time.perf_counter()
    train(cfg, run_dir, resume=(run_dir / "checkpoints").exists(), progress=True)
    return run_dir, time.perf_counter() - t0


def best_at(run_dir: Path, grids: list[str], nfe: int, n: int) -> tuple[dict, list[dict]]:
    rows = compare_samplers(
        run_dir, nfes=[nfe], grids=grids, changes={"n": n, "batch_size": n}, progress=True
    )["rows"]
    return min(rows, key=lambda r: r["sliced_w2"]), rows


def at_nfe(run, sampler: str, spacing: str, nfe: int, n: int) -> dict:
    steps = steps_for_nfe(sampler, nfe, run.cfg.sample)
    scfg = dataclasses.replace(
        run.cfg.sample,
        sampler=sampler,
        spacing=spacing,
        steps=steps,
        n=n,
        batch_size=n,
    )
    return evaluate_toy(draw_samples(run, scfg, progress=False).numpy(), run.cfg.data.name)


def checkerboard(args) -> dict:
    work = Path(args.work)
    common = [f"train.steps={args.steps}", f"train.threads={args.threads}"]
    out = {"steps": args.steps, "n": args.n}
    best = {}
    for name in ("toy2d", "toy2d-flow"):
        run_dir, train_s = trained(name, apply_overrides(preset(name), common), work)
        top, rows = best_at(run_dir, GRIDS[name], 10, args.n)
        run = load_run(run_dir)
        at50 = at_nfe(run, top["sampler"], top["spacing"], 50, args.n)
        best[name] = top
        out[name] = {"train_s": train_s, "best10": top, "rows10": rows, "best_at50": at50}
        print(
            f"{name}: best at 10 NFE {top['sampler']} {top['spacing']} sliced-W2 "
            f"{top['sliced_w2']:.4f}; at 50 NFE in-square {at50['in_square']:.4f}"
        )
    out["ratio_flow_over_diffusion_sw2_at10"] = (
        best["toy2d-flow"]["sliced_w2"] / best["toy2d"]["sliced_w2"]
    )
    out["reflow"] = reflow_part(args, work / "toy2d-flow", best["toy2d-flow"])
    return out


def reflow_part(args, flow_dir: Path, flow_best: dict) -> dict:
    flow = load_run(flow_dir)
    scfg = dataclasses.replace(
        flow.cfg.sample,
        sampler=flow_best["sampler"],
        spacing=flow_best["spacing"],
        steps=steps_for_nfe(flow_best["sampler"], 50, flow.cfg.sample),
        batch_size=10000,
    )
    t0 = time.perf_counter()
    folder = draw_pairs(flow, scfg, args.pairs, chunk=10000)
    pairs_s = time.perf_counter() - t0
    overrides = [f"train.steps={args.reflow_steps}", f"train.threads={args.threads}"]
    cfg = reflow_config(flow.cfg, folder, flow.checkpoint, overrides)
    reflow_dir, train_s = trained("toy2d-flow-reflow", cfg, Path(args.work))
    reflow = load_run(reflow_dir)
    out = {
        "pairs": args.pairs,
        "pairs_s": pairs_s,
        "pair_sampler": scfg.sampler,
        "pair_steps": scfg.steps,
        "train_steps": args.reflow_steps,
        "train_s": train_s,
    }
    for label, run in (("1-rectified", flow), ("2-rectified", reflow)):
        s = straightness(run.model, run.cfg.sample, n=2000)[0]
        rows = {nfe: at_nfe(run, "euler", "uniform", nfe, args.n) for nfe in (1, 2, 4)}
        out[label] = {
            "straightness": s,
            **{f"sliced_w2_{k}": r["sliced_w2"] for k, r in rows.items()},
        }
        print(
            f"{label}: S(Z) {s:.4f}; sliced-W2 at 1/2/4 NFE "
            + " / ".join(f"{r['sliced_w2']:.4f}" for r in rows.values())
        )
    out["ratio_sw2_at1"] = out["2-rectified"]["sliced_w2_1"] / out["1-rectified"]["sliced_w2_1"]
    return out


def mnist_part(args) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from difflab.evaluation.classifier import judge_features, judge_predict
    from difflab.evaluation.frechet import feature_statistics, frechet_distance
    from difflab.runs import sample_labels
    from mnist import balanced_images_of, images_of, judge_for, to_judge_size

    judge = judge_for(args.root, Path(args.judge))
    test_stats = feature_statistics(judge_features(judge, images_of(args.root, "test")))
    real = balanced_images_of(args.root, "train", 100)
    out = {
        "fd_train_vs_test": frechet_distance(
            *feature_statistics(judge_features(judge, real)), *test_stats
        )
    }
    for run_dir in args.mnist:
        run = load_run(run_dir)
        labels = sample_labels(run, 1000, per_class=True)
        s = run.cfg.sample
        scfg = dataclasses.replace(s, n=1000, batch_size=250, steps=steps_for_nfe(s.sampler, 10, s))
        t0 = time.perf_counter()
        x = to_judge_size(draw_samples(run, scfg, labels=labels, progress=True))
        acc = float((judge_predict(judge, x) == labels).float().mean())
        fd = frechet_distance(*feature_statistics(judge_features(judge, x)), *test_stats)
        out[run.cfg.preset] = {
            "run": str(run_dir),
            "step": run.step,
            "sampler": scfg.sampler,
            "steps": scfg.steps,
            "spacing": scfg.spacing,
            "guidance": scfg.guidance,
            "accuracy": acc,
            "fd": fd,
            "sample_s": time.perf_counter() - t0,
        }
        print(f"{run.cfg.preset}: {scfg.sampler}-{scfg.steps}: accuracy {acc:.4f}, FD {fd:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/difflab-flow-bench", help="run directories")
    ap.add_argument("--steps", type=int, default=8000, help="training steps of both presets")
    ap.add_argument("--reflow-steps", type=int, default=0, help="default: --steps")
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--n", type=int, default=20_000, help="samples per measurement")
    ap.add_argument("--threads", type=int, default=1, help="train.threads")
    ap.add_argument("--mnist", nargs=2, metavar=("FLOW_RUN", "MNIST_RUN"))
    ap.add_argument("--root", default="../shared/data")
    ap.add_argument("--judge", default="bench/results/judge-mnist.safetensors")
    ap.add_argument("--out", default="bench/results/flow.json")
    args = ap.parse_args()
    args.reflow_steps = args.reflow_steps or args.steps
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = (
        {"benchmark": "flow", "mnist": mnist_part(args)}
        if args.mnist
        else {"benchmark": "flow", "checkerboard": checkerboard(args)}
    )
    result["wall_s"] = time.perf_counter() - t0
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
