"""`difflab sample`'s text flags: --prompt, --prompts-file and --gif, read and checked before
anything is sampled or written."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from difflab.config import ConfigError


def add_text_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help='a text model: sample this sentence ("a handwritten seven")')
    p.add_argument(
        "--prompts-file",
        help="a text model: one prompt per line; --n samples of each, a grid row each",
    )
    p.add_argument("--gif", action="store_true", help="a text model: a denoising GIF per prompt")


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts the flags name (None: neither flag)."""
    if args.prompt is not None and args.prompts_file:
        raise ConfigError("give --prompt or --prompts-file, not both")
    if args.prompt is not None:
        return [args.prompt]
    if not args.prompts_file:
        return None
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path} does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ConfigError(f"--prompts-file {path} has no prompts (one per line)")
    return prompts


def sample_conditions(run, scfg, prompts: list[str] | None, class_label=None, per_class=False):
    """(scfg, conditions or None, each sample's prompt or None) of a sampling request, shared
    by `difflab sample` and `Run.sample`: a text model samples scfg.n of each prompt, or its
    default prompts; a class model one class, n / classes of each (per_class) or drawn labels
    (seeded by scfg.seed); an unconditional model refuses classes and prompts."""
    from difflab.runs import sample_labels

    if prompts is not None:  # a text model: scfg.n samples of each prompt
        return prompt_conditions(run, prompts, scfg, class_label, per_class)
    default_prompts = default_prompts_of(run, scfg.n, per_class)
    return scfg, sample_labels(run, scfg.n, class_label, per_class, scfg.seed), default_prompts


def prompt_conditions(run, prompts: list[str], scfg, class_label, per_class):
    """(scfg with n = --n per prompt, conditions, each sample's prompt) for a text model; a
    clear refusal for a model that reads no text, or for class flags beside prompts."""
    conditioner, kind = run.model.conditioner, run.model.kind
    if not kind.text:
        raise ConfigError(
            f"{run.run_dir} was not trained on text (it takes "
            f"{'class labels' if kind.conditional else 'no condition'}); --prompt and "
            "--prompts-file need a run of data.text_conditional=true (e.g. --preset mnist-text)"
        )
    if class_label is not None or per_class:
        raise ConfigError("--class and --per-class do not go with prompts; leave them out")
    each = [p for p in prompts for _ in range(scfg.n)]
    return dataclasses.replace(scfg, n=len(each)), conditioner.prompts(each), each


def default_prompts_of(run, n: int, per_class: bool) -> list[str] | None:
    """A text model sampled without prompts: its default prompts (`balanced`'s), one per
    sample; None for a model that reads no text."""
    if not run.model.kind.text:
        return None
    if per_class:
        raise ConfigError("--per-class needs class labels; give a text model --prompts-file")
    return run.model.conditioner.default_prompts(n)
