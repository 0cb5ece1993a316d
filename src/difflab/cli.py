"""difflab train | sample | eval | plot.

Every user error ends in one line `difflab: error: <problem and fix>` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

from difflab.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    SampleConfig,
    apply_overrides,
    preset,
)
from difflab.files import write_text_atomically
from difflab.samplers import SAMPLERS, NonFiniteError

# Options every sampler shares; each sampler's own (--eta, --churn, ...) come from the registry.
SAMPLE_FLAGS = ("sampler", "steps", "spacing", "t_end", "n", "seed", "guidance")


def _option_flags() -> dict[str, tuple]:
    """flag -> (SampleConfig field, type, help) of every registered sampler's flagged options;
    an option two samplers share (Euler's and Heun's churn) is one flag."""
    flags = {}
    for info in SAMPLERS.values():
        for o in info.options:
            if o.flag:
                flags.setdefault(o.flag, (o.field, o.type, o.help))
    return flags


def _checkpoint_arg(value: str) -> int | str:
    if value == "best":
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a step number or 'best', got {value!r}")


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: the run's config)")
    p.add_argument("--steps", type=int, help="sampling steps (Heun and DPM-2S: 2 calls per step)")
    p.add_argument(
        "--spacing",
        help="time grid: trailing, leading, linspace, quadratic (tables); uniform, logsnr, karras",
    )
    p.add_argument(
        "--t-end", dest="t_end", type=float, help="last nonzero time of logsnr/karras grids"
    )
    for flag, (dest, kind, text) in _option_flags().items():
        p.add_argument(flag, dest=dest, type=kind, help=text)
    p.add_argument("--n", type=int, help="number of samples")
    p.add_argument("--seed", type=int, help="noise seed")
    p.add_argument("--batch-size", type=int, help="samples per batch (results do not depend on it)")
    p.add_argument(
        "--raw", action="store_true", help="use the raw weights instead of the EMA weights"
    )
    p.add_argument(
        "--checkpoint",
        type=_checkpoint_arg,
        help="checkpoint to load: a step number or 'best' (default: the newest good one)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (conditional runs)"
    )
    p.add_argument("--class", dest="class_label", type=int, help="sample this class only")
    p.add_argument("--per-class", action="store_true", help="n / num_classes samples of each class")


def _add_image_eval_flags(p: argparse.ArgumentParser) -> None:
    from difflab.evaluation.protocol import METRICS

    p.add_argument(
        "--metric",
        help=f"image metrics, comma-separated: {', '.join(METRICS)} (default: fd_judge, "
        "kid_judge, pr_judge, and accuracy for conditional runs)",
    )
    p.add_argument(
        "--reference",
        help="real images: a data set split (mnist:test, cifar10:train), a folder or a samples "
        ".npz (default: the data set's train split)",
    )
    p.add_argument("--n-reference", type=int, help="reference images used (default: all)")
    p.add_argument("--root", help="data folder for data set references (default: the run's)")
    p.add_argument("--judge", help="judge classifier file (default: the one trained for the data)")
    p.add_argument(
        "--inception-weights", help="Inception-v3 weights file (default: torch hub's cache)"
    )
    p.add_argument(
        "--inception-sha256", help="expected SHA-256 of a non-standard Inception weights file"
    )
    p.add_argument("--image-size", type=int, default=32, help="a folder source: image size")
    p.add_argument("--channels", type=int, help="a folder source: 1 or 3 (default: reference's)")
    p.add_argument(
        "--no-cache", action="store_true", help="recompute reference features, write no cache"
    )


def classifier_parser() -> argparse.ArgumentParser:
    from difflab.evaluation.sampled import JUDGE_DATASETS

    ap = argparse.ArgumentParser(
        prog="difflab eval train-classifier",
        description="Train the judge classifier whose features give the offline, in-domain "
        "metrics (fd_judge, kid_judge, pr_judge, accuracy); prints its test accuracy.",
    )
    ap.add_argument("--dataset", required=True, choices=JUDGE_DATASETS)
    ap.add_argument("--root", default="data", help="data folder (torchvision layout)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="weights file (default: the cache path eval looks in)")
    ap.add_argument("--download", action="store_true", help="fetch a missing data set")
    ap.add_argument("--quiet", action="store_true")
    return ap


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="difflab", description="Train, sample, evaluate and plot diffusion models."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (then sample, evaluate and draw its figures)")
    p.add_argument(
        "--preset", default="toy2d", help=f"starting config: {', '.join(PRESETS)} (default toy2d)"
    )
    p.add_argument("--config", help="a config JSON file (as written to runs/NAME/config.json)")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. train.lr=1e-3",
    )
    p.add_argument("--name", help="run name (default: preset and time); the run lives in RUNS/NAME")
    p.add_argument("--runs", default="runs", help="folder that holds run directories")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run in this directory from its newest good checkpoint",
    )
    p.add_argument(
        "--no-finish", action="store_true", help="skip the final sampling, evaluation and figures"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train in N processes with DDP, one per GPU (or on the CPU with gloo), as torchrun "
        "--nproc_per_node N would; train.batch_size stays the global batch",
    )

    p = sub.add_parser("sample", help="draw samples from a trained run into an .npz file")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output .npz (holds 'samples')")
    _add_sampler_flags(p)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser(
        "eval", help="measure samples (a run or a samples .npz) against the true distribution"
    )
    p.add_argument("source", help="run directory or samples .npz")
    p.add_argument(
        "--dataset", help="the true distribution, for an .npz source (default: the run's)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write the result as JSON to this file")
    p.add_argument(
        "--compare",
        action="store_true",
        help="sweep samplers x model evaluations (x grids) and plot quality against NFE",
    )
    p.add_argument(
        "--samplers", help="comma-separated, for --compare (default: every deterministic one)"
    )
    p.add_argument("--nfe", default="5,10,20,50", help="model-evaluation budgets for --compare")
    p.add_argument("--grids", help="comma-separated spacings for --compare (default: --spacing)")
    p.add_argument("--guidances", help="comma-separated guidance scales for --compare")
    _add_image_eval_flags(p)
    _add_sampler_flags(p)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("plot", help="(re)draw every figure of a run from its directory")
    p.add_argument("run", help="run directory")
    p.add_argument("--resample", action="store_true", help="draw the sample artefacts again first")
    p.add_argument("--quiet", action="store_true")

    from difflab.benchmark import add_arguments as add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="training and sampling speed of a named configuration, against diffusers",
        description="Measure training (images/s, step time, peak memory, FLOP/s and its share "
        "of the device's measured matmul peak) and sampling (ms per image per sampler and NFE) "
        "for difflab and diffusers' equivalent UNet2DModel; writes OUT/bench-NAME-DEVICE.json "
        "and .md and prints the Markdown.",
    )
    add_bench_arguments(p)
    return ap


def sample_changes(args: argparse.Namespace) -> dict:
    """The SampleConfig fields the command-line flags set."""
    fields = [*SAMPLE_FLAGS, *(field for field, _, _ in _option_flags().values())]
    changes = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    if getattr(args, "batch_size", None) is not None:
        changes["batch_size"] = args.batch_size
    if getattr(args, "raw", False):
        changes["use_ema"] = False
    return changes


def sample_config(base: SampleConfig, args: argparse.Namespace) -> SampleConfig:
    """The run's sample config with the command-line flags laid over it."""
    return dataclasses.replace(base, **sample_changes(args))


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.report.run import finish_run
    from difflab.training import distributed, faults
    from difflab.training.loop import train

    world = distributed.env_world()  # this process's rank when torchrun started it
    if args.resume:
        from difflab.runs import check_run_dir

        run_dir = check_run_dir(args.resume)
        cfg = apply_overrides(RunConfig.load(run_dir / "config.json"), args.set)
    else:
        cfg = RunConfig.load(args.config) if args.config else preset(args.preset)
        cfg = apply_overrides(cfg, args.set)
        if world.size > 1 and not args.name:  # a default name has the time in it
            raise ConfigError("under torchrun every process must open the same run: pass --name")
        run_dir = Path(args.runs) / (args.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.nproc is not None:
        if world.size > 1:
            raise ConfigError("--nproc starts its own processes; leave it out under torchrun")
        distributed.check_world(cfg, args.nproc)
        if args.nproc > 1:
            return _launch_train(args, cfg, run_dir)
    if world.is_main:
        print(f"difflab: run directory {run_dir}")
    start = time.perf_counter()
    oom = faults.out_of_memory("training", *faults.train_memory_advice(cfg))
    lock = faults.RunLock(run_dir, enabled=world.is_main)  # one trainer per run directory
    try:
        with lock, faults.StopSignals() as stop, oom:  # SIGINT / SIGTERM: checkpoint, then stop
            ckpt = train(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet)
    except KeyboardInterrupt:
        if world.is_main:
            print(
                f"\ndifflab: interrupted; continue with `difflab train --resume {run_dir}`",
                file=sys.stderr,
            )
        return 130
    except RuntimeError as e:  # a collective failed: the rank that died is the one to report
        if world.size == 1 or not distributed.lost_peer(e):
            raise
        distributed.leave_after_lost_peer(world)
    if stop.exit_code:  # stopped by a signal, with a checkpoint
        if world.is_main:
            print(
                f"difflab: stopped; continue with `difflab train --resume {run_dir}`",
                file=sys.stderr,
            )
        return stop.exit_code
    if not world.is_main:  # rank 0 alone samples, evaluates and draws
        return 0
    print(f"difflab: trained in {time.perf_counter() - start:.0f} s; checkpoint {ckpt}")
    if not args.no_finish:
        finish_run(run_dir, progress=not args.quiet)
    return 0


def _launch_train(args: argparse.Namespace, cfg: RunConfig, run_dir: Path) -> int:
    """`difflab train --nproc N`: this command in N processes, as torchrun would start them,
    each told the run's directory (so they agree on a default name)."""
    from difflab.training.distributed import launch
    from difflab.training.loop import check_train_config

    check_train_config(cfg)  # one message here rather than one per process
    if args.resume:
        argv = ["train", "--resume", str(run_dir)]
    else:
        argv = ["train", "--preset", args.preset, "--runs", str(run_dir.parent)]
        argv += ["--name", run_dir.name] + (["--config", args.config] if args.config else [])
    argv += ["--set", *args.set] if args.set else []
    argv += [flag for flag, on in (("--no-finish", args.no_finish), ("--quiet", args.quiet)) if on]
    return launch(argv, args.nproc, run_dir)


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.runs import draw_samples, load_run, sample_labels, save_samples
    from difflab.training.faults import out_of_memory

    run = load_run(args.run, checkpoint=args.checkpoint, use_ema=not args.raw, device=args.device)
    scfg = sample_config(run.cfg.sample, args)
    labels = sample_labels(run, scfg.n, args.class_label, args.per_class, scfg.seed)
    start = time.perf_counter()
    batch, advice = f"--batch-size {scfg.batch_size}", "a smaller --batch-size (same samples)"
    with out_of_memory("sampling", batch, advice):
        samples = draw_samples(run, scfg, labels=labels, progress=not args.quiet)
    meta = dict(
        sampler=scfg.sampler,
        steps=scfg.steps,
        seed=scfg.seed,
        ema=scfg.use_ema,
        checkpoint=str(run.checkpoint),
    )
    if labels is not None:
        meta["guidance"] = scfg.guidance
    path = save_samples(args.out, samples, labels, **meta)
    print(
        f"difflab: {len(samples)} samples ({scfg.sampler}, {scfg.steps} steps) in "
        f"{time.perf_counter() - start:.1f} s -> {path}"
    )
    if samples.dim() == 4:
        from difflab.report.grids import class_grid, save_grid

        png = path.with_suffix(".png")
        if labels is not None:
            class_grid(samples.numpy(), labels.numpy(), png, run.class_names)
        else:
            save_grid(samples[:100].numpy(), png)
        print(f"difflab: grid -> {png}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from difflab.evaluation.toy2d import evaluate_toy
    from difflab.report.run import format_table
    from difflab.runs import draw_samples, load_run, load_samples

    source = Path(args.source)
    if _is_image_source(source):
        return _eval_images(args, source)
    if args.compare:
        return _eval_compare(args, source)
    if source.suffix == ".npz":
        samples = load_samples(source)
        dataset = args.dataset
        if dataset is None:
            raise ConfigError(
                "evaluating an .npz needs --dataset NAME (e.g. --dataset checkerboard)"
            )
        info = {"source": str(source)}
    else:
        run = load_run(source, checkpoint=args.checkpoint, use_ema=not args.raw, device=args.device)
        scfg = sample_config(run.cfg.sample, args)
        samples = draw_samples(run, scfg, progress=not args.quiet).numpy()
        dataset = args.dataset or run.cfg.data.name
        info = {
            "source": str(source),
            "checkpoint": str(run.checkpoint),
            "sampler": scfg.sampler,
            "steps": scfg.steps,
            "ema": scfg.use_ema,
            "seed": scfg.seed,
        }
    result = {**info, **evaluate_toy(samples, dataset)}
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _is_image_source(source: Path) -> bool:
    """An image run, a folder of images or an .npz of images (not 2-D points)."""
    from difflab.build import IMAGE_DATASETS
    from difflab.runs import check_run_dir

    if source.suffix == ".npz":
        from difflab.runs import load_samples

        return load_samples(source).ndim == 4
    if source.is_dir() and not (source / "config.json").is_file():
        return True  # a folder of generated images
    return RunConfig.load(check_run_dir(source) / "config.json").data.name in IMAGE_DATASETS


def _eval_images(args: argparse.Namespace, source: Path) -> int:
    """Image metrics of a run (sampled now), a samples .npz or a folder, against --reference."""
    from difflab.build import IMAGE_DATASETS
    from difflab.evaluation import protocol, references
    from difflab.evaluation.sampled import (
        evaluate_images_of,
        extractors_for,
        format_rows,
        samples_from_file,
    )
    from difflab.runs import load_run

    run, images, labels, meta = None, None, None, {"source": str(source)}
    if (source / "config.json").is_file():
        run = load_run(source, checkpoint=args.checkpoint, use_ema=not args.raw, device=args.device)
    dataset = run.cfg.data.name if run else args.dataset
    default = None
    if run and dataset == "imagefolder":
        default = run.cfg.data.root  # the folder it was trained on
    elif dataset:
        default = f"{dataset}:train"
    ref_spec = args.reference or default
    if ref_spec is None:
        raise ConfigError(f"evaluating {source} needs --reference (e.g. mnist:test) or --dataset")
    if dataset is None and ref_spec.partition(":")[0] in IMAGE_DATASETS:
        dataset = ref_spec.partition(":")[0]
    if run is None:
        grey = ref_spec.partition(":")[0] in ("mnist", "fashion")
        size = (args.channels or (1 if grey else 3), args.image_size, args.image_size)
        images, labels, file_meta = samples_from_file(source, size)
        meta.update(file_meta)
    root = args.root or (run.cfg.data.root if run else "data")
    shape = tuple(run.shape if run else images.shape[1:])
    reference = references.open_reference(ref_spec, shape, root=root, n=args.n_reference)
    metrics = _metric_list(args.metric, run.num_classes > 0 if run else labels is not None)
    extractors = extractors_for(
        metrics,
        dataset=dataset,
        judge=args.judge,
        inception_weights=args.inception_weights,
        inception_sha256=args.inception_sha256,
        device=run.device if run else "cpu",
    )
    if args.compare:
        if run is None:
            raise ConfigError("--compare draws its own samples: give a run directory")
        image_eval = {"metrics": metrics, "reference": reference, "extractors": extractors}
        image_eval["cache"] = not args.no_cache
        return _eval_compare(args, source, image_eval)
    cache = not args.no_cache
    if run:
        scfg = sample_config(run.cfg.sample, args)
        rows = evaluate_images_of(run, scfg, metrics, reference, extractors, not args.quiet, cache)
    else:
        rows = protocol.evaluate_images(
            images, labels, metrics, reference, extractors, meta, cache=cache
        )
    result = {"rows": rows}
    out = Path(args.out) if args.out else _default_eval_path(source, run is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_rows(rows))
    print(f"difflab: wrote {out}", file=sys.stderr)  # stdout stays the table or the JSON
    return 0


def _default_eval_path(source: Path, is_run: bool) -> Path:
    """Where image results go without --out: RUN/evals/, or beside the .npz or folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if is_run:
        return source / "evals" / f"eval-{stamp}.json"
    return source.parent / f"{source.stem}-eval-{stamp}.json"


def _metric_list(text: str | None, conditional: bool) -> list[str]:
    """--metric, or the offline defaults (class accuracy when samples have labels)."""
    if text:
        return [m.strip() for m in text.split(",") if m.strip()]
    return ["fd_judge", "kid_judge", "pr_judge"] + (["accuracy"] if conditional else [])


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} needs at least one number")
    return values


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def _eval_compare(args: argparse.Namespace, source: Path, image_eval: dict | None = None) -> int:
    from difflab.report.run import compare_samplers, format_compare

    if source.suffix == ".npz":
        raise ConfigError("--compare draws its own samples: give a run directory, not an .npz")
    names = args.samplers.split(",") if args.samplers else None
    grids = args.grids.split(",") if args.grids else None
    result = compare_samplers(
        source,
        samplers=names,
        nfes=_int_list(args.nfe, "--nfe"),
        grids=grids,
        guidances=_float_list(args.guidances, "--guidances") if args.guidances else None,
        changes=sample_changes(args),
        image_eval=image_eval,
        checkpoint=args.checkpoint,
        device=args.device,
        progress=not args.quiet,
    )
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_compare(result))
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from difflab.evaluation.classifier import train_judge
    from difflab.evaluation.sampled import default_judge_path

    out = Path(args.out) if args.out else default_judge_path(args.dataset)
    start = time.perf_counter()
    _, accuracy = train_judge(
        args.dataset,
        args.root,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        out_path=out,
        progress=None if args.quiet else print,
        download=args.download,
    )
    print(
        f"difflab: judge for {args.dataset}: test accuracy {accuracy:.4f} in "
        f"{time.perf_counter() - start:.0f} s -> {out}"
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from difflab.report.run import plot_run

    for path in plot_run(Path(args.run), resample=args.resample, progress=not args.quiet):
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from difflab.benchmark import bench_main

    text, json_path, md_path = bench_main(args)
    print(text)
    print(f"difflab: wrote {json_path} and {md_path}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "train-classifier": cmd_train_classifier,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "train-classifier"]:
        args = classifier_parser().parse_args(argv[2:])
        args.command = "train-classifier"
    else:
        args = parser().parse_args(argv)
    warnings.formatwarning = lambda msg, *a, **k: f"difflab: warning: {msg}\n"
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # they name the bad input and fix
        if os.environ.get("DIFFLAB_TRACEBACK"):
            raise
        if not getattr(e, "everywhere", False) or os.environ.get("RANK", "0") == "0":
            print(f"difflab: error: {e}", file=sys.stderr)  # once, for a fault every rank saw
        return 2
    except NonFiniteError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outputs are written atomically: nothing is left half-written
        print("\ndifflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
