"""A trained run directory: its config, its model for sampling, and its sample artefacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab import build
from difflab.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_good_checkpoint,
    list_checkpoints,
    load_data_info,
    load_weights,
    verify_checkpoint,
)
from difflab.config import ConfigError, RunConfig, SampleConfig
from difflab.files import savez_atomically
from difflab.guidance import guided
from difflab.prediction import Denoiser
from difflab.samplers import Recorder, generate


@dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: Path
    cfg: RunConfig
    denoiser: Denoiser
    shape: tuple[int, ...]  # one example, e.g. (2,) or (C, H, W)
    device: torch.device
    num_classes: int  # 0 = unconditional
    class_names: tuple[str, ...]
    step: int  # the training step of the checkpoint
    compiled_net: torch.nn.Module | None = None  # torch.compile'd net, made on first use


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
    dev = build.resolve_device(device)
    info = load_data_info(ckpt)
    shape, classes = tuple(info["shape"]), int(info["num_classes"])
    net = build.build_net(cfg.model, shape, classes)
    load_weights(ckpt, net, "ema" if use_ema else "model")
    net = net.to(dev).eval().requires_grad_(False)
    net = net.to(memory_format=build.memory_format(cfg.train.channels_last, shape))
    denoiser = build.build_denoiser(cfg, net, build.build_schedule(cfg.diffusion))
    names = tuple(info.get("class_names") or (str(k) for k in range(classes)))
    step = checkpoint_step(ckpt)
    return LoadedRun(run_dir, ckpt, cfg, denoiser, shape, dev, classes, names, step)


def sample_labels(
    run: LoadedRun, n: int, class_label: int | None = None, per_class: bool = False, seed: int = 0
) -> torch.Tensor | None:
    """Labels (n,) for a sample request, or None for an unconditional model.

    class_label fixes one class; per_class gives n / num_classes of each class in order;
    otherwise a conditional model gets uniformly drawn classes (seeded).
    """
    if run.num_classes == 0:
        if class_label is not None or per_class:
            raise ConfigError(
                f"{run.run_dir} is an unconditional model; --class and --per-class "
                "need one trained with data.class_conditional=true"
            )
        return None
    if class_label is not None:
        if not 0 <= class_label < run.num_classes:
            raise ConfigError(
                f"--class {class_label} is out of range; this model has classes "
                f"0..{run.num_classes - 1}"
            )
        return torch.full((n,), class_label, dtype=torch.long)
    if per_class:
        if n % run.num_classes:
            raise ConfigError(
                f"--per-class needs --n to be a multiple of the {run.num_classes} "
                f"classes, got {n}; try --n {n - n % run.num_classes or run.num_classes}"
            )
        return torch.arange(run.num_classes).repeat_interleave(n // run.num_classes)
    return torch.randint(run.num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def draw_samples(
    run: LoadedRun,
    sample_cfg: SampleConfig,
    *,
    labels: torch.Tensor | None = None,
    progress: bool = True,
    recorder: Recorder | None = None,
) -> torch.Tensor:
    """(n, *shape) samples of a loaded run with the sampler `sample_cfg` names.

    A class-conditional run samples with classifier-free guidance at sample_cfg.guidance and the
    given labels (n,) (drawn uniformly when None).
    """
    fn, options, ts = build.build_sampler(sample_cfg, run.denoiser.schedule)
    if sample_cfg.n < 1:
        raise ConfigError(f"--n must be >= 1, got {sample_cfg.n}")
    denoiser = run.denoiser
    if sample_cfg.compile:
        denoiser = denoiser.with_net(_compiled_net(run))
    if run.num_classes > 0:
        if labels is None:
            labels = sample_labels(run, sample_cfg.n, seed=sample_cfg.seed)
        try:
            denoiser = guided(denoiser, sample_cfg.guidance, run.num_classes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif sample_cfg.guidance != 1.0:
        raise ConfigError(
            f"guidance {sample_cfg.guidance} asked of {run.run_dir}, an unconditional "
            "model; guidance needs one trained with data.class_conditional=true"
        )
    autocast = build.resolve_precision(sample_cfg.precision, run.device, "sample.precision")
    return generate(
        fn,
        denoiser,
        sample_cfg.n,
        run.shape,
        ts,
        seed=sample_cfg.seed,
        batch_size=sample_cfg.batch_size,
        labels=labels,
        device=run.device,
        callback=recorder,
        progress=progress,
        autocast=autocast,
        **options,
    )


def _compiled_net(run: LoadedRun):
    """The run's network under torch.compile, compiled once per loaded run."""
    if run.compiled_net is None:
        run.compiled_net = build.maybe_compile(run.denoiser.net, True, "sample.compile")
    return run.compiled_net


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
