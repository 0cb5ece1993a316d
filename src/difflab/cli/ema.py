"""`difflab ema RUN --sigma-rel S | --sweep LO:HI[:K] --metric NAME`: post-hoc EMA.

The run's power-function EMA snapshots (RUN/phema/, stored when trained with
train.phema_sigma_rels and train.phema_every; training/phema.py) are combined into the EMA of
any sigma_rel (training/posthoc.py, EDM2's least-squares reconstruction) and written as a
weights file (training.checkpoint.WEIGHTS_META: config, data.json and step in its metadata), which
`difflab sample FILE`, `difflab eval FILE` and `difflab export FILE` read like any EMA file.
A sweep writes one file per sigma_rel, measures each through the usual evaluation path and
marks the best, in RUN/posthoc/sweep.json and RUN/plots/posthoc_sweep.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from difflab.config import ConfigError, RunConfig
from difflab.files import check_writable, replace_atomically, write_text_atomically

OUT_FOLDER = "posthoc"  # RUN/posthoc/ema-<sigma_rel>.safetensors


def cmd_ema(args: argparse.Namespace) -> int:
    from difflab.runs import check_run_dir
    from difflab.training.posthoc import coefficients_for, list_snapshots

    run_dir = check_run_dir(args.run)
    if (args.sigma_rel is None) == (args.sweep is None):
        raise ConfigError("difflab ema needs exactly one of --sigma-rel S or --sweep LO:HI[:K]")
    snapshots = list_snapshots(run_dir)
    sigma_rels = [args.sigma_rel] if args.sweep is None else parse_sweep(args.sweep)
    for s in sigma_rels:  # every one refused before anything is written
        coefficients_for(snapshots, s)
    if args.sweep is None:
        out = Path(args.out) if args.out else default_path(run_dir, args.sigma_rel)
        if out.suffix != ".safetensors":
            raise ConfigError(f"--out must end in .safetensors, got {out}")
        check_writable(out.parent, f"--out {out}")
        write_posthoc(run_dir, snapshots, args.sigma_rel, out)
        step = snapshots[-1].step
        print(
            f"difflab: post-hoc EMA sigma_rel={args.sigma_rel:g} at step {step} -> {out} "
            f"(sample it with `difflab sample {out}`)"
        )
        return 0
    if not args.metric or "," in args.metric:
        raise ConfigError("--sweep needs one --metric to rank by, e.g. --metric fd_judge")
    return _sweep(args, run_dir, snapshots, sigma_rels)


def parse_sweep(text: str) -> list[float]:
    """LO:HI[:K] -> K (default 8) sigma_rels evenly spaced from LO to HI."""
    parts = text.split(":")
    try:
        low, high = float(parts[0]), float(parts[1])
        count = int(parts[2]) if len(parts) == 3 else 8
    except (ValueError, IndexError):
        raise ConfigError(f"--sweep takes LO:HI[:K], e.g. 0.02:0.25:8, got {text!r}") from None
    if len(parts) > 3 or not low < high or count < 2:
        raise ConfigError(f"--sweep LO:HI[:K] needs LO < HI and K >= 2, got {text!r}")
    return [round(float(s), 6) for s in np.linspace(low, high, count)]


def default_path(run_dir: Path, sigma_rel: float) -> Path:
    return run_dir / OUT_FOLDER / f"ema-{sigma_rel:.4f}.safetensors"


def write_posthoc(run_dir: Path, snapshots: list, sigma_rel: float, out: Path) -> Path:
    """Synthesise sigma_rel's EMA and write it, with the run's config, data.json and the last
    snapshot's step, atomically to `out`."""
    from safetensors.torch import save_file

    from difflab.training.checkpoint import WEIGHTS_META, latest_good_checkpoint, load_data_info
    from difflab.training.posthoc import synthesise

    ckpt = latest_good_checkpoint(run_dir / "checkpoints")
    cfg = RunConfig.load(ckpt / "config.json")
    weights = synthesise(snapshots, sigma_rel)
    values = (json.dumps(cfg.to_dict()), json.dumps(load_data_info(ckpt)), str(snapshots[-1].step))
    meta = {**dict(zip(WEIGHTS_META, values, strict=True)), "format": "pt", "dtype": "fp32"}
    meta["phema_sigma_rel"] = str(sigma_rel)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, lambda tmp: save_file(weights, tmp, metadata=meta))
    return out


def _sweep(args: argparse.Namespace, run_dir: Path, snapshots: list, sigma_rels: list) -> int:
    """Evaluate each sigma_rel's EMA through the usual evaluation path; mark the best."""
    from difflab.evaluation.protocol import HIGHER_IS_BETTER
    from difflab.report.charts import posthoc_sweep_plot

    check_writable(run_dir / OUT_FOLDER, f"{run_dir / OUT_FOLDER}")
    rows = []
    for s in sigma_rels:
        path = write_posthoc(run_dir, snapshots, s, default_path(run_dir, s))
        value, row = _measure(args, path)
        rows.append({"sigma_rel": s, "value": value, "weights": str(path), **row})
        if not args.quiet:
            print(f"difflab: sigma_rel {s:.4f}: {args.metric} {value:.5g}")
    higher = args.metric in HIGHER_IS_BETTER
    best = (max if higher else min)(rows, key=lambda r: r["value"])
    result = {"metric": args.metric, "higher_is_better": higher, "best": best, "rows": rows}
    result["plot"] = str(
        posthoc_sweep_plot(rows, run_dir / "plots" / "posthoc_sweep.png", args.metric, best)
    )
    out = Path(args.out) if args.out else run_dir / OUT_FOLDER / "sweep.json"
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(
        f"difflab: best sigma_rel {best['sigma_rel']:.4f} ({args.metric} {best['value']:.5g}) "
        f"-> {best['weights']}; {out}, {result['plot']}"
    )
    return 0


def _measure(args: argparse.Namespace, weights: Path) -> tuple[float, dict]:
    """(args.metric of the weights file's samples, the row it came from), as `difflab eval`
    measures a run: image metrics against the reference, 2-D metrics against the data set."""
    from difflab.cli.evaluate import _image_eval_setup
    from difflab.cli.sample_flags import sample_config
    from difflab.evaluation.sampled import evaluate_images_of
    from difflab.evaluation.sharded import sampling_world
    from difflab.evaluation.toy2d import evaluate_toy
    from difflab.runs import draw_samples, load_run

    world = sampling_world(args.device)
    run = load_run(weights, device=args.device)
    scfg = sample_config(run.cfg.sample, args)
    if not run.model.kind.is_image:
        result = evaluate_toy(draw_samples(run, scfg, progress=False).numpy(), run.cfg.data.name)
        if args.metric not in result:
            metrics = ", ".join(k for k, v in result.items() if isinstance(v, float))
            raise ConfigError(f"--metric {args.metric} is not a 2-D metric; choose {metrics}")
        return float(result[args.metric]), result
    run, _, _, _, reference, metrics, extractors = _image_eval_setup(args, weights, world)
    cache = not args.no_cache
    rows = evaluate_images_of(run, scfg, metrics, reference, extractors, False, cache, world)
    row = next(r for r in rows if r["metric"] == args.metric)
    return float(row["value"]), row
