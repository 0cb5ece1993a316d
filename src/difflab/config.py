"""Run configuration: nested dataclasses, presets, and `--set a.b=value` overrides.

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


class ConfigError(ValueError):
    """A user-facing problem with the config or command line; the message says the fix."""


@dataclass
class DataConfig:
    name: str = "checkerboard"  # a 2-D toy set: checkerboard, moons, swiss_roll, gaussians8, rings


@dataclass
class ModelConfig:
    name: str = "mlp"
    width: int = 128  # hidden width
    depth: int = 4  # residual blocks
    emb_dim: int = 128  # time-embedding width
    fourier_frequencies: int = 6  # octaves of input Fourier features (0 = raw coordinates)
    expansion: int = 2  # hidden expansion inside a block
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | sigmoid
    num_steps: int = 1000  # T of the discrete table; 0 trains in continuous time
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    prediction: str = "v"  # what the network outputs: eps | x0 | v
    target: str = ""  # space the loss is measured in; "" = same as prediction
    loss: str = "mse"  # mse | l1 | huber
    weighting: str = "none"  # none | snr | min_snr | snr_plus_one (x0-space weights)
    min_snr_gamma: float = 5.0
    huber_delta: float = 0.1
    t_sampling: str = "stratified"  # uniform | stratified
    clip_x0: float = (
        0.0  # clamp x0_hat to [-c, c] while sampling; 0 = off (images in [-1, 1] use 1)
    )


@dataclass
class TrainConfig:
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
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    log_every: int = 100
    checkpoint_every: int = 2000
    keep_checkpoints: int = 2  # the last K are kept


@dataclass
class SampleConfig:
    sampler: str = "ddpm"  # ddpm | ddim
    steps: int = 1000
    # discrete: linspace | leading | trailing | quadratic; continuous: uniform | quadratic | logsnr
    spacing: str = "quadratic"
    eta: float = 0.0  # DDIM only
    variance: str = "small"  # DDPM only: small (beta-tilde) | large (beta)
    n: int = 20000  # samples drawn for the run's figures and evaluation
    batch_size: int = 20000
    seed: int = 1
    use_ema: bool = True


@dataclass
class RunConfig:
    preset: str = "toy2d"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _from_dict(cls, d, "")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _from_dict(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(
            f"config section {prefix or '(top)'} must be a mapping, got {type(d).__name__}"
        )
    hints = _hints(cls)
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
            value = [v for v in value.strip("()[] ").split(",") if v]
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
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
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
    return RunConfig.from_dict(d)


def toy2d() -> RunConfig:
    """The 2-D checkerboard: a residual MLP with Fourier features, ~4 minutes on 2 CPU cores."""
    return RunConfig(preset="toy2d")


PRESETS = {"toy2d": toy2d}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
