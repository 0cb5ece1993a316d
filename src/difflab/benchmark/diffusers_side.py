"""diffusers' UNet2DModel configured as difflab's U-Net (or its DiTTransformer2DModel as
difflab's DiT), trained and sampled the diffusers way.

The mappings (`share.mapping.unet2d_config`, `share.dit_keys.transformer_config`, shared with
`difflab export`) are block for block (see those modules; tests/test_dit.py checks the DiT's to
1e-5). With difflab's weights copied into the cifar10 mapping, diffusers' output
matched ours to 1.4e-5 (output scale 4.7; checked once by hand, 2026-11-22); parameter counts
are checked on every run.

Training step: noise = randn, integer timesteps ~ U{0..T-1}, DDPMScheduler.add_noise, the
UNet2DModel forward, MSE against eps (or v via get_velocity for v-prediction presets), as in
diffusers' train_unconditional example. Sampling: the scheduler loop (set_timesteps,
scale_model_input, model, step). The DiT is called as DiTPipeline does: timesteps expanded to
the batch, and always with class labels (label 0, a zero row, for an unconditional one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from difflab import devices
from difflab.benchmark.options import Setup
from difflab.benchmark.sides import Counted, Side, sample_labels, synthetic_batch
from difflab.samplers import steps_for_nfe
from difflab.share.dit_keys import transformer_config
from difflab.share.mapping import scheduler_config, unet2d_config

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


def _clip_arguments(scheduler: str, clip: float) -> dict:
    """The x0 clipping difflab's denoiser does (clip_x0), where the scheduler has it."""
    if scheduler in ("DDPMScheduler", "DDIMScheduler"):
        return {"clip_sample": clip > 0, "clip_sample_range": clip or 1.0}
    if clip > 0 and scheduler in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        # thresholding at ratio 1 with max `clip` is the same clamp
        return {"thresholding": True, "dynamic_thresholding_ratio": 1.0, "sample_max_value": clip}
    return {}


def _network(setup: Setup, diffusers) -> tuple[str, dict, torch.nn.Module]:
    """(class name, arguments, module) of diffusers' network for the configuration."""
    cfg = setup.cfg
    if cfg.model.name == "dit":
        config = transformer_config(cfg.model, setup.shape, setup.classes)
        return "DiTTransformer2DModel", config, diffusers.DiTTransformer2DModel(**config)
    config = unet2d_config(cfg.model, setup.shape, setup.classes)
    return "UNet2DModel", config, diffusers.UNet2DModel(**config)


def _dit_call(net: Callable) -> Callable:
    """net called as DiTPipeline does: a timestep per example, and labels always."""

    def call(x: Tensor, timestep: Tensor, class_labels: Tensor | None = None):
        timestep = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        if class_labels is None:  # unconditional: label 0, the zero row (share/dit_keys.py)
            class_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return net(x, timestep=timestep, class_labels=class_labels)

    return call


def diffusers_side(setup: Setup, diffusers) -> Side:
    """UNet2DModel or DiTTransformer2DModel for the configuration (raises NoEquivalent where
    there is none)."""
    cfg, device, n = setup.cfg, setup.device, setup.sample_batch
    sched_config = scheduler_config(cfg.diffusion)
    torch.manual_seed(setup.opts.seed)
    net_class, config, unet = _network(setup, diffusers)
    unet = unet.to(device)
    dit = net_class == "DiTTransformer2DModel"
    call = _dit_call if dit else (lambda net: net)
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
            pred = call(run)(x_t, timesteps, class_labels=y).sample
        target = noise_scheduler.get_velocity(x0, noise, timesteps) if v_target else noise
        return F.mse_loss(pred.float(), target.float())

    def sample(sampler: str, nfe: int) -> int:
        name, extra = SCHEDULERS[sampler]
        clip = _clip_arguments(name, cfg.diffusion.clip_x0)
        scheduler = getattr(diffusers, name)(**sched_config, **extra, **clip)
        scheduler.set_timesteps(steps_for_nfe(sampler, nfe, cfg.sample), device=device)
        gen = torch.Generator(device).manual_seed(setup.opts.seed)
        x = torch.randn((n, *setup.shape), generator=gen, device=device)
        x = x * scheduler.init_noise_sigma
        counted = Counted(call(side.run_net))
        for timestep in scheduler.timesteps:
            out = counted(scheduler.scale_model_input(x, timestep), timestep, class_labels=labels)
            x = scheduler.step(out.sample, timestep, x).prev_sample
        x.float().cpu()  # as difflab's generate hands back
        return counted.calls

    names = {s: f"diffusers {name}" for s, (name, _) in SCHEDULERS.items()}
    side = Side(
        "diffusers", f"diffusers {diffusers.__version__}", unet, loss, optimizer, sample, names
    )
    side.info["objective"] = f"DDPMScheduler.add_noise, {sched_config['prediction_type']} MSE"
    side.info["dit_config" if dit else "unet2d_config"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if v is not None
    }
    return side
