"""Drive difflab's samplers with a network trained elsewhere.

A foreign discrete-time model (a diffusers `UNet2DModel`, a DDPM checkpoint ported by hand, ...)
is an eps-, x0- or v-prediction network on a table of T betas that takes integer-like timesteps
0..T-1. `foreign_denoiser` turns it into a difflab denoiser, after which every sampler, grid and
guidance option works on it unchanged:

    from diffusers import DDPMScheduler, UNet2DModel
    from difflab.diffusion.adapters import foreign_denoiser
    from difflab.samplers import generate, sample_dpmpp_2m, timesteps

    unet = UNet2DModel.from_pretrained("google/ddpm-cifar10-32").eval()
    config = DDPMScheduler.from_pretrained("google/ddpm-cifar10-32").config
    den = foreign_denoiser(unet, scheduler_config=config)
    x = generate(sample_dpmpp_2m, den, 16, (3, 32, 32), timesteps(den.schedule, 20, "logsnr"))

A flow model trained elsewhere (diffusers' `FlowMatchEulerDiscreteScheduler` config, or any
config whose prediction_type is flow, flow_prediction or velocity) predicts the rectified-flow
velocity u = eps - x0 at timestep sigma T, sigma = t on the path alpha = 1 - t, sigma = t: it
becomes a velocity-kind denoiser on `RectifiedFlowSchedule`, so every difflab solver drives it;
DDIM on the scheduler's own sigmas is its Euler step exactly, and
`timesteps(den.schedule, n, "uniform", shift=config["shift"])` is difflab's shifted grid.

Timesteps: difflab puts step i = 1..T at t = i / T; diffusers numbers the same steps 0..T-1, so
the model is called with timestep t T - 1. Between the table's steps (Karras or log-SNR grids)
that is a fractional timestep, which sinusoidal time embeddings accept; `round_timesteps=True`
snaps to the nearest trained step instead.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from difflab.diffusion.prediction import Denoiser
from difflab.diffusion.schedules import DiscreteSchedule, RectifiedFlowSchedule
from difflab.errors import ConfigError

# diffusers' names for what a model predicts -> difflab's prediction kinds
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FLOW_PREDICTIONS = ("flow", "flow_prediction", "velocity")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def is_flow_config(config: Mapping) -> bool:
    """Whether a diffusers-style scheduler config describes a flow-matching model: its class
    name (a saved scheduler_config.json), its prediction_type, or a `shift` and no betas (the
    config of a FlowMatchEulerDiscreteScheduler made in code)."""
    no_betas = not any(k in config for k in ("beta_schedule", "trained_betas", "beta_start"))
    return (
        config.get("_class_name") in FLOW_SCHEDULERS
        or config.get("prediction_type") in FLOW_PREDICTIONS
        or ("shift" in config and no_betas)
    )


def betas_from_config(config: Mapping) -> Tensor:
    """The (T,) betas a diffusers-style scheduler config describes.

    Reads `trained_betas` when given, else `beta_schedule` (linear, scaled_linear,
    squaredcos_cap_v2) with `num_train_timesteps`, `beta_start`, `beta_end`.
    """
    if config.get("trained_betas") is not None:
        return torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    T = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":  # Ho et al. 2020
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        t = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ConfigError(
        f"unsupported beta_schedule {kind!r}; give the betas directly "
        f"(foreign_denoiser(model, betas=...)) or use one of {', '.join(BETA_SCHEDULES)}"
    )


class ForeignNet:
    """Presents `model(x, timestep[, class_labels])` as difflab's `net(x_t, t, y)`.

    Args:
        model: the foreign network; its output may be a tensor or an object with `.sample`.
        num_steps: T of its table.
        round_timesteps: call it only at trained steps (nearest), never in between.
    """

    def __init__(
        self, model: Callable, num_steps: int, round_timesteps: bool = False, flow: bool = False
    ):
        self.model, self.num_steps, self.round_timesteps = model, num_steps, round_timesteps
        self.offset = 0 if flow else 1  # a flow model sees sigma T; a table's step i as i - 1
        forward = getattr(model, "forward", model)
        try:
            self.takes_labels = "class_labels" in inspect.signature(forward).parameters
        except (TypeError, ValueError):  # builtins without a signature
            self.takes_labels = False

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        timestep = t * self.num_steps - self.offset
        if self.round_timesteps:
            timestep = timestep.round().clamp(0, self.num_steps - self.offset)
        if y is not None and not self.takes_labels:
            raise ConfigError(
                "class labels were given but the foreign model takes no class_labels argument"
            )
        out = (
            self.model(x_t, timestep, class_labels=y)
            if y is not None
            else self.model(x_t, timestep)
        )
        return getattr(out, "sample", out)


def foreign_denoiser(
    model: Callable,
    *,
    betas: Tensor | None = None,
    scheduler_config: Mapping | None = None,
    prediction: str | None = None,
    clip_x0: float | None = None,
    round_timesteps: bool = False,
) -> Denoiser:
    """A difflab denoiser around a foreign discrete-time model.

    Args:
        model: `model(x_t, timestep)` (or with `class_labels=`), timesteps 0..T-1.
        betas: its (T,) betas; or give `scheduler_config` (a diffusers scheduler config).
        scheduler_config: a mapping with diffusers' keys (num_train_timesteps, beta_schedule,
            beta_start, beta_end, trained_betas, prediction_type).
        prediction: "eps", "x0" or "v"; default: the config's prediction_type, else "eps".
            A flow config (module docstring) makes a velocity denoiser on the rectified path.
        clip_x0: clamp x0_hat while sampling (1.0 for images in [-1, 1]).
        round_timesteps: see ForeignNet.
    """
    if (betas is None) == (scheduler_config is None):
        raise ConfigError("give exactly one of betas= or scheduler_config=")
    if scheduler_config is not None and is_flow_config(scheduler_config):
        if prediction not in (None, "velocity"):
            raise ConfigError(
                f"a flow-matching scheduler's model predicts the velocity, not {prediction!r}"
            )
        if scheduler_config.get("use_dynamic_shifting") or scheduler_config.get("invert_sigmas"):
            raise ConfigError(
                "dynamic (resolution-dependent) shifting and inverted sigmas are not supported; "
                "pass a config with a fixed `shift` and sample with timesteps(..., shift=shift)"
            )
        T = int(scheduler_config.get("num_train_timesteps", 1000))
        net = ForeignNet(model, T, round_timesteps, flow=True)
        return Denoiser(net, RectifiedFlowSchedule(), "velocity", clip_x0)
    if scheduler_config is not None:
        betas = betas_from_config(scheduler_config)
        if prediction is None:
            name = scheduler_config.get("prediction_type", "epsilon")
            if name not in DIFFUSERS_PREDICTIONS:
                known = ", ".join(DIFFUSERS_PREDICTIONS)
                raise ConfigError(f"unsupported prediction_type {name!r}; one of {known}")
            prediction = DIFFUSERS_PREDICTIONS[name]
    schedule = DiscreteSchedule(torch.as_tensor(betas, dtype=torch.float64), name="foreign")
    net = ForeignNet(model, schedule.num_steps, round_timesteps)
    return Denoiser(net, schedule, prediction or "eps", clip_x0)
