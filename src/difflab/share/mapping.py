"""difflab's U-Net and schedule as diffusers' UNet2DModel and scheduler configs, and back.

The mapping is block for block: difflab's DDPM-style U-Net and UNet2DModel have the same
ResBlocks (GroupNorm, SiLU, 3x3 convs, a time projection, a 1x1 skip when channels change), the
same attention parameters (diffusers' separate to_q/to_k/to_v/to_out Linears hold exactly the
weights of our 1x1 qkv and proj convs), strided-conv downsampling, nearest upsampling followed
by a 3x3 conv, and the same [cos, sin] time embedding. diffusers lists up blocks from the lowest
resolution. A class-conditional net adds an embedding of the label (num_classes + 1 rows, the
last the null label) to the time embedding, as UNet2DModel's `class_embedding` does with
`class_embed_type=None`.

One difference is not in the layout: difflab feeds step i = 1..T as t = i / T and embeds
t * 1000, while diffusers calls the net with timestep i - 1. For T = 1000 the two sinusoids
differ by one step, a fixed rotation of each (cos, sin) pair, which `keys.py` folds into the
first time-embedding Linear; other T have no exact equivalent and are refused.
"""

from __future__ import annotations

from difflab.config import DiffusionConfig, ModelConfig
from difflab.errors import ConfigError

PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
EMBEDDED_STEPS = 1000  # difflab embeds t * 1000: the table length diffusers' timesteps match


class NoEquivalent(ConfigError):
    """diffusers has no counterpart to this configuration (the message says why)."""


def head_count(model: ModelConfig) -> int:
    """The attention heads of every block, or NoEquivalent when diffusers' single head width
    cannot give difflab's head count in every attention block."""
    u = model.unet
    channels = [u.base_channels * m for m in u.channel_mults]
    attended = {channels[i] for i in u.attention_levels}
    attended |= {channels[-1]} if u.mid_attention else set()
    if u.num_heads > 1 and len(attended) > 1:
        raise NoEquivalent(
            f"UNet2DModel has one attention head width; difflab's num_heads={u.num_heads} over "
            f"attention blocks of {sorted(attended)} channels needs several"
        )
    return u.num_heads


def unet2d_config(model: ModelConfig, shape: tuple[int, ...], classes: int) -> dict:
    """UNet2DModel's arguments for difflab's U-Net `model` on images of `shape` (C, H, W).

    Raises NoEquivalent where UNet2DModel cannot be laid out the same way.
    """
    if model.name != "unet":
        raise NoEquivalent(f"difflab's {model.name} network has no diffusers counterpart")
    u = model.unet
    missing = [
        (u.downsample != "conv", f"downsample={u.downsample}"),
        (u.upsample != "nearest", f"upsample={u.upsample}"),
        (u.weight_standardization, "weight standardization"),
        (u.bottleneck_blocks != 2, f"bottleneck_blocks={u.bottleneck_blocks}"),
    ]
    for absent, what in missing:
        if absent:
            raise NoEquivalent(f"UNet2DModel has no {what}")
    channels = tuple(u.base_channels * m for m in u.channel_mults)
    levels = range(len(channels))
    attended = [channels[i] for i in u.attention_levels]
    attended += [channels[-1]] if u.mid_attention else []
    # diffusers takes one head width for every block; None = one head per block, any width
    head_dim = None if u.num_heads == 1 else min(attended) // u.num_heads
    return dict(
        sample_size=shape[1],
        in_channels=shape[0],
        out_channels=shape[0],
        block_out_channels=channels,
        layers_per_block=u.num_res_blocks,
        down_block_types=tuple(
            "AttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in levels
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in u.attention_levels else "UpBlock2D" for i in reversed(levels)
        ),
        dropout=u.dropout,
        norm_num_groups=u.norm_groups,
        attention_head_dim=head_dim,
        add_attention=u.mid_attention,
        flip_sin_to_cos=True,
        freq_shift=0,  # [cos, sin] of t * 1000 * 10000^(-i / half), as ours
        num_class_embeds=classes + 1 if classes else None,  # with our null label
    )


def scheduler_config(d: DiffusionConfig) -> dict:
    """diffusers' scheduler arguments for difflab's discrete schedule and prediction."""
    if d.schedule not in BETA_SCHEDULES or d.num_steps < 1:
        raise NoEquivalent(f"no diffusers scheduler for the {d.schedule} schedule in this form")
    if d.prediction not in PREDICTIONS:
        raise NoEquivalent(f"no diffusers prediction type for {d.prediction!r}")
    return dict(
        num_train_timesteps=d.num_steps,
        beta_schedule=BETA_SCHEDULES[d.schedule],
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=PREDICTIONS[d.prediction],
    )


def check_kind(kind) -> None:
    """NoEquivalent for a kind of run (model.RunKind) that DDPMPipeline cannot sample as it was
    trained: only a diffusion run in pixel space, unconditional or on class labels, can be."""
    if kind.family != "diffusion":
        raise NoEquivalent(f"a {kind.family} run has no DDPMPipeline equivalent")
    if kind.latent:
        raise NoEquivalent("a latent run decodes through its autoencoder, which DDPMPipeline lacks")
    if kind.text:
        raise NoEquivalent("text conditioning has no UNet2DModel equivalent")


def check_exportable(model: ModelConfig, d: DiffusionConfig) -> None:
    """NoEquivalent naming the part of a run diffusers' pipelines cannot reproduce exactly."""
    if model.name == "unet":
        head_count(model)
    if model.codec:
        raise NoEquivalent(
            f"latent diffusion (model.codec={model.codec}): the folder would need the "
            "autoencoder as a diffusers VAE"
        )
    if d.prediction == "edm":
        raise NoEquivalent("EDM preconditioning (prediction=edm) has no UNet2DModel equivalent")
    if d.num_steps == 0:
        raise NoEquivalent(
            f"the continuous-time {d.schedule} schedule has no diffusers table scheduler "
            "(DDPMScheduler/DDIMScheduler need diffusion.num_steps > 0)"
        )
    if d.schedule in ("ve", "edm"):
        raise NoEquivalent(f"the variance-exploding {d.schedule} schedule has no DDPM table")
    if model.time_scale != EMBEDDED_STEPS:
        raise NoEquivalent(
            f"model.time_scale={model.time_scale:g}: diffusers embeds the integer timestep, "
            f"which is difflab's t * {EMBEDDED_STEPS} only at the default time_scale"
        )
    if d.num_steps != EMBEDDED_STEPS:
        raise NoEquivalent(
            f"diffusion.num_steps={d.num_steps}: difflab embeds t * 1000 and diffusers the "
            f"integer timestep, which agree only for a {EMBEDDED_STEPS}-step table"
        )
    if d.prediction not in PREDICTIONS:
        raise NoEquivalent(f"no diffusers prediction type for {d.prediction!r}")
