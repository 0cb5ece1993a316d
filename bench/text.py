"""Benchmark: `mnist-text` / `fashion-text`, judged offline against the class-label preset.

1. Train (or reuse) the judge: difflab's classifier of the data set, on its training split.
2. Train (or reuse, or finish if interrupted: --run-dir) the text preset with the encoder asked
   for (minilm: the frozen all-MiniLM-L6-v2, difflab[text]; char: the built-in encoder trained
   with the U-Net).
3. Draw --per-class samples per class from HELD-OUT prompt templates (never trained on), and
   --seen-per-class from the seen ones, with the run's sampler (or --sampler/--steps).
4. Report the judge's accuracy against the class each prompt names (held-out and seen apart),
   and the judge-feature Frechet distance to the test split, next to the class-label preset's
   run (--reference-run) sampled at the SAME sampler, steps and sample count in this run (FD
   from n samples has a bias that shrinks like 1/n: only equal-n figures compare).

Target (issue 15, mnist-text with minilm, <= 30 CPU minutes of training): held-out accuracy
>= 0.95 over 1,000 samples (100 per digit) and FD within 1.5x the class-label preset's.

    python bench/text.py --root ../shared/data --dataset mnist --encoder minilm \
        --run-dir runs/mnist-text --reference-run runs/mnist [--set key=value ...]
    python bench/text.py --preset mnist-sd3 --set model.codec=runs/mnist-ae \
        --run-dir runs/mnist-sd3 --reference-run runs/mnist   (target: the pipeline <= 30 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from difflab.config import apply_overrides, preset
from difflab.data.images import load_image_dataset
from difflab.evaluation.classifier import judge_features, judge_predict, load_judge, train_judge
from difflab.evaluation.frechet import feature_statistics, frechet_distance
from difflab.evaluation.text import judged_prompts, prompt_set
from difflab.files import write_text_atomically
from difflab.report.text import prompt_grid
from difflab.runs import draw_samples, load_run, sample_labels
from difflab.training.loop import train


def judge_for(dataset: str, root: str, path: Path):
    if not path.exists():
        t0 = time.perf_counter()
        _, acc = train_judge(dataset, root, epochs=3, seed=0, out_path=path, progress=print)
        print(f"judge: test accuracy {acc:.4f} in {time.perf_counter() - t0:.0f} s -> {path}")
    return load_judge(path)


def test_statistics(judge, dataset: str, root: str):
    data, _ = load_image_dataset(dataset, root, "test")
    images = torch.stack([data[i][0] for i in range(len(data))])
    return feature_statistics(judge_features(judge, images))


def training_seconds(run_dir: Path) -> float:
    """Wall seconds of training from metrics.jsonl (s_per_step over each logged interval)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "s_per_step" in r]
    seconds, last = 0.0, 0
    for r in rows:
        seconds += r["s_per_step"] * (r["step"] - last)
        last = r["step"]
    return seconds


def pipeline_seconds(run) -> dict:
    """For a latent run, its autoencoder's training seconds and the whole pipeline's."""
    codec = run.cfg.model.codec
    if not codec or not (Path(codec) / "metrics.jsonl").exists():
        return {}
    codec_s = training_seconds(Path(codec))
    return {
        "codec_run": codec,
        "codec_train_s": codec_s,
        "pipeline_s": codec_s + training_seconds(Path(run.run_dir)),
    }


def reference_row(run_dir: Path, scfg, per_class: int, judge, stats) -> dict:
    """The class-label run at scfg's sampler and steps (its own guidance), per_class each."""
    run = load_run(run_dir)
    ref = dataclasses.replace(
        run.cfg.sample,
        sampler=scfg.sampler,
        steps=scfg.steps,
        spacing=scfg.spacing,
        n=10 * per_class,
        batch_size=scfg.batch_size,
    )
    labels = sample_labels(run, ref.n, per_class=True)
    t0 = time.perf_counter()
    images = draw_samples(run, ref, labels=labels, progress=True)
    return {
        "run": str(run_dir),
        "step": run.step,
        "guidance": ref.guidance,
        "n": ref.n,
        "accuracy": float((judge_predict(judge, images) == labels).float().mean()),
        "fd_judge": frechet_distance(*feature_statistics(judge_features(judge, images)), *stats),
        "sample_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data")
    ap.add_argument("--dataset", choices=("mnist", "fashion"), default="mnist")
    ap.add_argument("--encoder", choices=("minilm", "char"), default="minilm")
    ap.add_argument("--preset", help="default: DATASET-text; mnist-sd3 (with model.codec=AE_RUN)")
    ap.add_argument("--run-dir", required=True, help="reuse or keep the text run here")
    ap.add_argument("--reference-run", help="a trained class-label run of the same data set")
    ap.add_argument("--per-class", type=int, default=100, help="held-out samples per class")
    ap.add_argument("--seen-per-class", type=int, default=20, help="seen-template samples")
    ap.add_argument("--guidance", type=float, help="default: the preset's")
    ap.add_argument("--sampler")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--judge", help="default: judge-DATASET.safetensors beside --out")
    ap.add_argument("--set", action="append", default=[], help="training config override")
    ap.add_argument("--out", default="bench/results/text.json")
    args = ap.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    judge = judge_for(
        args.dataset,
        args.root,
        Path(args.judge or out.parent / f"judge-{args.dataset}.safetensors"),
    )
    stats = test_statistics(judge, args.dataset, args.root)
    overrides = [f"data.root={args.root}", f"model.text.encoder={args.encoder}", *args.set]
    cfg = apply_overrides(preset(args.preset or f"{args.dataset}-text"), overrides)
    run_dir = Path(args.run_dir)
    if not (run_dir / "checkpoints").exists():
        train(cfg, run_dir, progress=True)
    elif load_run(run_dir).step < cfg.train.steps:  # an interrupted run: finish it first
        train(cfg, run_dir, resume=True, progress=True)
    run = load_run(run_dir)
    scfg = run.cfg.sample
    changes = {"guidance": args.guidance, "sampler": args.sampler, "steps": args.steps}
    scfg = dataclasses.replace(scfg, **{k: v for k, v in changes.items() if v is not None})
    rows = {}
    for which, per_class in (("held_out", args.per_class), ("seen", args.seen_per_class)):
        if per_class > 0:
            row = judged_prompts(run, scfg, judge, which, per_class, stats, progress=True)
            rows[which] = {k: v for k, v in row.items() if k not in ("images", "classes")}
            print(f"{which} templates: {rows[which]}")
            prompts, _ = prompt_set(args.dataset, which, per_class)
            prompt_grid(row["images"].numpy(), prompts, out.with_name(f"{out.stem}-{which}.png"))
    report = {
        "benchmark": f"{args.dataset}-text",
        "preset": run.cfg.preset,
        "encoder": args.encoder,
        "train_s": training_seconds(run_dir),
        **pipeline_seconds(run),
        "train_steps": run.step,
        "overrides": args.set,
        "results": rows,
        "run_dir": str(run_dir),
    }
    if args.reference_run:
        ref = reference_row(Path(args.reference_run), scfg, args.per_class, judge, stats)
        report["reference"] = ref
        report["fd_ratio"] = rows["held_out"].get("fd_judge", float("nan")) / ref["fd_judge"]
        print(f"class-label reference: {ref}; FD ratio {report['fd_ratio']:.2f} (target <= 1.5)")
    write_text_atomically(out, json.dumps(report, indent=2) + "\n")
    print(f"trained {run.step} steps in {report['train_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
