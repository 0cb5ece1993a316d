"""Run configuration: nested dataclasses and `--set a.b=value` overrides (presets: presets.py).

The resolved config is saved as `config.json` beside each run and inside each checkpoint, and
`RunConfig.from_dict(cfg.to_dict())` gives the same config back.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from difflab.config.consistency import ConsistencyConfig
from difflab.config.dit import DiTConfig
from difflab.config.few_step import MeanFlowConfig, ShortcutConfig
from difflab.config.latent import AutoencoderConfig, AutoencoderLossConfig
from difflab.config.sampling import SampleConfig, guidance_record, use_ema_of
from difflab.config.text import TextConfig
from difflab.errors import ConfigError
from difflab.files import write_text_atomically


@dataclass
class DataConfig:
    # 2-D: checkerboard, moons, swiss_roll, gaussians8, rings;
    # images: mnist, fashion, cifar10, celeba64, imagefolder
    name: str = "checkerboard"
    root: str = "data"  # image datasets in torchvision's layout, or the image folder itself
    download: bool = False  # fetch a missing standard dataset (needs a network)
    image_size: int = 0  # 0 = the dataset's standard size (32; 64 for celeba64 and folders)
    flip: str = "auto"  # random horizontal flips: auto (the dataset's default) | on | off
    channels: int = 0  # imagefolder only: 1 or 3 (0 = 3); other data sets have their own
    class_conditional: bool = False  # feed labels to the network (with train.label_dropout)
    workers: int = 0  # threads decoding image files per batch (folders, CelebA); 0 = up to 8
    pairs: str = ""  # reflow: train on this folder of (noise, endpoint) pairs (difflab reflow)
    text_conditional: bool = False  # captions as conditions (data/captions.py; model.text)


@dataclass
class MLPConfig:
    width: int = 128  # hidden width
    depth: int = 4  # residual blocks
    emb_dim: int = 128  # time-embedding width
    fourier_frequencies: int = 6  # octaves of input Fourier features (0 = raw coordinates)
    expansion: int = 2  # hidden expansion inside a block
    dropout: float = 0.0


@dataclass
class UNetConfig:
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)  # level indices with self-attention
    num_heads: int = 1
    bottleneck_blocks: int = 2
    mid_attention: bool = True
    dropout: float = 0.1
    weight_standardization: bool = False
    downsample: str = "conv"  # conv | avgpool | space_to_depth
    upsample: str = "nearest"  # nearest | bilinear
    norm_groups: int = 32
    checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more time
    cross_attention_levels: tuple[int, ...] = ()  # levels attending to the text (and the middle)


@dataclass
class ModelConfig:
    # mlp (2-D data) | unet, dit (images or latents) | autoencoder (a latent codec's run)
    name: str = "mlp"
    mlp: MLPConfig = field(default_factory=MLPConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)  # the transformer (config/dit.py)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    codec: str = ""  # "" = pixels; an autoencoder run directory: diffuse in its latent space
    codec_sha256: str = ""  # the autoencoder's codec.safetensors, pinned when training starts
    codec_encode: str = "mean"  # mean | sample: the posterior's mean, or a draw from it
    codec_cache: bool = False  # encode the whole training set once (kept in the codec's run)
    text: TextConfig = field(default_factory=TextConfig)
    # a second time input t2 beside t (MeanFlow's t - r, a shortcut's step size d): the
    # meanflow and shortcut losses need it; false builds the nets of before, bit for bit
    second_time: bool = False
    # the sinusoidal time embedding reads t in [0, 1] times this (DDPM's step range: 1000); a
    # MeanFlow net wants u smooth in t (its target holds (t - r) d_t u), and 1 makes it so
    time_scale: float = 1000.0


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | sigmoid | vp | ve | edm | rectified | trig
    num_steps: int = 1000  # T of the discrete table; 0 trains in continuous time (vp, ve, edm: 0)
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    sigma_min: float = 0.0  # ve / edm noise range; 0 = the schedule's default
    sigma_max: float = 0.0  # (ve: 0.01 .. 50, edm: 0.002 .. 80)
    prediction: str = "v"  # what the net outputs: eps | x0 | v | edm | velocity (flow matching)
    sigma_data: float = 0.5  # data standard deviation for edm preconditioning and weighting
    target: str = ""  # space the loss is measured in; "" = same as prediction
    loss: str = "mse"  # mse | l1 | huber
    weighting: str = "none"  # none | snr | min_snr | snr_plus_one | edm (x0-space weights)
    min_snr_gamma: float = 5.0
    huber_delta: float = 0.1
    t_sampling: str = "stratified"  # uniform | stratified | lognormal (EDM)
    lognormal_mean: float = -1.2  # ln(sigma / alpha) ~ N(mean, std^2) for t_sampling=lognormal
    lognormal_std: float = 1.2
    clip_x0: float = (
        0.0  # clamp x0_hat to [-c, c] while sampling; 0 = off (images in [-1, 1] use 1)
    )
    # flow matching (schedule=rectified | trig, prediction=velocity): t_sampling=logit_normal
    # draws logit(t) ~ N(loc, scale^2), mode uses mode_scale (SD3, Esser et al. 2024, Sec. 3.1)
    logit_loc: float = 0.0
    logit_scale: float = 1.0
    mode_scale: float = 1.29
    coupling: str = "independent"  # independent | ot (mini-batch OT, Tong et al. 2023) | reflow


@dataclass
class TrainConfig:
    loss: str = "diffusion"  # the loss object the trainer calls (build.LOSSES)
    autoencoder: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    steps: int = 8000  # optimizer steps
    batch_size: int = 1024
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is split across them)
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # constant | cosine (decays to 0 at `steps`)
    warmup_steps: int = 200
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.999
    ema_warmup: bool = True
    # post-hoc EMA (EDM2): power-function EMA profiles of these widths, e.g. 0.05,0.10; () = off
    phema_sigma_rels: tuple[float, ...] = ()
    phema_every: int = 0  # store every profile in RUN/phema/ every N steps (`difflab ema`)
    # autoguidance's weak model (Karras et al. 2024): a companion net of this width scale in
    # (0, 1) trained beside the main one on the same batches for guide_steps, kept in RUN/guide
    guide_model: float = 0.0  # 0 = off
    guide_steps: int = 0  # the companion's updates (<= steps); it stops learning after them
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    log_every: int = 100
    checkpoint_every: int = 2000
    keep_checkpoints: int = 2  # the last K are kept
    keep_best: bool = True  # also keep checkpoints/best: the lowest best_metric so far
    best_metric: str = "loss_smoothed"  # loss_smoothed | loss | grad_norm | eval (eval_metric)
    tensorboard: bool = False  # mirror metrics.jsonl to RUN/tensorboard (pip install tensorboard)
    label_dropout: float = 0.1  # class-conditional: share of labels replaced by the null label
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler) | auto
    compile: bool = False  # torch.compile the network for training
    channels_last: str = "auto"  # auto (on for images) | on | off: NHWC convolutions
    sample_every: int = 0  # a grid (2-D: scatter) from fixed noise every N steps; 0 = off
    time_limit_minutes: float = 0.0  # stop (with a checkpoint) after this long; 0 = off
    eval_every: int = 0  # measure eval_metric every N steps (EMA weights, fixed noise); 0 = off
    eval_metric: str = ""  # "" = sliced_w2 (2-D) or fd_judge (images); fid, kid, ... (eval)
    eval_n: int = 1000  # samples per evaluation (labelled: fd_judge1k)
    eval_reference: str = ""  # images: "" = the data set's test split; a split, folder or .npz
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop (with advice) | skip the update
    nonfinite_max_skips: int = 10  # skip: stop after this many skipped updates in a row
    init_from: str = ""  # a checkpoint or weights file whose EMA weights start a run (reflow)


@dataclass
class RunConfig:
    preset: str = "toy2d"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A saved config (config.json, a checkpoint's, an export record's), read as the
        current version reads it (`_upgrade`)."""
        return _from_dict(cls, _upgrade(d), "")

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically: resume reads it, so a crash must leave it whole
        or absent, never half written."""
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(
                f"config file {path} is a folder; pass a config JSON file, e.g. {path}/config.json"
            ) from None
        except OSError as e:  # unreadable: permissions, a broken mount
            raise ConfigError(
                f"config file {path} cannot be read ({e.strerror or e}); make it readable or "
                "pass another --config"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _upgrade(d: dict) -> dict:
    """A saved config in the current layout. Until 2026-12 data.channels defaulted to 3 on
    every data set and was ignored outside an image folder: a saved 3 there means "the data
    set's own", now written 0 (the refusal of any other value is build._check_channels')."""
    data = d.get("data") if isinstance(d, dict) else None
    if isinstance(data, dict) and data.get("name") != "imagefolder" and data.get("channels") == 3:
        d = {**d, "data": {**data, "channels": 0}}
    return d


def _from_dict(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(
            f"config section {prefix or '(top)'} must be a mapping, got {type(d).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
            f"known keys in {prefix or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in d.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _from_dict(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    return cls(**kwargs)


def _coerce(value, kind, key: str):
    """Check (and gently convert) a JSON or command-line value to a field's type."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if isinstance(value, int | float):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
            args = (args[0],) * len(value) if isinstance(value, list | tuple) else ()
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} needs {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ConfigError
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {kind.__name__}, got {value!r}") from None
    return value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings (the `--set` flag) and return a new config."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set takes section.key=value, got {item!r} (example: --set train.lr=1e-3)"
            )
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        node = d
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(
                    f"--set {path}: {k!r} is not a config section; sections: {', '.join(d)}"
                )
            node = node[k]
        if keys[-1] not in node or isinstance(node[keys[-1]], dict):
            known = ", ".join(
                f"{'.'.join(keys[:-1])}.{k}" for k in node if not isinstance(node[k], dict)
            )
            raise ConfigError(f"--set {path}: no such config key; known keys here: {known}")
        node[keys[-1]] = value
    return _from_dict(RunConfig, d, "")  # what was set stays set (no _upgrade of a saved 3)


# The presets live in config/presets.py; imported last, as they build on the classes above.
from difflab.config.presets import PRESETS, preset  # noqa: E402

__all__ = [
    "PRESETS",
    "AutoencoderConfig",
    "AutoencoderLossConfig",
    "ConfigError",
    "ConsistencyConfig",
    "DataConfig",
    "DiTConfig",
    "DiffusionConfig",
    "MLPConfig",
    "ModelConfig",
    "RunConfig",
    "SampleConfig",
    "TextConfig",
    "TrainConfig",
    "UNetConfig",
    "apply_overrides",
    "guidance_record",
    "preset",
    "use_ema_of",
]
