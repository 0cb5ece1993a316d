"""diffusers' UNet2DModel configured as difflab's U-Net, trained and sampled the diffusers way.

The mapping (`unet2d_config`) is block for block: difflab's DDPM-style U-Net and UNet2DModel
have the same ResBlocks (GroupNorm, SiLU, 3x3 convs, a time projection, a 1x1 skip when channels
change), the same attention parameters (diffusers' separate to_q/to_k/to_v/to_out Linears hold
exactly the weights of our 1x1 qkv and proj convs), strided-conv downsampling, nearest
upsampling followed by a 3x3 conv, and the same [cos, sin] time embedding of t * 1000. diffusers
lists up blocks from the lowest resolution. With difflab's weights copied into the cifar10
mapping, diffusers' output matched ours to 1.4e-5 (output scale 4.7; checked once by hand,
2026-11-22); parameter counts are checked on every run.

Training step: noise = randn, integer timesteps ~ U{0..T-1}, DDPMScheduler.add_noise, the
UNet2DModel forward, MSE against eps (or v via get_velocity for v-prediction presets), as in
diffusers' train_unconditional example. Sampling: the scheduler loop (set_timesteps,
scale_model_input, model, step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from difflab import devices
from difflab.benchmark.options import Setup
from difflab.benchmark.sides import Counted, Side, sample_labels, synthetic_batch
from difflab.config import DiffusionConfig, ModelConfig
from difflab.samplers import steps_for_nfe

# difflab sampler -> (diffusers scheduler class, its extra arguments)
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


class NoEquivalent(ValueError):
    """diffusers has no counterpart to this configuration (the message says why)."""


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
        sample_size=shape[1], in_channels=shape[0], out_channels=shape[0],
        block_out_channels=channels, layers_per_block=u.num_res_blocks,
        down_block_types=tuple(
            "AttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in levels
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in u.attention_levels else "UpBlock2D" for i in reversed(levels)
        ),
        dropout=u.dropout, norm_num_groups=u.norm_groups, attention_head_dim=head_dim,
        add_attention=u.mid_attention,
        flip_sin_to_cos=True, freq_shift=0,  # [cos, sin] of t * 1000 * 10000^(-i / half), as ours
        num_class_embeds=classes + 1 if classes else None,  # with our null label
    )  # fmt: skip


def scheduler_config(d: DiffusionConfig) -> dict:
    """diffusers' scheduler arguments for difflab's discrete schedule and prediction."""
    if d.schedule not in BETA_SCHEDULES or d.num_steps < 1:
        raise NoEquivalent(f"no diffusers scheduler for the {d.schedule} schedule in this form")
    if d.prediction not in PREDICTIONS:
        raise NoEquivalent(f"no diffusers prediction type for {d.prediction!r}")
    return dict(
        num_train_timesteps=d.num_steps, beta_schedule=BETA_SCHEDULES[d.schedule],
        beta_start=d.beta_start, beta_end=d.beta_end, prediction_type=PREDICTIONS[d.prediction],
    )  # fmt: skip


def _clip_arguments(scheduler: str, clip: float) -> dict:
    """The x0 clipping difflab's denoiser does (clip_x0), where the scheduler has it."""
    if scheduler in ("DDPMScheduler", "DDIMScheduler"):
        return {"clip_sample": clip > 0, "clip_sample_range": clip or 1.0}
    if clip > 0 and scheduler in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        # thresholding at ratio 1 with max `clip` is the same clamp
        return {"thresholding": True, "dynamic_thresholding_ratio": 1.0, "sample_max_value": clip}
    return {}


def diffusers_side(setup: Setup, diffusers) -> Side:
    """UNet2DModel for the configuration (raises NoEquivalent where there is none)."""
    cfg, device, n = setup.cfg, setup.device, setup.sample_batch
    config = unet2d_config(cfg.model, setup.shape, setup.classes)
    sched_config = scheduler_config(cfg.diffusion)
    torch.manual_seed(setup.opts.seed)
    unet = diffusers.UNet2DModel(**config).to(device)
    if setup.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = devices.adamw(unet, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    noise_scheduler = diffusers.DDPMScheduler(**sched_config)
    x0, y = synthetic_batch(setup, setup.batch_size, setup.opts.seed + 2)
    labels = sample_labels(setup)
    labels = labels.to(device) if labels is not None else None
    T, v_target = sched_config["num_train_timesteps"], cfg.diffusion.prediction == "v"
    side: Side

    def loss(run: Callable) -> Tensor:
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, T, (x0.shape[0],), device=device)
        x_t = noise_scheduler.add_noise(x0, noise, timesteps)
        with setup.autocast():
            pred = run(x_t, timesteps, class_labels=y).sample
        target = noise_scheduler.get_velocity(x0, noise, timesteps) if v_target else noise
        return F.mse_loss(pred.float(), target.float())

    def sample(sampler: str, nfe: int) -> int:
        name, extra = SCHEDULERS[sampler]
        clip = _clip_arguments(name, cfg.diffusion.clip_x0)
        scheduler = getattr(diffusers, name)(**sched_config, **extra, **clip)
        scheduler.set_timesteps(steps_for_nfe(sampler, nfe), device=device)
        gen = torch.Generator(device).manual_seed(setup.opts.seed)
        x = torch.randn((n, *setup.shape), generator=gen, device=device)
        x = x * scheduler.init_noise_sigma
        counted = Counted(side.run_net)
        for timestep in scheduler.timesteps:
            out = counted(scheduler.scale_model_input(x, timestep), timestep, class_labels=labels)
            x = scheduler.step(out.sample, timestep, x).prev_sample
        x.float().cpu()  # as difflab's generate hands back
        return counted.calls

    names = {s: f"diffusers {name}" for s, (name, _) in SCHEDULERS.items()}
    side = Side("diffusers", f"diffusers {diffusers.__version__}", unet, loss, optimizer, sample,
                names)  # fmt: skip
    side.info["objective"] = f"DDPMScheduler.add_noise, {sched_config['prediction_type']} MSE"
    side.info["unet2d_config"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if v is not None
    }
    return side
