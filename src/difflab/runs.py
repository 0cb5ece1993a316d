"""A trained run directory: its config, its model for sampling, and its sample artefacts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab import build, devices
from difflab.config import ConfigError, RunConfig, SampleConfig, use_ema_of
from difflab.diffusion.prediction import Denoiser
from difflab.files import savez_atomically
from difflab.model import DataKind, Model, RunKind
from difflab.samplers import Recorder, nfe_of
from difflab.training.checkpoint import (  # the weights file's reading, re-exported here
    COMPANION_FOLDER,
    CheckpointError,
    checkpoint_step,
    is_weights_file,
    latest_good_checkpoint,
    list_checkpoints,
    load_data_info,
    load_weights,
    load_weights_file_into,
    resolve_source,
    verify_checkpoint,
    weights_file_meta,
)


@dataclass
class LoadedRun:
    """A run directory's model, loaded from one of its checkpoints."""

    run_dir: Path
    checkpoint: Path
    cfg: RunConfig
    model: Model
    step: int  # the training step of the checkpoint
    ema: bool = True  # the weights loaded: the EMA copy (True) or the raw, online net (False)
    guide_with: str = ""  # the weak run in model.guide (attach_guide), "" for none

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
    run_dir = resolve_source(run_dir)
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
    use_ema: bool | None = None,
    device: str = "auto",
) -> LoadedRun:
    """Load a run's network from its newest good checkpoint, or from `checkpoint`: a step
    number or "best". `use_ema`: the EMA (True) or raw (False) weights; None = what the run's
    sample.use_ema says (`config.use_ema_of`); the LoadedRun's `ema` says which were loaded.
    A weights file (.safetensors, or pretrained:NAME) loads its EMA weights upcast to float32."""
    if is_weights_file(run_dir):
        return load_weights_file(resolve_source(run_dir), use_ema, device)
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
    ema = use_ema_of(cfg.sample, use_ema)
    load_weights(ckpt, model.net, "ema" if ema else "model")
    model.net.eval().requires_grad_(False)
    return LoadedRun(run_dir, ckpt, cfg, model, checkpoint_step(ckpt), ema)


def load_weights_file(path: Path, use_ema: bool | None = None, device: str = "auto") -> LoadedRun:
    """A LoadedRun from a weights file: its half-precision EMA weights upcast to float32 (the
    only weights it holds, whatever its config's sample.use_ema)."""
    if use_ema is False:
        raise ConfigError(f"{path} holds the EMA weights only; leave out --raw")
    cfg, kind, step = weights_file_meta(path)
    model = build.build_model(cfg, kind, devices.resolve_device(device))
    load_weights_file_into(path, model.net)
    model.net.eval().requires_grad_(False)
    return LoadedRun(path, path, cfg, model, step, ema=True)


def run_kind(run_dir: str | Path) -> RunKind:
    """What a run is (family, data, condition, codec) without building its model: its newest
    checkpoint's config and data.json (or a weights file's metadata), read by build.run_kind
    as when the run is loaded."""
    if is_weights_file(run_dir):
        cfg, data, _ = weights_file_meta(resolve_source(run_dir))
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
    except ConfigError as e:
        raise ConfigError(f"{run.run_dir}: {e}") from None


def draw_samples(
    run: LoadedRun,
    sample_cfg: SampleConfig,
    *,
    labels: torch.Tensor | None = None,
    start: int = 0,
    progress: bool = True,
    recorder: Recorder | None = None,
    edit=None,
) -> torch.Tensor:
    """(n, *shape) samples of a loaded run with the sampler `sample_cfg` names, at
    sample_cfg.precision; a conditional run is guided at sample_cfg.guidance with the given
    conditions (n,) (drawn uniformly when None); `start`: index of the first (a share);
    `edit`: a `samplers.Edit` of them (image to image, inpainting)."""
    attach_guide(run, sample_cfg)
    return run.model.sample(
        sample_cfg, cond=labels, start=start, progress=progress, recorder=recorder, edit=edit
    )


def attach_guide(run: LoadedRun, sample_cfg: SampleConfig) -> LoadedRun:
    """`run` with autoguidance's weak model (sample_cfg.guide_with: RUN, or RUN:step-N for an
    earlier checkpoint of a run; when empty, the run's own companion RUN/guide if it has one:
    `companion_of`) in `run.model.guide`, when sample_cfg asks for autoguidance; loaded once;
    `run.guide_with` names it. Refused in one line when the weak run diffuses on another
    schedule, another data set, another conditioning or another image (or latent) size: its
    predictions would not be of the same x_t (Karras et al. 2024 guide with the same model,
    only worse)."""
    spec = sample_cfg.guide_with or companion_of(run)
    if sample_cfg.guidance_method != "auto" or not spec:
        return run
    if run.model.guide is not None and run.guide_with == spec:
        return run
    path, checkpoint = parse_guide(spec)
    try:
        weak = load_run(path, checkpoint=checkpoint, device=str(run.device))
    except ConfigError as e:
        raise ConfigError(f"--guide-with {spec}: {e}") from None
    problems = [
        f"{what} ({_text(mine)} here, {_text(theirs)} in {spec})"
        for what, mine, theirs in _guide_keys(run, weak)
        if mine != theirs
    ]
    if problems:
        raise ConfigError(
            f"--guide-with {spec} cannot guide {run.run_dir}: another "
            f"{'; another '.join(problems)}; autoguidance needs a weaker model of the same "
            "schedule, data, conditioning and size"
        )
    run.model = dataclasses.replace(run.model, guide=weak.model)
    run.guide_with = spec
    return run


def companion_of(run: LoadedRun) -> str:
    """The run's own weak model, RUN/guide (trained beside it with train.guide_model), as a
    --guide-with value; "" when it has none (a weights file, or train.guide_model was 0)."""
    folder = run.run_dir / COMPANION_FOLDER
    if run.run_dir.is_dir() and list_checkpoints(folder / "checkpoints"):
        return str(folder)
    return ""


def parse_guide(spec: str) -> tuple[str, int | str | None]:
    """(run directory, checkpoint: a step, "best" or None for the newest) of RUN[:checkpoint],
    the checkpoint named as its folder (step-200) or by its step (200)."""
    path, _, name = spec.rpartition(":")
    if not path:  # no colon: the run's newest checkpoint
        return spec, None
    if name == "best":
        return path, name
    step = name.removeprefix("step-")
    if not step.isdigit():
        raise ConfigError(
            f"--guide-with {spec}: the checkpoint after ':' must be step-N, N or best, got {name!r}"
        )
    return path, int(step)


def _guide_keys(run: LoadedRun, weak: LoadedRun) -> list[tuple[str, object, object]]:
    """(what, this run's, the weak run's) of everything autoguidance needs equal."""

    def schedule(cfg: RunConfig) -> tuple:
        d = cfg.diffusion
        return (d.schedule, d.num_steps, d.beta_start, d.beta_end, d.sigma_min, d.sigma_max)

    def conditioning(r: LoadedRun) -> tuple:
        text = r.cfg.model.text if r.cfg.data.text_conditional else None
        kind = "text" if text else "classes" if r.num_classes else "none"
        return (kind, r.num_classes, text.encoder if text else "", text.max_tokens if text else 0)

    def data_set(cfg: RunConfig) -> str:  # an image folder is a data set by its folder
        return cfg.data.name + (f" {cfg.data.root}" if cfg.data.name == "imagefolder" else "")

    def size(r: LoadedRun) -> tuple:
        return (tuple(r.shape), r.model.codec.latent_shape(r.shape), r.cfg.model.codec_sha256)

    return [
        ("schedule", schedule(run.cfg), schedule(weak.cfg)),
        ("data set", data_set(run.cfg), data_set(weak.cfg)),
        ("conditioning", conditioning(run), conditioning(weak)),
        ("image size", size(run), size(weak)),
    ]


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)


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
    """A run's own samples/samples.npz, with how they were drawn (`ema`: the weights `run`
    holds)."""
    return save_samples(
        run.run_dir / "samples" / "samples.npz",
        samples,
        labels,
        sampler=sample_cfg.sampler,
        steps=sample_cfg.steps,
        nfe=nfe_of(sample_cfg.sampler, sample_cfg.steps, sample_cfg),
        seed=sample_cfg.seed,
        guidance=sample_cfg.guidance if labels is not None else 1.0,
        ema=run.ema,
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
