"""The command line: every parser (the sampling flags are in sample_flags.py)."""

from __future__ import annotations

import argparse

from difflab.cli.edit import add_edit_flags
from difflab.cli.pretrained import add_pretrained_parser
from difflab.cli.sample_flags import (
    add_sampler_flags,
    checkpoint_arg,
)
from difflab.cli.text import add_text_flags
from difflab.config import (
    PRESETS,
)


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
    p.add_argument("run", help="run directory, weights file or pretrained:NAME")
    p.add_argument("--out", required=True, help="output .npz (holds 'samples')")
    add_sampler_flags(p)
    add_text_flags(p)
    add_edit_flags(p)
    p.add_argument("--quiet", action="store_true")
    _add_nproc_flag(p)

    p = sub.add_parser(
        "eval", help="measure samples (a run or a samples .npz) against the true distribution"
    )
    p.add_argument("source", help="run directory, weights file, pretrained:NAME or samples .npz")
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
    p.add_argument(
        "--guidance-methods",
        dest="guidance_methods",
        help="comma-separated guidance methods for --compare, each with its own scales after "
        "colons (default: --guidances), e.g. cfg:1.25:1.5,cfg++:0.6,apg:3,auto:2",
    )
    _add_image_eval_flags(p)
    add_sampler_flags(p)
    p.add_argument("--quiet", action="store_true")
    _add_nproc_flag(p)

    p = sub.add_parser("plot", help="(re)draw every figure of a run from its directory")
    p.add_argument("run", help="run directory")
    p.add_argument("--resample", action="store_true", help="draw the sample artefacts again first")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("report", help="write RUN/report.html, one self-contained page")
    p.add_argument("run", help="run directory")
    p.add_argument("--open", action="store_true", help="open the page in the web browser")
    _add_share_parsers(sub)

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
    _add_reflow_parser(sub)
    _add_ema_parser(sub)
    add_pretrained_parser(sub)
    return ap


def _add_ema_parser(sub) -> None:
    p = sub.add_parser(
        "ema",
        help="post-hoc EMA: the EMA of any sigma_rel from a run's power-function snapshots",
        description="Synthesise the power-function EMA of --sigma-rel S from RUN/phema/ (EDM2's "
        "least-squares reconstruction; train with train.phema_sigma_rels and train.phema_every) "
        "into a weights file that sample, eval and export read; or --sweep a range, evaluate "
        "each and mark the best.",
    )
    p.add_argument("run", help="run directory trained with train.phema_sigma_rels")
    p.add_argument("--sigma-rel", dest="sigma_rel", type=float, help="the EMA length to write")
    p.add_argument("--sweep", metavar="LO:HI[:K]", help="evaluate K sigma_rels (default 8)")
    p.add_argument(
        "--out",
        help="--sigma-rel: the weights file (default RUN/posthoc/ema-S.safetensors); --sweep: "
        "the JSON (default RUN/posthoc/sweep.json)",
    )
    _add_image_eval_flags(p)
    add_sampler_flags(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(compare=False, guidance_methods=None)


def _add_reflow_parser(sub) -> None:
    p = sub.add_parser(
        "reflow", help="draw (noise, ODE endpoint) pairs of a flow run and train its reflow"
    )
    p.add_argument(
        "run", help="a flow run (diffusion.prediction=velocity) or weights file (pretrained:NAME)"
    )
    p.add_argument("--pairs", type=int, default=50_000, help="pairs to draw (default 50,000)")
    p.add_argument("--chunk", type=int, default=5000, help="pairs per resumable file")
    p.add_argument("--name", help="the reflow run's name (default: RUN's name + '-reflow')")
    p.add_argument(
        "--runs", help="folder for the reflow run (default: beside RUN; runs/ for a weights file)"
    )
    p.add_argument("--no-init", action="store_true", help="train from scratch, not from RUN")
    p.add_argument("--pairs-only", action="store_true", help="draw the pairs, train nothing")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override the reflow run's config, e.g. train.steps=4000",
    )
    p.add_argument("--no-finish", action="store_true", help="skip the final figures")
    p.add_argument("--quiet", action="store_true")
    add_sampler_flags(p)


def _add_share_parsers(sub) -> None:
    p = sub.add_parser("export", help="a run as a diffusers folder or a half-precision EMA file")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", required=True, choices=("diffusers", "ema"))
    p.add_argument("--out", required=True, help="diffusers: a folder; ema: FILE.safetensors")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="ema: precision")
    p.add_argument("--raw", action="store_true", help="diffusers: the online, not EMA, weights")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--checkpoint", type=checkpoint_arg, help="a step number or 'best' (default: newest)"
    )
    p = sub.add_parser("import", help="a diffusers UNet2DModel folder as a difflab run")
    p.add_argument("folder", help="a diffusers pipeline folder (unet/, scheduler/)")
    p.add_argument("--name", required=True, help="run name; the run lives in RUNS/NAME")
    p.add_argument("--runs", default="runs", help="folder that holds run directories")


def _add_nproc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="split the samples (and feature extraction) over N processes, one per GPU (or on "
        "the CPU with gloo), as torchrun --nproc_per_node N would: the same output bit for bit",
    )
