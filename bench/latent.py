"""Benchmark: latent diffusion on MNIST (issue 14), both stages and the pixel comparison.

Stage "ae": train the `mnist-ae` preset (train.time_limit_minutes = 10 caps it), write its codec
(latent scale on 10,000 training images) and measure reconstructions of the 10,000 test images:
PSNR, SSIM, judge accuracy (target: within 0.5 points of the originals', i.e. of the judge's test
accuracy) and judge FD to the training split (target: <= 1.5x the originals' own FD to it).

Stage "latent": train `mnist-latent` (or --latent-preset, e.g. `mnist-latent-dit`) through that
autoencoder; 1,000 class-balanced samples
(100 per digit) with the run's sampler: judge accuracy (target >= 0.98) and judge FD to the test
split, beside the pixel `mnist` reference run's same figures measured here (--pixel-run: a run
folder, or a weights file such as `pretrained:mnist`, the preset's 2,000 steps).
Whole-pipeline wall time = AE train_s + latent train_s, against the pixel run's recorded train_s
(--pixel-json; without it, the logged step times of a --pixel-run folder). The speed stage adds
the pixel preset's steps at the images/s it measures, so the pipeline also has a reference timed
on the same machine in the same invocation.

Stage "speed": training images/s of the pixel and latent presets (a few steps each, same
process, same load; target: latent >= 4x), and sampling ms per image at the same sampler and
steps, decode included.

    python bench/latent.py --root ../shared/data --stage ae latent speed --work /tmp/latent
Every stage writes its figures into --out as it finishes (a stage already there is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from difflab.cli.pretrained import train_minutes
from difflab.codecs.latent import read_meta
from difflab.config import apply_overrides, preset
from difflab.evaluation.classifier import judge_features, judge_predict
from difflab.evaluation.frechet import feature_statistics, frechet_distance
from difflab.files import write_text_atomically
from difflab.report.latent import make_autoencoder_artefacts
from difflab.report.run import training_hooks
from difflab.runs import draw_samples, load_run, sample_labels
from difflab.training.checkpoint import is_weights_file
from difflab.training.logging import read_metrics
from difflab.training.loop import train
from mnist import images_of, judge_for


def _save(out: Path, report: dict) -> None:
    write_text_atomically(out, json.dumps(report, indent=2) + "\n")


def stage_ae(args, report: dict) -> None:
    run_dir = Path(args.work) / "mnist-ae"
    cfg = apply_overrides(preset("mnist-ae"), [f"data.root={args.root}", *args.set_ae])
    t0 = time.perf_counter()
    if not (run_dir / "checkpoints").exists():
        train(cfg, run_dir, progress=True, hooks=training_hooks())
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    make_autoencoder_artefacts(run_dir, judge=args.judge, n=10_000)
    rows = json.loads((run_dir / "evals" / "reconstruction.json").read_text())["rows"]
    values = {f"{r['metric']}_{r['of']}": r["value"] for r in rows}  # psnr_reconstructions, ...
    codec = read_meta(run_dir / "codec.safetensors")
    report["ae"] = {
        "run_dir": str(run_dir),
        "train_s": train_s,
        "train_steps": load_run(run_dir).step,
        "finish_s": time.perf_counter() - t1,
        **values,
        "accuracy_gap_points": 100
        * (values["accuracy_originals"] - values["accuracy_reconstructions"]),
        "fd_ratio": values["fd_judge_reconstructions"] / values["fd_judge_originals"],
        "s_per_step": [
            r["s_per_step"] for r in read_metrics(run_dir / "metrics.jsonl") if "s_per_step" in r
        ],
        "codec": codec,
    }
    print(json.dumps({k: v for k, v in report["ae"].items() if k != "s_per_step"}, indent=2))


def judged(run, judge, test_stats, labels, sample_cfg=None) -> dict:
    scfg = dataclasses.replace(sample_cfg or run.cfg.sample, n=len(labels), batch_size=250)
    t0 = time.perf_counter()
    samples = draw_samples(run, scfg, labels=labels, progress=True)
    seconds = time.perf_counter() - t0
    acc = float((judge_predict(judge, samples) == labels).float().mean())
    fd = frechet_distance(*feature_statistics(judge_features(judge, samples)), *test_stats)
    return {
        "accuracy": acc,
        "fd_to_test": fd,
        "sample_s": seconds,
        "sampler": scfg.sampler,
        "steps": scfg.steps,
        "guidance": scfg.guidance,
        "n": len(labels),
    }


def recorded_train_s(report: dict) -> float:
    """The pixel run's training wall seconds from bench/mnist.py's JSON ("train_s") or from
    bench/mnist_time.py's ("new" or "old" -> "train_wall_s", the new preset's preferred)."""
    if "train_s" in report:
        return report["train_s"]
    for key in ("new", "old"):
        if "train_wall_s" in report.get(key, {}):
            return report[key]["train_wall_s"]
    raise SystemExit("--pixel-json holds no train_s (bench/mnist.py) or train_wall_s (mnist_time)")


def stage_latent(args, report: dict) -> None:
    ae_dir = Path(args.work) / "mnist-ae"
    run_dir = Path(args.work) / args.latent_preset
    overrides = [f"data.root={args.root}", f"model.codec={ae_dir}", *args.set_latent]
    cfg = apply_overrides(preset(args.latent_preset), overrides)
    t0 = time.perf_counter()
    if not (run_dir / "checkpoints").exists():
        train(cfg, run_dir, progress=True, hooks=training_hooks())
    train_s = time.perf_counter() - t0
    judge = judge_for(args.root, Path(args.judge))
    test_stats = feature_statistics(judge_features(judge, images_of(args.root, "test")))
    run = load_run(run_dir)
    labels = sample_labels(run, 1000, per_class=True)
    latent = judged(run, judge, test_stats, labels)
    pixel, pixel_is_file = None, bool(args.pixel_run) and is_weights_file(args.pixel_run)
    if pixel_is_file or (args.pixel_run and (Path(args.pixel_run) / "checkpoints").exists()):
        # a shipped file samples fast by default (DDPM-20); the reference is the preset's sampler
        pixel_run = load_run(args.pixel_run)
        own = preset(pixel_run.cfg.preset).sample if pixel_is_file else None
        pixel = judged(pixel_run, judge, test_stats, labels, own)
    pixel_train_s = None
    if args.pixel_json and Path(args.pixel_json).exists():
        pixel_train_s = recorded_train_s(json.loads(Path(args.pixel_json).read_text()))
    elif pixel is not None and not pixel_is_file:  # a file's minutes were another machine's
        pixel_train_s = 60 * train_minutes(Path(args.pixel_run))
    ae_s = report.get("ae", {}).get("train_s")
    report["latent"] = {
        "run_dir": str(run_dir),
        "preset": args.latent_preset,
        "train_s": train_s,
        "train_steps": run.step,
        "pipeline_s": None if ae_s is None else ae_s + train_s,
        "pixel_run": args.pixel_run,
        "pixel_train_s": pixel_train_s,
        "latent_samples": latent,
        "pixel_samples": pixel,
    }
    print(json.dumps(report["latent"], indent=2))


def throughput(cfg, run_dir: Path, steps: int) -> float:
    """Training examples/s of the last logged interval of a `steps`-step run (the first
    interval, with its warm-up, is not counted)."""
    cfg = apply_overrides(cfg, [f"train.steps={steps}", f"train.log_every={steps // 2}"])
    train(cfg, run_dir, progress=False)
    return read_metrics(run_dir / "metrics.jsonl")[-1]["examples_per_s"]


def stage_speed(args, report: dict) -> None:
    work = Path(args.work) / f"speed-{time.strftime('%H%M%S')}"
    ae_dir = Path(args.work) / "mnist-ae"
    pixel_cfg = apply_overrides(preset("mnist"), [f"data.root={args.root}"])
    latent_cfg = apply_overrides(
        preset(args.latent_preset),
        [f"data.root={args.root}", f"model.codec={ae_dir}", *args.set_latent],
    )
    rows = {"pixel_examples_per_s": [], "latent_examples_per_s": []}
    for rep in range(args.repeats):  # interleaved, so both see the same load
        rows["pixel_examples_per_s"].append(throughput(pixel_cfg, work / f"p{rep}", args.steps))
        rows["latent_examples_per_s"].append(throughput(latent_cfg, work / f"l{rep}", args.steps))
    pixel, latent = load_run(work / "p0"), load_run(work / "l0")
    ms = {}
    for name, run in (("pixel", pixel), ("latent", latent)):
        scfg = dataclasses.replace(run.cfg.sample, n=args.sample_n, batch_size=args.sample_n)
        labels = sample_labels(run, args.sample_n, per_class=False, seed=0)
        draw_samples(run, dataclasses.replace(scfg, n=10, batch_size=10), labels=labels[:10])
        t0 = time.perf_counter()
        draw_samples(run, scfg, labels=labels, progress=False)
        ms[f"{name}_ms_per_image"] = 1000 * (time.perf_counter() - t0) / args.sample_n
    p = sorted(rows["pixel_examples_per_s"])[len(rows["pixel_examples_per_s"]) // 2]
    lat = sorted(rows["latent_examples_per_s"])[len(rows["latent_examples_per_s"]) // 2]
    # the pixel preset's wall time: its steps at the measured images/s, or its cap if sooner
    pixel_preset_s = min(
        pixel_cfg.train.steps * pixel_cfg.train.batch_size / p,
        60 * pixel_cfg.train.time_limit_minutes or float("inf"),
    )
    pipeline_s = report.get("latent", {}).get("pipeline_s")
    report["speed"] = {
        **rows,
        "steps_each": args.steps,
        "throughput_ratio_median": lat / p,
        "pixel_preset_train_s_at_median": pixel_preset_s,
        "pipeline_over_pixel_preset": None if pipeline_s is None else pipeline_s / pixel_preset_s,
        **ms,
        "sampler": pixel.cfg.sample.sampler,
        "sample_steps": pixel.cfg.sample.steps,
        "sample_n": args.sample_n,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report["speed"], indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data")
    ap.add_argument("--stage", nargs="+", default=["ae", "latent", "speed"])
    ap.add_argument("--work", default="/tmp/difflab-latent", help="where the runs live")
    ap.add_argument("--judge", default="bench/results/judge-mnist.safetensors")
    ap.add_argument("--pixel-run", default="", help="the pixel mnist run to compare against")
    ap.add_argument(
        "--pixel-json", default="", help="its bench/mnist.py or bench/mnist_time.py JSON"
    )
    ap.add_argument("--latent-preset", default="mnist-latent", help="or mnist-latent-dit")
    ap.add_argument("--set-ae", action="append", default=[])
    ap.add_argument("--set-latent", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20, help="speed stage: steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample-n", type=int, default=50)
    ap.add_argument("--out", default="bench/results/latent.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(out.read_text()) if out.exists() else {"benchmark": "latent"}
    for stage in args.stage:
        {"ae": stage_ae, "latent": stage_latent, "speed": stage_speed}[stage](args, report)
        report.setdefault("load_at_end", {})[stage] = Path("/proc/loadavg").read_text().split()[:3]
        _save(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
