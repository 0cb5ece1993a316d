"""A trained run directory: its config, its model for sampling, and its sample artefacts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from difflab import build, devices
from difflab.config import ConfigError, RunConfig, SampleConfig
from difflab.diffusion.prediction import Denoiser
from difflab.files import savez_atomically
from difflab.model import DataKind, Model, RunKind
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


# Metadata keys of a weights file (`difflab export --format ema`): the run's config, data.json
# and step as JSON strings; the tensors are the EMA weights in half precision.
WEIGHTS_META = ("difflab_config", "difflab_data", "difflab_step")


def is_weights_file(path: str | Path) -> bool:
    return Path(path).suffix == ".safetensors" and Path(path).is_file()


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if is_weights_file(run_dir):
        raise ConfigError(
            f"{run_dir} is an EMA weights file (half precision, no optimizer state): it samples "
            "and evaluates but cannot be trained on; resume the run directory it came from"
        )
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
    `checkpoint`: a step number or "best". A weights file (.safetensors) loads its EMA
    weights upcast to float32."""
    if is_weights_file(run_dir):
        return load_weights_file(Path(run_dir), use_ema, device)
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


def weights_file_meta(path: Path) -> tuple[RunConfig, DataKind, int]:
    """The config, data kind and step a weights file carries in its metadata."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        config, data, step = (json.loads(meta[k]) for k in WEIGHTS_META)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ConfigError(
            f"{path} is not a difflab weights file ({type(e).__name__}: {e}); make one with "
            "`difflab export RUN --format ema --dtype fp16 --out FILE.safetensors`"
        ) from None
    return RunConfig.from_dict(config), DataKind.from_info(data), int(step)


def load_weights_file(path: Path, use_ema: bool = True, device: str = "auto") -> LoadedRun:
    """A LoadedRun from a weights file: its half-precision EMA weights upcast to float32."""
    if not use_ema:
        raise ConfigError(f"{path} holds the EMA weights only; leave out --raw")
    cfg, kind, step = weights_file_meta(path)
    model = build.build_model(cfg, kind, devices.resolve_device(device))
    state = {k: v.float() for k, v in load_file(path).items()}  # safetensors: no code runs
    try:
        model.net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"the weights in {path} do not fit its config: {e}"[:300]) from None
    model.net.eval().requires_grad_(False)
    return LoadedRun(path, path, cfg, model, step)


def run_kind(run_dir: str | Path) -> RunKind:
    """What a run is (family, data, condition, codec) without building its model: its newest
    checkpoint's config and data.json (or a weights file's metadata), read by build.run_kind
    as when the run is loaded."""
    if is_weights_file(run_dir):
        cfg, data, _ = weights_file_meta(Path(run_dir))
        return build.run_kind(cfg, data)
    ckpt = latest_good_checkpoint(check_run_dir(run_dir) / "checkpoints")
    return build.run_kind(
        RunConfig.load(ckpt / "config.json"), DataKind.from_info(load_data_info(ckpt))
    )


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
