"""The one place that maps config names to constructors (explicit dicts, no dotted strings)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from difflab import schedules
from difflab.config import ConfigError, DiffusionConfig, ModelConfig, RunConfig, SampleConfig
from difflab.data.stream import ToyStream
from difflab.data.toy2d import TOY2D
from difflab.nets.mlp import MLP
from difflab.objectives import LossSpec
from difflab.prediction import Denoiser
from difflab.samplers import sample_ddim, sample_ddpm, timesteps

SCHEDULES = {
    "linear": lambda cfg: schedules.linear(cfg.num_steps or 1000, cfg.beta_start, cfg.beta_end),
    "cosine": lambda cfg: schedules.CosineSchedule(),
    "sigmoid": lambda cfg: schedules.SigmoidSchedule(),
}

# name -> (sampler function, the SampleConfig fields it takes as options)
SAMPLERS = {
    "ddpm": (sample_ddpm, ("variance",)),
    "ddim": (sample_ddim, ("eta",)),
}

NETS = {"mlp": MLP}


def _checked(fn):
    """Turn ValueErrors raised while building into ConfigErrors (clean CLI messages)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    return wrapper


@_checked
def build_schedule(cfg: DiffusionConfig) -> schedules.Schedule:
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}"
        )
    if cfg.num_steps < 0:
        raise ConfigError(
            f"diffusion.num_steps must be >= 0 (0 = continuous time), got {cfg.num_steps}"
        )
    schedule = SCHEDULES[cfg.schedule](cfg)
    if cfg.num_steps > 0 and not isinstance(schedule, schedules.DiscreteSchedule):
        schedule = schedule.discretize(cfg.num_steps)
    elif cfg.num_steps == 0 and isinstance(schedule, schedules.DiscreteSchedule):
        raise ConfigError(
            "the linear schedule is a discrete DDPM table; set diffusion.num_steps > 0 "
            "or use diffusion.schedule=cosine or sigmoid for continuous time"
        )
    return schedule


@_checked
def build_loss_spec(cfg: DiffusionConfig) -> LossSpec:
    return LossSpec(
        target=cfg.target or None,
        loss=cfg.loss,
        weighting=cfg.weighting,
        min_snr_gamma=cfg.min_snr_gamma,
        huber_delta=cfg.huber_delta,
        t_sampling=cfg.t_sampling,
    )


@_checked
def build_net(cfg: ModelConfig, data_shape: tuple[int, ...]) -> nn.Module:
    if cfg.name not in NETS:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {', '.join(NETS)}")
    for key in ("width", "depth", "emb_dim", "expansion"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    return MLP(
        dim=data_shape[0],
        width=cfg.width,
        depth=cfg.depth,
        emb_dim=cfg.emb_dim,
        fourier_frequencies=cfg.fourier_frequencies,
        expansion=cfg.expansion,
        dropout=cfg.dropout,
    )


@_checked
def build_data(cfg: RunConfig, seed: int) -> ToyStream:
    if cfg.data.name not in TOY2D:
        raise ConfigError(f"unknown dataset {cfg.data.name!r}; choose one of {', '.join(TOY2D)}")
    return ToyStream(cfg.data.name, seed)


@_checked
def build_denoiser(cfg: RunConfig, net: nn.Module, schedule: schedules.Schedule) -> Denoiser:
    if cfg.diffusion.clip_x0 < 0:
        raise ConfigError(f"diffusion.clip_x0 must be >= 0 (0 = off), got {cfg.diffusion.clip_x0}")
    return Denoiser(net, schedule, cfg.diffusion.prediction, cfg.diffusion.clip_x0 or None)


@_checked
def build_sampler(cfg: SampleConfig, schedule: schedules.Schedule):
    """(sampler function, options dict, time grid) for a sample config."""
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    fn, option_names = SAMPLERS[cfg.sampler]
    options = {name: getattr(cfg, name) for name in option_names}
    return fn, options, timesteps(schedule, cfg.steps, cfg.spacing)


@_checked
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={name} but no CUDA GPU is visible; use train.device=cpu or auto"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
