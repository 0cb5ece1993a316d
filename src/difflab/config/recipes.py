"""The base presets: the diffusion recipes (toy2d, mnist, fashion, cifar10, celeba64,
imagefolder) and their rectified-flow versions; presets.py builds the other families on
them and holds the registry."""

from __future__ import annotations

import dataclasses

from difflab.config import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    UNetConfig,
)


def toy2d() -> RunConfig:
    """The 2-D checkerboard: a residual MLP with Fourier features, ~4 minutes on 2 CPU cores."""
    return RunConfig(preset="toy2d")


def _image_sampling(n: int, guidance: float = 1.0) -> SampleConfig:
    # Ancestral DDPM at 50 quadratic steps: on the 30-minute MNIST model it reaches judge-feature
    # FD 7.3 where DDIM-50 gives 16.0 (same guidance 1.0, bench/RESULTS.md).
    return SampleConfig(
        sampler="ddpm", steps=50, spacing="quadratic", n=n, batch_size=100, guidance=guidance
    )


def mnist() -> RunConfig:
    """Class-conditional MNIST at 32x32 (zero-padded), a small U-Net sized for a CPU budget."""
    return RunConfig(
        preset="mnist",
        data=DataConfig(name="mnist", class_conditional=True),
        model=ModelConfig(
            name="unet",
            unet=UNetConfig(
                base_channels=32,
                channel_mults=(1, 2, 2),
                num_res_blocks=1,
                attention_levels=(2,),
                num_heads=4,
                dropout=0.0,
                norm_groups=8,
            ),
        ),
        diffusion=DiffusionConfig(prediction="v", clip_x0=1.0),
        # 2600 fp32 steps took 20 min 52 s on 2 CPU cores (issue 6). bf16 where the CPU has bf16
        # units (issue 18: 2-2.5x the fp32 step with the bf16 GroupNorm and attention paths),
        # 2000 steps and a cosine decay: half that wall time (bench/mnist_time.py)
        train=TrainConfig(
            steps=2000,
            batch_size=64,
            lr=1e-3,
            lr_schedule="cosine",
            precision="auto",
            warmup_steps=100,
            ema_decay=0.999,
            log_every=50,
            checkpoint_every=500,
            label_dropout=0.1,
            time_limit_minutes=30.0,
        ),
        sample=_image_sampling(100, guidance=1.25),  # judge accuracy 0.990, FD 7.4 (RESULTS.md)
    )


def fashion() -> RunConfig:
    """Class-conditional Fashion-MNIST at 32x32: the mnist recipe on a harder set."""
    cfg = mnist()
    return dataclasses.replace(
        cfg, preset="fashion", data=dataclasses.replace(cfg.data, name="fashion")
    )


def cifar10() -> RunConfig:
    """Unconditional CIFAR-10 as in DDPM (Ho et al. 2020, App. B): the 35.7M U-Net, eps
    prediction, linear schedule, lr 2e-4 with 5000 warm-up steps, batch 128, EMA 0.9999,
    dropout 0.1, random flips, 800k steps."""
    return RunConfig(
        preset="cifar10",
        data=DataConfig(name="cifar10"),
        model=ModelConfig(
            name="unet",
            unet=UNetConfig(
                base_channels=128, channel_mults=(1, 2, 2, 2), attention_levels=(1,), dropout=0.1
            ),
        ),
        diffusion=DiffusionConfig(prediction="eps", t_sampling="uniform", clip_x0=1.0),
        train=TrainConfig(
            steps=800_000,
            batch_size=128,
            lr=2e-4,
            lr_schedule="constant",
            warmup_steps=5000,
            ema_decay=0.9999,
            log_every=100,
            checkpoint_every=10_000,
        ),
        sample=_image_sampling(64),
    )


def celeba64() -> RunConfig:
    """Unconditional CelebA 64x64: the DDPM U-Net with one more level (attention at 16x16)."""
    cfg = cifar10()
    unet = dataclasses.replace(cfg.model.unet, channel_mults=(1, 2, 2, 4), attention_levels=(2,))
    return dataclasses.replace(
        cfg,
        preset="celeba64",
        data=DataConfig(name="celeba64"),
        model=dataclasses.replace(cfg.model, unet=unet),
        train=dataclasses.replace(cfg.train, steps=500_000),
    )


def imagefolder() -> RunConfig:
    """Any folder of images (sub-folders = classes): the celeba64 recipe at 64x64 from
    data.root; set data.class_conditional=true to use the sub-folder classes."""
    cfg = celeba64()
    data = DataConfig(name="imagefolder", root="images", image_size=64, channels=3)
    return dataclasses.replace(cfg, preset="imagefolder", data=data)


def toy2d_flow() -> RunConfig:
    """The toy2d preset's network, data and budget as a rectified flow (Liu et al. 2023): the
    path alpha = 1 - t, sigma = t, velocity prediction, the plain flow-matching loss."""
    return RunConfig(
        preset="toy2d-flow",
        diffusion=DiffusionConfig(
            schedule="rectified", num_steps=0, prediction="velocity", t_sampling="stratified"
        ),
        # best at 10 model evaluations in bench/flow.py (2,000 steps, loaded machine): DPM-Solver++
        # (2M) on the uniform grid, sliced W2 0.020 (UniPC 0.022, Heun-5 0.043, Euler 0.064)
        sample=SampleConfig(sampler="dpmpp_2m", steps=10, spacing="uniform"),
    )


def mnist_flow() -> RunConfig:
    """The mnist preset's U-Net, data, budget and guidance as a class-conditional rectified flow
    with SD3's logit-normal time sampling (Esser et al. 2024, Sec. 3.1)."""
    cfg = mnist()
    return dataclasses.replace(
        cfg,
        preset="mnist-flow",
        diffusion=DiffusionConfig(
            schedule="rectified",
            num_steps=0,
            prediction="velocity",
            t_sampling="logit_normal",
            clip_x0=1.0,
        ),
        # the checkerboard flow's best at 10 evaluations; not yet measured on MNIST
        sample=dataclasses.replace(cfg.sample, sampler="dpmpp_2m", steps=10, spacing="uniform"),
    )
