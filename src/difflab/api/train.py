"""`difflab.train`: `difflab train` from Python (the same run directory, lock, save-on-signal,
figures and report), returning the trained run."""

from __future__ import annotations

from pathlib import Path

from difflab.api.run import Run, load
from difflab.cli.train import default_run_dir, run_training
from difflab.config import ConfigError, RunConfig, apply_overrides, preset
from difflab.files import check_writable


def train(
    preset_name: str | None = "toy2d",
    name: str | None = None,
    runs: str | Path = "runs",
    *,
    resume: str | Path | None = None,
    config: str | Path | None = None,
    finish: bool = True,
    progress: bool = True,
    **overrides,
) -> Run:
    """Train a run as `difflab train --preset PRESET --name NAME --runs RUNS --set ...` does
    and return it loaded.

    Overrides are keyword arguments with `__` for the dot of `--set section.key=value`:
    `train__steps=100, sample__steps=20, model__unet__base_channels=32`; a tuple or list
    value sets a tuple field (`model__unet__channel_mults=(1, 2)`).

    Args:
        preset_name: a preset (`difflab.config.PRESETS`), as --preset.
        name: the run's folder under `runs`; None = `<preset>-<date>-<time>`.
        resume: continue this run directory instead (overrides apply on top, as --set does).
        config: a config.json to start from instead of the preset, as --config.
        finish: sample, evaluate and draw the report afterwards (as without --no-finish).
        progress: progress bars (notebook widgets in Jupyter with difflab[notebook]).
    Returns:
        the run, loaded from its newest checkpoint.
    Raises:
        ConfigError: an unknown preset or override, a run directory in use or not writable.
        KeyboardInterrupt: stopped by an interrupt (after a checkpoint); resume=... continues.
    """
    changes = [_override(key, value) for key, value in overrides.items()]
    if resume is not None:
        from difflab.runs import check_run_dir

        run_dir = check_run_dir(resume)
        cfg = apply_overrides(RunConfig.load(run_dir / "config.json"), changes)
    else:
        cfg = RunConfig.load(config) if config else preset(preset_name)
        cfg = apply_overrides(cfg, changes)
        run_dir = default_run_dir(cfg, runs, name)
    check_writable(run_dir, f"resume={str(run_dir)!r}" if resume else f"runs={str(runs)!r}")
    from difflab.training.distributed import env_world

    code = run_training(
        cfg, run_dir, env_world(), resume=resume is not None, progress=progress, finish=finish
    )
    if code:
        raise KeyboardInterrupt(
            f"training stopped (exit code {code}); continue with "
            f"difflab.train(resume={str(run_dir)!r})"
        )
    return load(run_dir)


def _override(key: str, value) -> str:
    """`train__steps=100` as the --set string "train.steps=100"."""
    if "__" not in key:
        raise ConfigError(
            f"difflab.train({key}=...): overrides name section__key (train__steps=100 for "
            "--set train.steps=100)"
        )
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    return f"{key.replace('__', '.')}={value}"
