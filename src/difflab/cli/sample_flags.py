"""The flags that build a SampleConfig, shared by every command that samples (sample, eval,
reflow, ema, train's grids): the sampler and its grid, each registered sampler's own options,
guidance and its method, the weights (EMA or raw) and the checkpoint."""

from __future__ import annotations

import argparse
import dataclasses

from difflab.config import ConfigError, SampleConfig
from difflab.samplers import SAMPLERS

# Options every sampler shares; each sampler's own (--eta, --churn, ...) come from the registry.
SAMPLE_FLAGS = (
    "sampler",
    "steps",
    "spacing",
    "t_end",
    "n",
    "seed",
    "guidance",
    "guidance_tmin",
    "guidance_tmax",
    "shift",
)

# The guidance method and its knobs (diffusion/guidance.py), on every command that samples.
GUIDANCE_FLAGS = ("guidance_method", "apg_eta", "apg_momentum", "apg_threshold", "guide_with")


def _option_flags() -> dict[str, tuple]:
    """flag -> (SampleConfig field, type, help) of every registered sampler's flagged options;
    an option two samplers share (Euler's and Heun's churn) is one flag."""
    flags = {}
    for info in SAMPLERS.values():
        for o in info.options:
            if o.flag:
                flags.setdefault(o.flag, (o.field, o.type, o.help))
    return flags


def checkpoint_arg(value: str) -> int | str:
    if value == "best":
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a step number or 'best', got {value!r}")


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--shift", type=float, help="time shift s of the grid (flow models; SD3 uses 3): > 0"
    )
    p.add_argument(  # torchrun's own parser takes a bare --n for its --nnodes, --nproc-...
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        help="number of samples (--num-samples "
        "under torchrun, whose parser mistakes --n for its own flags)",
    )
    p.add_argument("--seed", type=int, help="noise seed")
    p.add_argument("--batch-size", type=int, help="samples per batch (results do not depend on it)")
    p.add_argument(
        "--raw", action="store_true", help="use the raw weights instead of the EMA weights"
    )
    p.add_argument(
        "--checkpoint",
        type=checkpoint_arg,
        help="checkpoint to load: a step number or 'best' (default: the newest good one)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (conditional runs)"
    )
    p.add_argument(
        "--guidance-tmin",
        dest="guidance_tmin",
        type=float,
        help="guide only above this noise level sigma / alpha (conditional below it)",
    )
    p.add_argument(
        "--guidance-tmax",
        dest="guidance_tmax",
        type=float,
        help="guide only up to this noise level (conditional above it; 0 = no limit)",
    )
    add_guidance_flags(p)
    p.add_argument("--class", dest="class_label", type=int, help="sample this class only")
    p.add_argument("--per-class", action="store_true", help="n / num_classes samples of each class")


def add_guidance_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guidance-method",
        dest="guidance_method",
        help="cfg | apg | cfg++ | auto: classifier-free, adaptive projected, CFG++ (DDIM, eta 0, "
        "--guidance in [0, 1]) or autoguidance by --guide-with",
    )
    p.add_argument("--apg-eta", dest="apg_eta", type=float, help="APG: parallel-part weight")
    p.add_argument(
        "--apg-momentum", dest="apg_momentum", type=float, help="APG: momentum beta (< 0)"
    )
    p.add_argument(
        "--apg-threshold", dest="apg_threshold", type=float, help="APG: norm threshold r (0: none)"
    )
    p.add_argument(
        "--guide-with",
        dest="guide_with",
        metavar="RUN[:step-N]",
        help="autoguidance's weak model: a run (or an earlier checkpoint of one) on the same "
        "data, schedule and conditioning",
    )


def sample_changes(args: argparse.Namespace) -> dict:
    """The SampleConfig fields the command-line flags set."""
    fields = [*SAMPLE_FLAGS, *GUIDANCE_FLAGS, *(field for field, _, _ in _option_flags().values())]
    changes = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    if getattr(args, "batch_size", None) is not None:
        changes["batch_size"] = args.batch_size
    if ema_choice(args) is not None:
        changes["use_ema"] = ema_choice(args)
    return changes


def ema_choice(args: argparse.Namespace) -> bool | None:
    """The weights the command line asks for: --raw the raw ones (False); without it None, and
    the run's own sample.use_ema decides (`config.use_ema_of`, asked by `runs.load_run`)."""
    return False if getattr(args, "raw", False) else None


def sample_config(base: SampleConfig, args: argparse.Namespace) -> SampleConfig:
    """The run's sample config with the command-line flags laid over it."""
    scfg = dataclasses.replace(base, **sample_changes(args))
    if scfg.n < 1:
        raise ConfigError(f"--n must be >= 1, got {scfg.n}")
    return scfg
