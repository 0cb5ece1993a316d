"""The one place that maps config names to constructors (explicit dicts, no dotted strings)."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from difflab import config
from difflab.codecs import build_codec, pin_codec  # noqa: F401 (training pins through build)
from difflab.conditioners import ClassLabels, Unconditional
from difflab.conditioners.text import text_conditioner
from difflab.config import ConfigError, RunConfig
from difflab.data.captions import captioned
from difflab.data.folders import DatasetMissingError
from difflab.data.images import DEFAULT_FLIP, load_image_dataset
from difflab.data.pairs import PairStream
from difflab.data.stream import ImageStream, ToyStream
from difflab.data.toy2d import TOY2D
from difflab.devices import memory_format
from difflab.diffusion import schedules
from difflab.diffusion.autoencoder_loss import AutoencoderLoss
from difflab.diffusion.consistency import ConsistencyDenoiser
from difflab.diffusion.consistency_losses import CONSISTENCY_LOSSES
from difflab.diffusion.couplings import check_coupling
from difflab.diffusion.few_step_losses import MeanFlowLoss, ShortcutLoss
from difflab.diffusion.losses import DiffusionLoss
from difflab.diffusion.objectives import LossSpec
from difflab.diffusion.prediction import Denoiser, v_refusal
from difflab.model import DataKind, FoldedGuidance, Model, RunKind
from difflab.nets.autoencoder import AutoencoderKL, PatchDiscriminator
from difflab.nets.dit import DiT
from difflab.nets.mlp import MLP
from difflab.nets.mmdit import dit_net
from difflab.nets.text import text_encoder
from difflab.nets.unet import UNet
from difflab.samplers import sampler_info, timesteps

SCHEDULES = {
    "linear": lambda cfg: schedules.linear(cfg.num_steps or 1000, cfg.beta_start, cfg.beta_end),
    "cosine": lambda cfg: schedules.CosineSchedule(),
    "sigmoid": lambda cfg: schedules.SigmoidSchedule(),
    "vp": lambda cfg: schedules.VPSDESchedule(),
    "ve": lambda cfg: schedules.VESchedule(cfg.sigma_min or 0.01, cfg.sigma_max or 50.0),
    "edm": lambda cfg: schedules.EDMSchedule(cfg.sigma_min or 0.002, cfg.sigma_max or 80.0),
    "rectified": lambda cfg: schedules.RectifiedFlowSchedule(),
    "trig": lambda cfg: schedules.TrigFlowSchedule(),
}

NETS = {"mlp": MLP, "unet": UNet, "dit": DiT, "autoencoder": AutoencoderKL}
IMAGE_DATASETS = tuple(DEFAULT_FLIP)


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
def build_schedule(cfg: config.DiffusionConfig) -> schedules.Schedule:
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
            "or use diffusion.schedule=cosine, sigmoid, vp, ve or edm for continuous time"
        )
    return schedule


@_checked
def build_loss_spec(cfg: config.DiffusionConfig, schedule: schedules.Schedule) -> LossSpec:
    if cfg.target == "v" and not schedule.variance_preserving:
        raise ConfigError(v_refusal(schedule, "space loss"))
    return LossSpec(
        target=cfg.target or None,
        loss=cfg.loss,
        weighting=cfg.weighting,
        min_snr_gamma=cfg.min_snr_gamma,
        huber_delta=cfg.huber_delta,
        t_sampling=cfg.t_sampling,
        lognormal_mean=cfg.lognormal_mean,
        lognormal_std=cfg.lognormal_std,
        sigma_data=cfg.sigma_data,
        logit_loc=cfg.logit_loc,
        logit_scale=cfg.logit_scale,
        mode_scale=cfg.mode_scale,
    )


@_checked
def build_net(
    cfg: config.ModelConfig, data_shape: tuple[int, ...], num_classes: int = 0, text=None
) -> nn.Module:
    """The network for data of `data_shape` (one example); num_classes > 0 adds labels, a
    text encoder module (nets/text.py) adds cross-attention (U-Net) or joint attention (DiT)."""
    if cfg.name not in NETS:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {', '.join(NETS)}")
    scale = cfg.time_scale
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"model.time_scale must be a number > 0, got {scale}")
    if cfg.name == "mlp":
        if len(data_shape) != 1:
            raise ConfigError(
                f"model.name=mlp is for vectors, the data has shape {data_shape}; "
                "use model.name=unet for images"
            )
        if text is not None:
            raise ConfigError(
                "text conditioning needs model.name=unet, or dit with model.dit.text=joint"
            )
        m = cfg.mlp
        for key in ("width", "depth", "emb_dim", "expansion"):
            if getattr(m, key) < 1:
                raise ConfigError(f"model.mlp.{key} must be >= 1, got {getattr(m, key)}")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.mlp.dropout must be in [0, 1), got {m.dropout}")
        # MLPConfig's fields are MLP's keyword arguments, one to one
        mlp = dataclasses.asdict(m) | {"second_time": cfg.second_time, "time_scale": scale}
        return MLP(dim=data_shape[0], num_classes=num_classes, **mlp)
    if len(data_shape) != 3:
        raise ConfigError(
            f"model.name={cfg.name} is for images (C, H, W), the data has shape {data_shape}"
        )
    if cfg.name == "autoencoder":  # AutoencoderConfig's fields are its keyword arguments
        return AutoencoderKL(in_channels=data_shape[0], **dataclasses.asdict(cfg.autoencoder))
    if cfg.name == "dit":
        try:  # DiTConfig's fields are dit_net's keyword arguments; its messages name the field
            d = dataclasses.asdict(cfg.dit) | ({"second_time": True} if cfg.second_time else {})
            d |= {"time_scale": scale}
            return dit_net(data_shape[0], data_shape[1:], num_classes, text, **d)
        except ValueError as e:
            raise ConfigError(f"model.dit.{e}") from None
    # UNetConfig's fields are UNet's keyword arguments, one to one
    kwargs = dataclasses.asdict(cfg.unet) | ({"text_encoder": text} if text is not None else {})
    kwargs |= {"second_time": cfg.second_time, "time_scale": scale}
    return UNet(in_channels=data_shape[0], num_classes=num_classes, **kwargs)


@_checked
def check_image_size(cfg: RunConfig, shape: tuple[int, ...]) -> None:
    """U-Nets halve the image len(channel_mults) - 1 times: refuse sizes that do not divide."""
    if cfg.model.name != "unet":
        return
    downs = len(cfg.model.unet.channel_mults) - 1
    factor = 2**downs
    if shape[1] % factor or shape[2] % factor:
        raise ConfigError(
            f"image size {shape[1]}x{shape[2]} is not divisible by 2^{downs} = {factor}, as a "
            f"U-Net with {downs} downsamplings needs; set data.image_size to a multiple of "
            f"{factor} or use fewer model.unet.channel_mults"
        )


def _flip(cfg: config.DataConfig, default: bool) -> bool:
    if cfg.flip not in ("auto", "on", "off"):
        raise ConfigError(f"data.flip must be auto, on or off, got {cfg.flip!r}")
    return default if cfg.flip == "auto" else cfg.flip == "on"


def _check_channels(d: config.DataConfig, own: int | None) -> None:
    """Refuse a data.channels the data set would ignore: only an image folder converts its
    images to 1 or 3 channels; elsewhere it is 0 (the data set's own, the default) or the data
    set's own count (`own`; None for points, which have no channels)."""
    if d.name != "imagefolder" and d.channels not in (0, own):
        has = "points, no channels" if own is None else f"{own} channel(s) of its own"
        raise ConfigError(
            f"data.channels={d.channels} applies to data.name=imagefolder only; {d.name} has "
            f"{has}: leave data.channels out"
        )


@_checked
def build_data(cfg: RunConfig, seed: int, split: str = "train") -> ToyStream | ImageStream:
    """The training batch stream the config names (2-D toy set or image data set)."""
    d = cfg.data
    if d.pairs:  # reflow: the named data set's (noise, endpoint) pairs from a trained flow
        stream = PairStream(d.pairs, seed)
    elif d.name in TOY2D:
        _check_channels(d, None)
        stream = ToyStream(d.name, seed)
    elif d.name in IMAGE_DATASETS:
        try:
            dataset, info = load_image_dataset(
                d.name, d.root, split, d.download, d.image_size or None, channels=d.channels
            )
        except DatasetMissingError as e:
            raise ConfigError(str(e)) from None
        _check_channels(d, info.shape[0])
        if d.text_conditional:  # captions: from the labels' templates, or beside the images
            dataset, captions = captioned(d.name, dataset, info.class_names, d.root)
        if d.name == "imagefolder":
            dataset.verify()  # a user's folder: find unreadable files now, not mid-training
        stream = ImageStream(dataset, seed, _flip(d, info.flip), workers=d.workers)
        stream.class_names = info.class_names
        stream.captions = captions if d.text_conditional else None
        check_image_size(cfg, stream.shape)
    else:
        raise ConfigError(
            f"unknown dataset {d.name!r}; choose one of {', '.join((*TOY2D, *IMAGE_DATASETS))}"
        )
    if d.text_conditional and d.class_conditional:
        raise ConfigError("choose data.text_conditional or data.class_conditional, not both")
    if d.class_conditional and stream.num_classes < 1:
        raise ConfigError(f"data.class_conditional=true but {d.name} has no class labels")
    return stream


def data_kind(cfg: RunConfig, data) -> DataKind:
    """What the model is trained on: the stream's example shape, and its classes when
    data.class_conditional (0 = unconditional)."""
    classes = data.num_classes if cfg.data.class_conditional else 0
    names = tuple(getattr(data, "class_names", ()) or ())[:classes]
    return DataKind(tuple(data.shape), classes, names)


def family(cfg: RunConfig) -> str:
    """The run's family: its loss's, where a diffusion loss on a flow path (a schedule neither
    variance preserving nor exploding) is a flow."""
    if cfg.train.loss == "autoencoder":
        return "autoencoder"
    if cfg.train.loss in CONSISTENCY_LOSSES:
        return "consistency"
    if cfg.train.loss in FEW_STEP_LOSSES:
        return cfg.train.loss  # meanflow, shortcut
    schedule = build_schedule(cfg.diffusion)
    return "diffusion" if schedule.variance_preserving or schedule.variance_exploding else "flow"


def codec_kind(cfg: RunConfig) -> str:
    """latent when the run diffuses through an autoencoder run (model.codec), else identity."""
    return "latent" if cfg.model.codec else "identity"


def folded_guidance(cfg: RunConfig) -> FoldedGuidance | None:
    """The guidance the run's loss folds into its training target: MeanFlow's omega, kappa
    (config/few_step.py) unless they are 1, 0; None for every other loss."""
    m = cfg.meanflow
    if cfg.train.loss != "meanflow" or (m.omega, m.kappa) == (1.0, 0.0):
        return None
    return FoldedGuidance(m.omega, m.kappa, m.guidance_t_start, m.guidance_t_end)


def run_kind(cfg: RunConfig, data: DataKind) -> RunKind:
    """What the run is (model.RunKind), decided here once from its config and data: a run
    saved by any version is read the same way (data.json holds only the data)."""
    classes = "classes" if data.num_classes else "none"
    condition = "text" if cfg.data.text_conditional else classes
    return RunKind(family(cfg), data, condition, codec_kind(cfg), folded_guidance(cfg))


def build_conditioner(cfg: RunConfig, kind: RunKind):
    """Text, class labels (null label num_classes, train.label_dropout) or none."""
    if kind.text:
        return text_conditioner(cfg.model.text, cfg.train.label_dropout, cfg.data.name)
    if kind.condition == "classes":
        return ClassLabels(kind.num_classes, kind.class_names, cfg.train.label_dropout)
    return Unconditional()


def build_model(cfg: RunConfig, data: DataKind, device: torch.device | str = "cpu") -> Model:
    """The run's model for `data`, on `device` (weights freshly initialised from the global
    torch RNG; a caller that loads a checkpoint loads into model.net)."""
    device = torch.device(device)
    kind = run_kind(cfg, data)
    codec, conditioner = build_codec(cfg, kind, device), build_conditioner(cfg, kind)
    # the network embeds what the conditioner makes (its classes and their null label)
    text = text_encoder(cfg.model.text, conditioner.encoder) if kind.text else None
    net = build_net(cfg.model, codec.latent_shape(kind.shape), conditioner.num_classes, text)
    layout = memory_format(cfg.train.channels_last, kind.shape)
    net = net.to(device).to(memory_format=layout)
    schedule = build_schedule(cfg.diffusion)
    denoiser = build_denoiser(cfg, net, schedule, kind)
    return Model(net, schedule, denoiser, conditioner, codec, kind, device, layout)


def _few_step(cfg: RunConfig, schedule: schedules.Schedule, make):
    """A MeanFlow or shortcut loss: the rectified path and a velocity net (its second time input
    is checked by build_loss, as the loss declares it)."""
    name = cfg.train.loss
    if cfg.diffusion.schedule != "rectified" or cfg.diffusion.prediction != "velocity":
        raise ConfigError(
            f"train.loss={name} trains on the rectified path: set diffusion.schedule=rectified "
            "and diffusion.prediction=velocity (the toy2d-meanflow / toy2d-shortcut presets do)"
        )
    return make(cfg)


FEW_STEP_LOSSES = {  # the run's family is the loss's name; the net reads t2 beside t
    "shortcut": lambda cfg, schedule: _few_step(
        cfg, schedule, lambda c: ShortcutLoss(**dataclasses.asdict(c.shortcut))
    ),
    "meanflow": lambda cfg, schedule: _few_step(
        cfg, schedule, lambda c: MeanFlowLoss(**dataclasses.asdict(c.meanflow))
    ),
}

LOSSES = {
    "diffusion": lambda cfg, schedule: DiffusionLoss(
        build_loss_spec(cfg.diffusion, schedule),
        schedule,
        check_coupling(
            cfg.diffusion.coupling,
            cfg.train.batch_size // cfg.train.grad_accum,
            cfg.data.pairs,
            latent=codec_kind(cfg) == "latent",
        ),
    ),
    **CONSISTENCY_LOSSES,  # ct, ict, ect, cd: the model is then a ConsistencyDenoiser
    **FEW_STEP_LOSSES,  # shortcut, meanflow: the denoiser passes t2 (the step_grid samplers)
    "autoencoder": lambda cfg, schedule: AutoencoderLoss(
        cfg.train.autoencoder,
        lambda channels: PatchDiscriminator(
            channels, cfg.train.autoencoder.disc_width, cfg.train.autoencoder.disc_layers
        ),
    ),
}


@_checked
def build_loss(cfg: RunConfig, schedule: schedules.Schedule):
    """The loss object train.loss names (losses.py)."""
    if cfg.train.loss not in LOSSES:
        raise ConfigError(
            f"unknown train.loss {cfg.train.loss!r}; choose one of {', '.join(LOSSES)}"
        )
    if (cfg.train.loss == "autoencoder") != (cfg.model.name == "autoencoder"):
        raise ConfigError(
            f"train.loss={cfg.train.loss} cannot train model.name={cfg.model.name}: an "
            "autoencoder trains with train.loss=autoencoder (the *-ae presets), and only it does"
        )
    if cfg.train.loss == "autoencoder" and (cfg.train.sample_every or cfg.train.eval_every):
        raise ConfigError(
            "an autoencoder run draws no samples: set train.sample_every=0 and "
            "train.eval_every=0 (its reconstructions are measured when it ends)"
        )
    loss = LOSSES[cfg.train.loss](cfg, schedule)
    if loss.second_time and not cfg.model.second_time:  # declared by the loss (loss_base.py)
        raise ConfigError(
            f"train.loss={cfg.train.loss} needs a network with a second time input: set "
            "model.second_time=true (the toy2d-meanflow and toy2d-shortcut presets do)"
        )
    return loss


@_checked
def build_denoiser(
    cfg: RunConfig, net: nn.Module, schedule: schedules.Schedule, kind: RunKind
) -> Denoiser:
    if cfg.diffusion.clip_x0 < 0:
        raise ConfigError(f"diffusion.clip_x0 must be >= 0 (0 = off), got {cfg.diffusion.clip_x0}")
    d = cfg.diffusion
    grid = {"shortcut": f"shortcut:{cfg.shortcut.max_steps}", "meanflow": "meanflow"}
    step_grid = grid.get(kind.family, "")
    denoiser = Denoiser(net, schedule, d.prediction, d.clip_x0 or None, d.sigma_data, step_grid)
    return ConsistencyDenoiser(denoiser) if kind.consistency else denoiser


@_checked
def build_sampler(cfg: config.SampleConfig, schedule: schedules.Schedule):
    """(sampler function, options dict, time grid) for a sample config."""
    info = sampler_info(cfg.sampler)
    return (
        info.fn,
        info.options_from(cfg),
        timesteps(schedule, cfg.steps, cfg.spacing, cfg.t_end or None, cfg.shift),
    )
