"""Benchmark: guidance methods and post-hoc EMA on one trained `mnist` run (issue 41).

Every row draws the same n class-balanced samples (the same seeds, the run's own sampler unless
--sampler / --steps say otherwise) and judges them with difflab's MNIST judge (bench/mnist.py's
judge_for): accuracy on the requested classes and judge Frechet distance to the test split; each
row also carries the network calls per sample (counted as the nets ran: guidance's doubled
batch and autoguidance's weak net included) and the sampling seconds.

Rows (stages):
- cfg:   plain classifier-free guidance at 1.25 (the reference) and 1.5;
- apg:   adaptive projected guidance (Sadat et al. 2024) at --apg scales (the run's APG eta,
         momentum and threshold);
- cfgpp: CFG++ (Chung et al. 2024) at --cfgpp lambdas with deterministic DDIM, beside plain CFG
         1.25 on that DDIM (its own reference: CFG++ is defined for DDIM only);
- auto:  autoguidance (Karras et al. 2024) by an earlier checkpoint of the run (--guide,
         default RUN:step-500) at --auto scales;
- ema:   post-hoc EMA (EDM2): `difflab ema RUN --sigma-rel S` for each --sigma-rels, sampled at
         CFG 1.25, against the classic EMA (the cfg 1.25 row);
- combo: the cfg 1.5, apg and auto rows again with the best sigma_rel's weights (the issue
         allows a post-hoc EMA length where it helps); planned once ema's rows are written;
- summary: a Markdown table, and summary.json with the issue's two targets: some row reaches
         accuracy >= 0.99 with FD <= CFG 1.25's; the best sigma_rel's FD <= the classic EMA's.

Each row is written to OUT/rows/<row>.json when done and skipped when present, so the benchmark
resumes where it stopped and runs in pieces (--only STAGE or ROW).

    python bench/guidance.py --run RUN --root ../shared/data [--out DIR] [--n 1000]
        [--only cfg|apg|cfgpp|auto|ema|combo|summary|ROW] [--sampler S --steps K]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from difflab import cli
from difflab.evaluation.classifier import judge_features, judge_predict
from difflab.evaluation.frechet import feature_statistics, frechet_distance
from difflab.evaluation.sampled import timed_samples
from difflab.files import savez_atomically, write_text_atomically
from difflab.runs import load_run, sample_labels

sys.path.insert(0, str(Path(__file__).parent))
from mnist import images_of, judge_for, to_judge_size

STAGES = ("cfg", "apg", "cfgpp", "auto", "ema", "combo", "summary")
REFERENCE = "cfg-1.25"  # plain CFG at 1.25 with the run's sampler: the classic EMA's row too


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def plan(args) -> dict[str, dict]:
    """Every row: its stage, the weights it samples and its sample.* changes."""
    rows = {}

    def add(stage, name, weights=None, **changes):
        rows[name] = {"stage": stage, "weights": weights, "changes": changes}

    add("cfg", REFERENCE, guidance=1.25)
    add("cfg", "cfg-1.5", guidance=1.5)
    for w in floats(args.apg):
        add("apg", f"apg-{w:g}", guidance=w, guidance_method="apg")
    ddim = {"sampler": "ddim", "eta": 0.0}
    add("cfgpp", "cfg-1.25-ddim", guidance=1.25, **ddim)
    for lam in floats(args.cfgpp):
        add("cfgpp", f"cfgpp-{lam:g}", guidance=lam, guidance_method="cfg++", **ddim)
    guide = args.guide or f"{args.run}:step-500"
    for w in floats(args.auto):
        add("auto", f"auto-{w:g}", guidance=w, guidance_method="auto", guide_with=guide)
    for s in floats(args.sigma_rels):
        add("ema", f"ema-{s:g}", weights=posthoc_path(args, s))
    best = best_sigma_rel(args)
    if best is not None:  # the guidance rows again with the best post-hoc EMA, once it is known
        combo = {"stage": "combo", "weights": posthoc_path(args, best)}
        for name in [n for n, r in rows.items() if r["stage"] in ("cfg", "apg", "auto")]:
            if name != REFERENCE:
                rows[f"{name}@ema-{best:g}"] = {**combo, "changes": rows[name]["changes"]}
    return rows


def posthoc_path(args, sigma_rel: float) -> Path:
    return Path(args.out) / "ema" / f"sigma-{sigma_rel:g}.safetensors"


def best_sigma_rel(args) -> float | None:
    """The sigma_rel of the lowest FD among the finished ema rows (None before any)."""
    done = []
    for s in floats(args.sigma_rels):
        path = Path(args.out) / "rows" / f"ema-{s:g}.json"
        if path.exists():
            done.append((json.loads(path.read_text())["fd_judge"], s))
    return min(done)[1] if done else None


def posthoc_weights(run: str, path: Path) -> Path:
    """`difflab ema RUN --sigma-rel S --out path` (S from the file name), unless written."""
    if not path.exists():
        sigma_rel = path.stem.removeprefix("sigma-")
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["ema", run, "--sigma-rel", sigma_rel, "--out", str(path)]
        if cli.main(argv) != 0:
            raise SystemExit(f"difflab {' '.join(argv)} failed")
    return path


def measure(args, name: str, row: dict, judge, test_stats) -> dict:
    """Draw the row's samples (class-balanced, the run's seed) and judge them."""
    weights = posthoc_weights(args.run, row["weights"]) if row["weights"] else args.run
    run = load_run(weights)
    changes = dict(row["changes"])
    if args.sampler and "sampler" not in changes:
        changes["sampler"] = args.sampler
    if args.steps:
        changes["steps"] = args.steps
    scfg = dataclasses.replace(
        run.cfg.sample, n=args.n, batch_size=args.batch_size, precision="fp32", **changes
    )
    labels = sample_labels(run, args.n, per_class=True)
    start = time.perf_counter()
    samples, timing = timed_samples(run, scfg, labels, progress=True)
    seconds = time.perf_counter() - start
    x = to_judge_size(samples)
    return {
        "row": name,
        "stage": row["stage"],
        "weights": str(weights),
        "step": run.step,
        "sampler": scfg.sampler,
        "steps": scfg.steps,
        "guidance_method": scfg.guidance_method,
        "guidance": scfg.guidance,
        "guide_with": run.guide_with,
        "n": args.n,
        "seed": scfg.seed,
        "accuracy": float((judge_predict(judge, x) == labels).float().mean()),
        "fd_judge": frechet_distance(*feature_statistics(judge_features(judge, x)), *test_stats),
        "net_calls": timing["net_calls"],
        "seconds": seconds,
    }


def reference_stats(args, judge) -> tuple[np.ndarray, np.ndarray]:
    """The judge features' mean and covariance on the test split (OUT/test_stats.npz)."""
    path = Path(args.out) / "test_stats.npz"
    if not path.exists():
        mu, sigma = feature_statistics(judge_features(judge, images_of(args.root, "test")))
        savez_atomically(path, mu=mu, sigma=sigma)
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def summary(args, rows: dict[str, dict]) -> dict:
    """The Markdown table and the issue's two targets, from every row written so far."""
    done = {}
    for name in rows:
        path = Path(args.out) / "rows" / f"{name}.json"
        if path.exists():
            done[name] = json.loads(path.read_text())
    print("| row | sampler | method | scale | weights | accuracy | FD | net calls | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in done.values():
        print(
            f"| {r['row']} | {r['sampler']}-{r['steps']} | {r['guidance_method']} | "
            f"{r['guidance']:g} | {Path(r['weights']).name} | {r['accuracy']:.4f} | "
            f"{r['fd_judge']:.3f} | {r['net_calls']:g} | {r['seconds']:.0f} |"
        )
    result = {"n": args.n, "run": args.run, "rows": list(done.values()), "targets": {}}
    ref = done.get(REFERENCE)
    if ref:
        same_sampler = [r for r in done.values() if r["sampler"] == ref["sampler"]]
        winners = [
            r["row"]
            for r in same_sampler
            if r["accuracy"] >= 0.99 and r["fd_judge"] <= ref["fd_judge"]
        ]
        result["targets"]["accuracy>=0.99 and fd<=cfg-1.25"] = {
            "pass": bool(winners),
            "rows": winners,
            "cfg-1.25": {k: ref[k] for k in ("accuracy", "fd_judge")},
        }
        emas = [r for r in done.values() if r["stage"] == "ema"]
        if emas:
            best = min(emas, key=lambda r: r["fd_judge"])
            result["targets"]["best sigma_rel fd<=classic ema"] = {
                "pass": best["fd_judge"] <= ref["fd_judge"],
                "best": best["row"],
                "fd": best["fd_judge"],
                "classic_ema_fd": ref["fd_judge"],
                "curve": {r["row"]: r["fd_judge"] for r in emas},
            }
    for target, verdict in result["targets"].items():
        print(f"{target}: {'PASS' if verdict['pass'] else 'FAIL'}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a trained mnist run directory")
    ap.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw/")
    ap.add_argument("--judge", default="bench/results/judge-mnist.safetensors")
    ap.add_argument("--out", default="bench/results/guidance", help="rows, weights, summary")
    ap.add_argument("--n", type=int, default=1000, help="class-balanced samples per row")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--sampler", default="", help="default: the run's own sample.sampler")
    ap.add_argument("--steps", type=int, default=0, help="default: the run's sample.steps")
    ap.add_argument("--apg", default="1.5,2,3", help="APG scales")
    ap.add_argument("--cfgpp", default="0.1,0.2,0.4", help="CFG++ lambdas (DDIM)")
    ap.add_argument("--auto", default="1.5,2,3", help="autoguidance scales")
    ap.add_argument("--guide", default="", help="the weak model; default RUN:step-500")
    ap.add_argument("--sigma-rels", default="0.03,0.05,0.08,0.10,0.15")
    ap.add_argument("--only", default="", help=f"one stage ({', '.join(STAGES)}) or row")
    args = ap.parse_args()
    if args.only and args.only not in STAGES and args.only not in plan(args):
        raise SystemExit(f"--only {args.only}: choose a stage ({', '.join(STAGES)}) or a row")
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    judged = None  # (judge, test features' statistics), made on first need
    for stage in STAGES[:-1]:
        rows = plan(args)  # again each stage: combo's rows follow from the finished ema rows
        for name, row in rows.items():
            if row["stage"] != stage or args.only not in ("", name, stage):
                continue
            if (out / "rows" / f"{name}.json").exists():
                continue
            if judged is None:
                judge = judge_for(args.root, Path(args.judge))
                judged = judge, reference_stats(args, judge)
            torch.manual_seed(0)
            result = measure(args, name, row, *judged)
            text = json.dumps(result, indent=2) + "\n"
            write_text_atomically(out / "rows" / f"{name}.json", text)
            print(
                f"{name}: accuracy {result['accuracy']:.4f}, FD {result['fd_judge']:.3f}, "
                f"{result['net_calls']:g} net calls/sample, {result['seconds']:.0f} s"
            )
    if args.only in ("", "summary"):
        result = summary(args, plan(args))
        write_text_atomically(out / "summary.json", json.dumps(result, indent=2) + "\n")
        print(f"-> {out / 'summary.json'}")


if __name__ == "__main__":
    main()
