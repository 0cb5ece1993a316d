"""`difflab pretrained build NAME` and `difflab pretrained list`: the runs shipped in the package
(difflab/pretrained/), each made from its preset, judged at the sampling defaults it ships with
and written as an fp16 EMA weights file that carries how it was made and what it scored."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from difflab import pretrained
from difflab.config import ConfigError, RunConfig, apply_overrides, preset
from difflab.files import check_writable

# samples judged: 2-D points against fresh draws of the data set, images class-balanced against
# the test split (1,000 as in bench/RESULTS.md, where 1,000 real training digits score FD ~4)
JUDGED_N = {"points": 20_000, "images": 1000}
SAMPLING_FLAGS = ("sampler", "steps", "spacing", "guidance")
LOCAL = ("source", "checkpoint")  # paths of the machine that built it: left out of the record


def cmd_pretrained(args: argparse.Namespace) -> int:
    if args.action == "list":
        print(list_table())
        return 0
    return build_pretrained(args)


def build_pretrained(args: argparse.Namespace) -> int:
    """Train the preset of args.name (or take the trained run --run), judge it at its sampling
    defaults and write the fp16 file (default: the package's pretrained/NAME.safetensors)."""
    from difflab.runs import check_run_dir, load_run
    from difflab.share.half import write_weights_file

    name = _check_name(args.name)
    out = Path(args.out) if args.out else pretrained.file_of(name)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    check_writable(out.parent, f"--out {out}")
    if args.teacher and pretrained.PRESETS[name] != "mnist-ect":
        raise ConfigError(f"--teacher is for mnist-ect (a consistency student); {name} has none")
    if args.run:
        run_dir = _check_preset(check_run_dir(args.run), name)
    else:
        run_dir, code = _train(args, name)
        if code:
            return code
    run = load_run(run_dir, use_ema=True, device=args.device)
    changes = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    scfg = dataclasses.replace(run.cfg.sample, **{**pretrained.SAMPLING[name], **changes})
    run.model.check_sample(scfg)
    rows = judge(run, scfg, args.n, args.root, args.judge, progress=not args.quiet)
    record = {
        "name": name,
        "preset": run.cfg.preset,
        "train_steps": run.step,
        "train_minutes": train_minutes(run_dir),
        "sampling": {k: getattr(scfg, k) for k in (*SAMPLING_FLAGS, "n", "batch_size")},
        "trained_sampling": dataclasses.asdict(run.cfg.sample),  # the run's own sample.*
        "metrics": rows,
        "made_by": " ".join(["difflab", *args.argv]),
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shipped = dataclasses.replace(run.cfg, sample=scfg)  # so `difflab sample` uses them
    extra = {pretrained.META_KEY: json.dumps(record)}
    write_weights_file(run, out, "fp16", shipped, extra)
    load_run(out, device="cpu")  # the file loads back into the same network
    print(f"difflab: pretrained:{name} -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
    print(f"difflab: {_metrics_text(record)}")
    return 0


def _check_name(name: str) -> str:
    if name not in pretrained.PRESETS:
        known = ", ".join(pretrained.PRESETS)
        raise ConfigError(f"unknown pretrained run {name!r}; the known ones are {known}")
    return name


def _check_preset(run_dir: Path, name: str) -> Path:
    """The run directory, refused in one line when it was not trained from NAME's preset."""
    trained = RunConfig.load(run_dir / "config.json").preset
    wanted = pretrained.PRESETS[name]
    if trained != wanted:
        raise ConfigError(
            f"{run_dir} was trained from preset {trained!r}, and pretrained:{name} is made from "
            f"preset {wanted!r}: pass a run of {wanted!r}, or leave out --run to train one"
        )
    return run_dir


def _train(args: argparse.Namespace, name: str) -> tuple[Path, int]:
    """Train NAME's preset into RUNS/pretrained-NAME (data.root = --root, the student's
    consistency.teacher = --teacher, then --set); returns it and the exit code."""
    from difflab.cli.train import run_training
    from difflab.training.distributed import World

    changes = [f"data.root={args.root}"] if args.root else []
    changes += [f"consistency.teacher={args.teacher}"] if args.teacher else []
    cfg = apply_overrides(preset(pretrained.PRESETS[name]), [*changes, *args.set])
    run_dir = Path(args.runs) / f"pretrained-{name}"
    if run_dir.exists():
        raise ConfigError(
            f"{run_dir} exists: build from it with --run {run_dir} (finish an interrupted one "
            f"first: `difflab train --resume {run_dir}`), or choose another --runs"
        )
    check_writable(run_dir, f"--runs {args.runs}")
    code = run_training(cfg, run_dir, World(), resume=False, progress=not args.quiet, finish=False)
    return run_dir, code


def train_minutes(run_dir: Path) -> float | None:
    """Wall minutes the run trained, summed over its logged intervals (metrics.jsonl: each
    row's s_per_step times the steps since the row before); None without a log."""
    from difflab.training.logging import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    seconds, last = 0.0, 0
    for row in read_metrics(path):
        if "s_per_step" in row and row["step"] > last:
            seconds += row["s_per_step"] * (row["step"] - last)
            last = row["step"]
    return seconds / 60


def judge(run, scfg, n: int | None, root: str | None, judge_file, progress: bool) -> list[dict]:
    """The metrics of n samples drawn at scfg, with the settings they were measured at: 2-D
    runs their 2-D metrics (in-square on the checkerboard, sliced W2); image runs the judge's
    class accuracy (class-balanced) and Frechet distance to the test split."""
    from difflab.evaluation.sampled import evaluate_images_of

    kind = run.model.kind
    scfg = dataclasses.replace(scfg, n=n or JUDGED_N["images" if kind.is_image else "points"])
    if not kind.is_image:
        return _judge_points(run, scfg, progress)
    from difflab.evaluation.references import open_reference
    from difflab.evaluation.sampled import extractors_for

    metrics = ["accuracy", "fd_judge"] if kind.conditional else ["fd_judge"]
    dataset = run.cfg.data.name
    extractors = extractors_for(metrics, dataset=dataset, judge=judge_file, device=run.device)
    reference = open_reference(f"{dataset}:test", run.shape, root=root or run.cfg.data.root)
    rows = evaluate_images_of(run, scfg, metrics, reference, extractors, progress)
    return [{k: v for k, v in row.items() if k not in LOCAL} for row in rows]


def _judge_points(run, scfg, progress: bool) -> list[dict]:
    from difflab.evaluation.sampled import sampling_provenance
    from difflab.evaluation.toy2d import evaluate_toy
    from difflab.runs import draw_samples

    samples = draw_samples(run, scfg, progress=progress).numpy()
    result = evaluate_toy(samples, run.cfg.data.name)
    how = sampling_provenance(run, scfg, run.model.kind.conditional)
    how = {k: v for k, v in how.items() if k not in LOCAL}
    reference = f"{result['dataset']} ({result['n']:,} fresh draws)"
    return [
        {"metric": m, "value": result[m], "n_generated": result["n"], "reference": reference, **how}
        for m in ("in_square", "sliced_w2")
        if m in result
    ]


def _metrics_text(record: dict) -> str:
    s = record["sampling"]
    how = f"{s['sampler']} {s['steps']} steps" + (
        f", guidance {s['guidance']}" if s["guidance"] != 1.0 else ""
    )
    values = ", ".join(
        f"{r['metric']} {r['value']:.4f} ({r['n_generated']:,})" for r in record["metrics"]
    )
    return f"{values} at {how}"


def list_table() -> str:
    """One line per known name: shipped (size, preset, steps, training minutes, metrics and
    the sampling they were measured at) or how to make it."""
    lines = []
    for name in pretrained.PRESETS:
        path = pretrained.file_of(name)
        if not path.is_file():
            lines.append(f"pretrained:{name:11s} not shipped (`difflab pretrained build {name}`)")
            continue
        record = pretrained.record(path)
        size = f"{path.stat().st_size / 1e6:.1f} MB"
        trained = f"{record.get('train_steps', '?')} steps"
        if record.get("train_minutes") is not None:
            trained += f" in {record['train_minutes']:.0f} min"
        lines.append(
            f"pretrained:{name:11s} {size:>8s}  {record.get('preset', '?')}, {trained}; "
            + (_metrics_text(record) if record.get("metrics") else "not judged")
        )
    return "\n".join(lines)


def add_pretrained_parser(sub) -> None:
    p = sub.add_parser(
        "pretrained",
        help="the runs shipped in the package (pretrained:NAME): list them, or build one",
        description="`list` the pretrained runs; `build NAME` trains NAME's preset (or takes a "
        "trained run of it, --run), judges it at its sampling defaults and writes the fp16 "
        "EMA file with its metrics into the package (or --out).",
    )
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="names, sizes, metrics")
    b = actions.add_parser("build", help="make pretrained:NAME from its preset")
    b.add_argument("name", help=f"one of {', '.join(pretrained.PRESETS)}")
    b.add_argument("--run", help="a trained run of NAME's preset (default: train one now)")
    b.add_argument("--runs", default="runs", help="where to train it: RUNS/pretrained-NAME")
    b.add_argument("--root", help="data folder (training and the judge's test split)")
    b.add_argument("--teacher", help="mnist-ect: the trained mnist run it distils from")
    b.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override the preset when training, e.g. train.threads=2",
    )
    b.add_argument("--sampler", help="sampling default to ship (default: the name's own)")
    b.add_argument("--steps", type=int, help="sampling steps to ship")
    b.add_argument("--spacing", help="time grid to ship")
    b.add_argument("--guidance", type=float, help="guidance scale to ship")
    b.add_argument("--n", type=int, help="samples judged (default 1,000 images, 20,000 points)")
    b.add_argument("--judge", help="judge classifier file (default: the one trained for the data)")
    b.add_argument("--out", help="the file (default: the package's pretrained/NAME.safetensors)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
