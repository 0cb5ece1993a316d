"""A trained run directory: its config, its model for sampling, and its sample artefacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab import build, devices
from difflab.config import ConfigError, RunConfig, SampleConfig
from difflab.diffusion.prediction import Denoiser
from difflab.files import savez_atomically
from difflab.model import DataKind, Model
from difflab.samplers import Recorder
from difflab.training.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_good_checkpoint,
    list_checkpoints,
    load_data_info,
    load_weights,
    verify_checkpoint,
)


@dataclass
class LoadedRun:
    """A run directory's model, loaded from one of its checkpoints."""

    run_dir: Path
    checkpoint: Path
    cfg: RunConfig
    model: Model
    step: int  # the training step of the checkpoint

    @property
    def denoiser(self) -> Denoiser:
        return self.model.denoiser

    @property
    def shape(self) -> tuple[int, ...]:  # one example, e.g. (2,) or (C, H, W)
        return self.model.kind.shape

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_classes(self) -> int:  # 0 = unconditional
        return self.model.kind.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model.conditioner.class_names


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} does not exist; train one with `difflab train --name NAME`"
        )
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a difflab run directory (no config.json)")
    return run_dir


def load_run(
    run_dir: str | Path,
    *,
    checkpoint: int | str | None = None,
    use_ema: bool = True,
    device: str = "auto",
) -> LoadedRun:
    """Load a run's network (EMA weights by default) from its newest good checkpoint, or from
    `checkpoint`: a step number or "best"."""
    run_dir = check_run_dir(run_dir)
    if checkpoint is None:
        ckpt = latest_good_checkpoint(run_dir / "checkpoints")
    elif checkpoint == "best":
        ckpt = run_dir / "checkpoints" / "best"
        if not ckpt.is_dir():
            raise CheckpointError(
                f"{run_dir} has no best checkpoint (train.keep_best was off, or no checkpoint "
                "was written yet); use --checkpoint STEP or leave it out for the newest"
            )
        problem = verify_checkpoint(ckpt)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt} is unusable: {problem}")
    else:
        ckpt = run_dir / "checkpoints" / f"step-{checkpoint}"
        if ckpt not in list_checkpoints(run_dir / "checkpoints"):
            steps = (
                ", ".join(p.name[5:] for p in list_checkpoints(run_dir / "checkpoints")) or "none"
            )
            raise CheckpointError(
                f"{run_dir} has no checkpoint at step {checkpoint}; available: {steps}"
            )
        problem = verify_checkpoint(ckpt)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt} is unusable: {problem}")
    cfg = RunConfig.load(ckpt / "config.json")
    model = build.build_model(
        cfg, DataKind.from_info(load_data_info(ckpt)), devices.resolve_device(device)
    )
    load_weights(ckpt, model.net, "ema" if use_ema else "model")
    model.net.eval().requires_grad_(False)
    return LoadedRun(run_dir, ckpt, cfg, model, checkpoint_step(ckpt))


def run_kind(run_dir: str | Path) -> DataKind:
    """What a run's data are (points or images, shape, classes): decided once by training and
    carried in its checkpoints' data.json."""
    ckpt = latest_good_checkpoint(check_run_dir(run_dir) / "checkpoints")
    return DataKind.from_info(load_data_info(ckpt))


def sample_labels(
    run: LoadedRun, n: int, class_label: int | None = None, per_class: bool = False, seed: int = 0
) -> torch.Tensor | None:
    """The conditions (n,) of a sample request, or None for an unconditional model: class_label
    fixes one class; per_class gives n / num_classes of each class in order; otherwise a
    conditional model gets uniformly drawn classes (seeded)."""
    try:
        return run.model.conditioner.request(
            n, class_label=class_label, per_class=per_class, seed=seed
        )
    except ValueError as e:
        raise ConfigError(f"{run.run_dir}: {e}") from None


def draw_samples(
    run: LoadedRun,
    sample_cfg: SampleConfig,
    *,
    labels: torch.Tensor | None = None,
    start: int = 0,
    progress: bool = True,
    recorder: Recorder | None = None,
) -> torch.Tensor:
    """(n, *shape) samples of a loaded run with the sampler `sample_cfg` names, at
    sample_cfg.precision; a conditional run is guided at sample_cfg.guidance with the given
    conditions (n,) (drawn uniformly when None); `start`: index of the first (a share)."""
    autocast = devices.resolve_precision(sample_cfg.precision, run.device, "sample.precision")
    return run.model.sample(
        sample_cfg,
        cond=labels,
        start=start,
        progress=progress,
        recorder=recorder,
        autocast=autocast,
    )


def save_samples(
    path: str | Path, samples: torch.Tensor, labels: torch.Tensor | None = None, **meta
) -> Path:
    """Write samples.npz atomically: `samples` float32, `labels` if given, metadata arrays."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"--out must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": samples.float().numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    arrays.update({k: np.asarray(v) for k, v in meta.items()})
    savez_atomically(path, **arrays)  # Ctrl-C leaves no half-written file
    return path


def save_run_samples(
    run: LoadedRun, samples: torch.Tensor, labels: torch.Tensor | None, sample_cfg: SampleConfig
) -> Path:
    """A run's own samples/samples.npz, with how they were drawn."""
    return save_samples(
        run.run_dir / "samples" / "samples.npz",
        samples,
        labels,
        sampler=sample_cfg.sampler,
        steps=sample_cfg.steps,
        seed=sample_cfg.seed,
        guidance=sample_cfg.guidance if labels is not None else 1.0,
        ema=sample_cfg.use_ema,
        step=run.step,
    )


def load_samples(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"samples file {path} does not exist; make one with `difflab sample RUN --out {path}`"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            if "samples" not in f:
                raise ConfigError(f"{path} has no 'samples' array (keys: {', '.join(f.files)})")
            return f["samples"]
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} as a samples .npz: {e}") from None
