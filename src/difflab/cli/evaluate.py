"""`difflab eval`: 2-D metrics, image metrics with provenance, --compare, and
`difflab eval train-classifier`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from difflab.cli.processes import everywhere, peers, relaunch
from difflab.cli.sample_flags import ema_choice, sample_changes, sample_config
from difflab.config import (
    ConfigError,
)
from difflab.files import check_writable, write_text_atomically


def cmd_eval(args: argparse.Namespace) -> int:
    """Measure a run (sampled now), a samples .npz or a folder; in N processes (torchrun or
    --nproc N) each draws its block of samples and features, and rank 0 writes the results."""
    from difflab.evaluation.sharded import sampling_world

    code = relaunch(args)
    if code is not None:
        return code
    world = sampling_world(args.device)
    with peers(world):
        code = _eval(args, world)
    return code


def _eval(args: argparse.Namespace, world) -> int:
    from difflab.evaluation.sampled import sampling_provenance, timed_samples
    from difflab.evaluation.sharded import agree, check_visible
    from difflab.evaluation.toy2d import evaluate_toy
    from difflab.report.run import format_table
    from difflab.runs import load_samples

    source = Path(args.source)
    if args.out:
        check_writable(Path(args.out).parent, f"--out {args.out}")
    image = agree(world, lambda: check_visible(source, world) or _is_image_source(source))
    if args.compare and world.size > 1:
        raise everywhere("--compare runs in one process: leave out --nproc and torchrun")
    if image:
        return _eval_images(args, source, world)
    image_only = [
        flag
        for flag, value in (
            ("--metric", args.metric),
            ("--reference", args.reference),
            ("--n-reference", args.n_reference),
            ("--judge", args.judge),
        )
        if value is not None
    ]
    if image_only:
        raise ConfigError(
            f"{', '.join(image_only)} choose image metrics; {source} holds 2-D points, which get "
            "the 2-D metrics of their data set: leave them out"
        )
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
        run, scfg = agree(world, lambda: _load_for_sampling(args, source, world))
        samples, timing = timed_samples(run, scfg, None, not args.quiet, world)
        samples = samples.numpy()
        dataset = args.dataset or run.cfg.data.name
        # how the samples were drawn, as image rows say it (nfe, seed, ema, ...), and how fast
        info = {**sampling_provenance(run, scfg, run.model.conditioner.conditional), **timing}
        info["source"] = str(source)
    result = {**info, **evaluate_toy(samples, dataset)}
    if not world.is_main:  # rank 0 alone writes and prints
        return 0
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _load_for_sampling(args: argparse.Namespace, source: Path, world):
    """(the run, its sample config) for this rank, refusing more processes than samples."""
    from difflab.evaluation.sharded import blocks, rank_device
    from difflab.runs import attach_guide, load_run

    device = rank_device(world, args.device)
    run = load_run(source, checkpoint=args.checkpoint, use_ema=ema_choice(args), device=device)
    scfg = sample_config(run.cfg.sample, args)
    blocks(scfg.n, world.size)
    attach_guide(run, scfg).model.check_sample(scfg)  # refused before any sampling
    return run, scfg


def _is_image_source(source: Path) -> bool:
    """An image run, a folder of images or an .npz of images (not 2-D points)."""
    from difflab.runs import load_samples, run_kind

    if source.suffix == ".npz":
        return load_samples(source).ndim == 4
    if source.is_dir() and not (source / "config.json").is_file():
        return True  # a folder of generated images
    return run_kind(source).is_image


def _eval_images(args: argparse.Namespace, source: Path, world) -> int:
    """Image metrics of a run (sampled now), a samples .npz or a folder, against --reference."""
    from difflab.evaluation import protocol
    from difflab.evaluation.sampled import evaluate_images_of
    from difflab.evaluation.sharded import Sharded, agree

    if (source / "config.json").is_file() and _is_autoencoder(source):  # reconstructions
        return _write_rows(args, source, _autoencoder_rows(args, source, world), True)
    run, images, labels, meta, reference, metrics, extractors = agree(
        world, lambda: _image_eval_setup(args, source, world)
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
        rows = evaluate_images_of(
            run, scfg, metrics, reference, extractors, not args.quiet, cache, world
        )
    else:
        if world.size > 1:
            extractors = {kind: Sharded(e, world) for kind, e in extractors.items()}
        rows = protocol.evaluate_images(
            images, labels, metrics, reference, extractors, meta, cache=cache
        )
    if not world.is_main:  # rank 0 alone writes and prints
        return 0
    return _write_rows(args, source, rows, run is not None)


def _write_rows(args: argparse.Namespace, source: Path, rows: list[dict], is_run: bool) -> int:
    from difflab.evaluation.sampled import format_rows

    result = {"rows": rows}
    out = Path(args.out) if args.out else _default_eval_path(source, is_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_rows(rows))
    print(f"difflab: wrote {out}", file=sys.stderr)  # stdout stays the table or the JSON
    return 0


def _is_autoencoder(source: Path) -> bool:
    from difflab.runs import run_kind

    return run_kind(source).autoencoder


def _autoencoder_rows(args: argparse.Namespace, source: Path, world) -> list[dict]:
    from difflab.evaluation.reconstruction import evaluate_autoencoder_run

    if world.size > 1 or args.compare:
        raise everywhere("an autoencoder run is evaluated in one process, without --compare")
    return evaluate_autoencoder_run(args, source, ema_choice(args))


def _image_eval_setup(args: argparse.Namespace, source: Path, world) -> tuple:
    """(run or None, images, labels, meta, reference, metrics, extractors) of an image eval,
    refusing what cannot be measured before any sampling."""
    from difflab.build import IMAGE_DATASETS
    from difflab.evaluation import protocol, references
    from difflab.evaluation.sampled import extractors_for, samples_from_file
    from difflab.evaluation.sharded import blocks, rank_device
    from difflab.runs import attach_guide, is_weights_file, load_run

    run, images, labels, meta = None, None, None, {"source": str(source)}
    if (source / "config.json").is_file() or is_weights_file(source):
        device = rank_device(world, args.device)
        run = load_run(source, checkpoint=args.checkpoint, use_ema=ema_choice(args), device=device)
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
    # accuracy by default where samples name classes (labels, or a text model's prompts)
    metrics = _metric_list(args.metric, bool(run.class_names) if run else labels is not None)
    extractors = extractors_for(
        metrics,
        dataset=dataset,
        judge=args.judge,
        inception_weights=args.inception_weights,
        inception_sha256=args.inception_sha256,
        device=run.device if run else "cpu",
    )
    if run:  # what evaluate_images_of would refuse after loading: refuse it on every rank now
        scfg = sample_config(run.cfg.sample, args)
        if not (args.compare and args.guidance_methods):  # else each method is checked there
            attach_guide(run, scfg).model.check_sample(scfg)
        n = scfg.n
        dims = {kind: e.feature_dim for kind, e in extractors.items()}
        protocol.check_metrics(metrics, n, dims, run.model.conditioner.conditional)
        blocks(n, world.size)
    return run, images, labels, meta, reference, metrics, extractors


def _default_eval_path(source: Path, is_run: bool) -> Path:
    """Where image results go without --out: RUN/evals/, or beside the .npz or folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if is_run and source.is_dir():
        return source / "evals" / f"eval-{stamp}.json"
    stem = source.stem.replace(":", "-")  # pretrained:NAME -> pretrained-NAME-eval-...
    return source.parent / f"{stem}-eval-{stamp}.json"


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


def _method_list(text: str) -> list[tuple[str, list[float]]]:
    """--guidance-methods: [(method, its scales)] from METHOD[:SCALE...],... ([]: --guidances)."""
    methods = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        method, *scales = entry.split(":")
        flag = f"--guidance-methods {method}"
        methods.append((method, _float_list(",".join(scales), flag) if scales else []))
    if not methods:
        raise ConfigError("--guidance-methods needs at least one method, e.g. cfg,apg:3")
    return methods


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def _eval_compare(args: argparse.Namespace, source: Path, image_eval: dict | None = None) -> int:
    from difflab.evaluation.compare import compare_samplers, format_compare
    from difflab.report.run import plot_compare

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
        methods=_method_list(args.guidance_methods) if args.guidance_methods else None,
        changes=sample_changes(args),
        image_eval=image_eval,
        checkpoint=args.checkpoint,
        device=args.device,
        progress=not args.quiet,
    )
    result = plot_compare(result, source, Path(args.out) if args.out else None)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_compare(result))
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from difflab.evaluation.classifier import train_judge
    from difflab.evaluation.sampled import default_judge_path

    out = Path(args.out) if args.out else default_judge_path(args.dataset)
    check_writable(out.parent, f"--out {out}")
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
