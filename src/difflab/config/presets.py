"""Presets: small functions that return a RunConfig (`--preset NAME`); configs/*.json are these
same presets as files users can copy (a test keeps them equal)."""

from __future__ import annotations

import dataclasses

from difflab.config import (
    AutoencoderConfig,
    AutoencoderLossConfig,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    DiTConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TextConfig,
    TrainConfig,
    UNetConfig,
)
from difflab.config.consistency import ConsistencyConfig
from difflab.config.few_step import MeanFlowConfig, ShortcutConfig
from difflab.config.recipes import (
    celeba64,
    cifar10,
    fashion,
    imagefolder,
    mnist,
    mnist_flow,
    toy2d,
    toy2d_flow,
)


def _consistency_sampling(n: int, batch_size: int, t_end: float, guidance: float = 1.0):
    # Two steps, the second from the noise level at t_end (karras: steps > 2 spread between).
    return SampleConfig(
        sampler="consistency",
        steps=2,
        spacing="karras",
        t_end=t_end,
        n=n,
        batch_size=batch_size,
        guidance=guidance,
    )


def toy2d_ct() -> RunConfig:
    """iCT from scratch on the checkerboard (Song & Dhariwal 2023): EDM's sigma in [0.002, 80],
    EDM preconditioning inside the consistency parameterisation, the doubling N(k) 10 -> 1280."""
    return RunConfig(
        preset="toy2d-ct",
        diffusion=DiffusionConfig(schedule="edm", num_steps=0, prediction="edm", sigma_data=1.0),
        train=TrainConfig(
            loss="ict",
            steps=5000,
            lr=1e-3,
            lr_schedule="constant",
            warmup_steps=100,
            log_every=50,
            checkpoint_every=1000,
        ),
        sample=_consistency_sampling(20000, 20000, t_end=0.8),
        consistency=ConsistencyConfig(s0=10, s1=1280),
    )


def _tuned(base: RunConfig, name: str, loss: str, teacher: str, train: dict, **consistency):
    """A consistency recipe that starts from the trained `base`-preset run at `teacher`."""
    return dataclasses.replace(
        base,
        preset=name,
        train=dataclasses.replace(base.train, loss=loss, **train),
        consistency=ConsistencyConfig(teacher=teacher, **consistency),
    )


def _toy2d_student(name: str, loss: str, steps: int, **consistency) -> RunConfig:
    """A consistency student of the trained toy2d run at runs/toy2d, sampled in two steps.

    lr 1e-3 decayed to 0 (cosine) and a short EMA (0.99): the teacher's EMA rate 0.999 over a
    few thousand steps of tuning still holds much of the start. The second step starts from
    noise level 0.3 (t = 0.0886 on the linear table), the best of 0.3, 0.5, 0.81 and 1.0 for
    ECT (bench/RESULTS.md). Precision auto: bf16 where the CPU has it, the same samples in
    fewer seconds (bench/RESULTS.md)."""
    cfg = _tuned(
        toy2d(),
        name,
        loss,
        "runs/toy2d",
        dict(
            steps=steps,
            lr=1e-3,
            lr_schedule="cosine",
            warmup_steps=0,
            ema_decay=0.99,
            log_every=50,
            checkpoint_every=1000,
            precision="auto",
        ),
        **consistency,
    )
    return dataclasses.replace(cfg, sample=_consistency_sampling(20000, 20000, t_end=0.0886))


def toy2d_ect() -> RunConfig:
    """ECT (Geng et al. 2024) of a trained toy2d run (consistency.teacher=runs/toy2d)."""
    return _toy2d_student("toy2d-ect", "ect", 4000)


def toy2d_cd() -> RunConfig:
    """CD (Song et al. 2023) of a trained toy2d run: 10 levels jittered (consistency.levels), 3
    Heun sub-steps of the teacher between two (batched: six teacher calls a step), iCT's weighting
    1 / (sigma_hi - sigma_lo) (consistency.weighting), 1,800 steps; fewer, accurate levels trained
    everywhere beat 18 grid levels of one Heun step each, and the weighting lifts one-step samples
    from 0.79 to 0.89 in-square (bench/RESULTS.md)."""
    return _toy2d_student(
        "toy2d-cd",
        "cd",
        1800,
        num_levels=10,
        solver_substeps=3,
        levels="jitter",
        weighting="inverse_gap",
    )


# The mnist preset's precision is auto (bf16 on bf16 hardware). mnist-cd keeps fp32: a consistency
# loss compares f at two neighbouring levels of one trajectory, and near convergence their
# difference can fall below bf16's resolution of the network's output (8 significant bits); it
# has not been measured in bf16. mnist-ect has (bench/RESULTS.md): in its 10 minutes bf16 runs 780
# steps against fp32's 600 and its two-step samples are better, not worse.
_CONSISTENCY_PRECISION = "fp32"


def mnist_ect() -> RunConfig:
    """ECT of a trained mnist run (consistency.teacher=runs/mnist) in 10 CPU minutes: precision
    auto (bf16 where the CPU has it: 780 steps fit), lr 5e-5 (3e-4 and 1e-4 gave worse two-step
    samples in the same time), the second step from noise level 1.4 (t_end 0.325 on the linear
    table; 1.0, 1.4, 2.0 and the old 0.72 compared on the training split, bench/RESULTS.md)."""
    cfg = _tuned(
        mnist(),
        "mnist-ect",
        "ect",
        "runs/mnist",
        dict(
            steps=780,
            lr=5e-5,
            lr_schedule="constant",
            warmup_steps=0,
            log_every=25,
            checkpoint_every=200,
            time_limit_minutes=10.0,
            precision="auto",
        ),
    )
    return dataclasses.replace(cfg, sample=_consistency_sampling(100, 100, t_end=0.3252))


def mnist_cd() -> RunConfig:
    """CD of a trained mnist run, its guided teacher (scale 1.25, the mnist preset's) distilled
    so the student samples with one undoubled batch (guidance 1), in fp32 (as mnist-ect)."""
    cfg = _tuned(
        mnist(),
        "mnist-cd",
        "cd",
        "runs/mnist",
        dict(
            steps=400,
            lr=1e-4,
            lr_schedule="constant",
            warmup_steps=0,
            log_every=25,
            checkpoint_every=200,
            time_limit_minutes=10.0,
            precision=_CONSISTENCY_PRECISION,
        ),
        teacher_guidance=1.25,
    )
    return dataclasses.replace(cfg, sample=_consistency_sampling(100, 100, t_end=0.2))


def mnist_ct() -> RunConfig:
    """iCT from scratch on MNIST (Song & Dhariwal 2023), no teacher, in 30 CPU minutes: the
    mnist preset's U-Net, labels and clipping to [-1, 1] on EDM's sigma in [0.002, 80] with
    sigma_data 0.5; 1,400 steps (1.07 s each on 2 AMD EPYC cores, fp32 as mnist-cd), the
    doubling N(k) from 10 to 320 levels (a short run spends too few steps at 1280 to learn
    them), lr 2e-4 constant after a 100-step warm-up; two steps, the second from sigma 0.8
    (iCT's CIFAR-10 two-step point, 0.821)."""
    base = mnist()
    return dataclasses.replace(
        base,
        preset="mnist-ct",
        diffusion=dataclasses.replace(
            base.diffusion, schedule="edm", num_steps=0, prediction="edm", sigma_data=0.5
        ),
        train=dataclasses.replace(
            base.train,
            loss="ict",
            steps=1400,
            lr=2e-4,
            lr_schedule="constant",
            warmup_steps=100,
            log_every=25,
            checkpoint_every=200,
            precision=_CONSISTENCY_PRECISION,
        ),
        sample=_consistency_sampling(100, 100, t_end=0.8),
        consistency=ConsistencyConfig(s0=10, s1=320),
    )


def mnist_ae() -> RunConfig:
    """The first stage of latent diffusion on MNIST (Rombach et al. 2022): a KL autoencoder
    with f = 4 and c = 4 (32x32x1 -> 8x8x4), L1 + 1e-6 KL, sized for 10 CPU minutes."""
    return _autoencoder("mnist-ae", "mnist", AutoencoderConfig())


def fashion_ae() -> RunConfig:
    """mnist-ae's recipe on Fashion-MNIST (f = 4, c = 4 at 32x32)."""
    return _autoencoder("fashion-ae", "fashion", AutoencoderConfig())


def cifar10_ae() -> RunConfig:
    """CIFAR-10 at f = 4, c = 4 (32x32x3 -> 8x8x4), wider, with LDM's patch discriminator from
    step 5000 (its recipe starts the GAN once reconstructions are good)."""
    cfg = _autoencoder("cifar10-ae", "cifar10", AutoencoderConfig(base_channels=64))
    loss = AutoencoderLossConfig(discriminator=True, disc_start=5000, disc_layers=2)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=40_000, autoencoder=loss)
    )


def celeba_ae() -> RunConfig:
    """CelebA 64x64 at f = 8, c = 4 (64x64x3 -> 8x8x4), with the patch discriminator."""
    ae = AutoencoderConfig(base_channels=64, channel_mults=(1, 2, 2, 4))
    cfg = _autoencoder("celeba-ae", "celeba64", ae)
    loss = AutoencoderLossConfig(discriminator=True, disc_start=10_000, disc_layers=3)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=100_000, autoencoder=loss)
    )


def _autoencoder(name: str, data: str, ae: AutoencoderConfig) -> RunConfig:
    return RunConfig(
        preset=name,
        data=DataConfig(name=data),
        model=ModelConfig(name="autoencoder", autoencoder=ae),
        train=TrainConfig(
            loss="autoencoder",
            steps=1200,
            batch_size=64,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.999,
            log_every=50,
            checkpoint_every=400,
            time_limit_minutes=10.0,
        ),
    )


def mnist_latent() -> RunConfig:
    """Class-conditional latent diffusion on mnist-ae's 8x8x4 latents (set model.codec to the
    autoencoder run): a U-Net 8 -> 4 pixels, 16x fewer pixels per convolution than mnist's."""
    cfg = mnist()
    unet = UNetConfig(
        base_channels=64,
        channel_mults=(1, 2),
        num_res_blocks=2,
        attention_levels=(1,),
        num_heads=4,
        dropout=0.0,
        norm_groups=8,
    )
    return dataclasses.replace(
        cfg,
        preset="mnist-latent",
        model=ModelConfig(name="unet", unet=unet, codec="runs/mnist-ae", codec_cache=True),
        diffusion=DiffusionConfig(prediction="v", clip_x0=0.0),  # latents are not in [-1, 1]
        train=dataclasses.replace(cfg.train, steps=3000, time_limit_minutes=10.0),
    )


def fashion_latent() -> RunConfig:
    """mnist-latent on Fashion-MNIST, through fashion-ae."""
    cfg = mnist_latent()
    return dataclasses.replace(
        cfg,
        preset="fashion-latent",
        data=dataclasses.replace(cfg.data, name="fashion"),
        model=dataclasses.replace(cfg.model, codec="runs/fashion-ae"),
    )


def mnist_text() -> RunConfig:
    """MNIST from sentences ("a handwritten seven"): the mnist U-Net with cross-attention at
    8x8 and in the middle to the frozen all-MiniLM-L6-v2's token states (difflab[text]);
    --set model.text.encoder=char trains the built-in encoder with it instead."""
    cfg = mnist()
    unet = dataclasses.replace(cfg.model.unet, cross_attention_levels=(2,))
    return dataclasses.replace(
        cfg,
        preset="mnist-text",
        data=DataConfig(name="mnist", text_conditional=True),
        model=dataclasses.replace(cfg.model, unet=unet, text=TextConfig(encoder="minilm")),
    )  # sampling: mnist's, guidance 1.25: held-out accuracy 0.969 at FD 0.95x mnist's, where 1.5
    # gives 0.990 at 1.58x (bench/RESULTS.md, 2026-12-03)


def fashion_text() -> RunConfig:
    """Fashion-MNIST from sentences ("an ankle boot", "a photo of a sneaker"): mnist-text's
    recipe, sampled at guidance 1.5: on the same run it beats 1.25 in held-out accuracy (0.893
    against 0.866) and FD (29.8 against 36.6; bench/RESULTS.md, 2026-12-03)."""
    cfg = mnist_text()
    return dataclasses.replace(
        cfg,
        preset="fashion-text",
        data=dataclasses.replace(cfg.data, name="fashion"),
        sample=dataclasses.replace(cfg.sample, guidance=1.5),
    )


def mnist_dit() -> RunConfig:
    """Class-conditional MNIST at 32x32 with a DiT (Peebles & Xie 2023) in place of the U-Net:
    4x4 patches (64 tokens) of width 192, 6 blocks of 3 heads of 64 channels, 4.2M parameters;
    about the mnist U-Net's cost per image (~1 GFLOP a training example). Its training recipe
    is mnist's (v-prediction, the linear table, guidance 1.25) with a transformer's lower
    learning rate, 5e-4. Measured on a 2-core CPU (bench/RESULTS.md, 2026-12-07 fifth session):
    the preset's 2,000 steps fit the mnist budget but leave it far behind the U-Net (judge
    accuracy 0.538, FD 283 against 0.985, 7.09): 64 tokens need more steps than a CPU gives."""
    cfg = mnist()
    dit = DiTConfig(width=192, depth=6, heads=3, mlp_ratio=4.0, patch_size=4)
    return dataclasses.replace(
        cfg,
        preset="mnist-dit",
        model=ModelConfig(name="dit", dit=dit),
        train=dataclasses.replace(cfg.train, lr=5e-4),
    )


def mnist_latent_dit() -> RunConfig:
    """mnist-latent with a DiT for the U-Net: class-conditional on mnist-ae's 8x8x4 latents (set
    model.codec to the autoencoder run; cached codes), 2x2 patches (16 tokens) of width 128, 6
    blocks of 4 heads, 1.9M parameters: about the size diffusers' DiTTransformer2DModel has in issue
    39's throughput comparison, and each stream of mnist-sd3. Trained as mnist-sd3 is, a
    rectified flow with logit-normal times, with a transformer's lr 5e-4 (mnist-dit's), 7,500
    steps under a 15-minute cap (a step costs about a tenth of a second here), so that mnist-ae's
    10 minutes and these stay under the pixel mnist preset's wall time.

    Sampling: mnist-flow's solver, guidance 2.0 applied only at noise levels sigma / alpha <= 2
    (t <= 2/3), the guidance interval of Kynkaanniemi et al. 2024 ("Applying Guidance in a
    Limited Interval Improves Sample and Distribution Quality in Diffusion Models"): guidance
    at the highest noise levels pulls every sample of a class towards one mode (judge FD up),
    and guidance below them still holds the class (judge accuracy). Measured on a 2-core AMD
    EPYC in fp32 (bench/RESULTS.md, 2026-12-07 eighth session): on one 8,000-step run, judge
    accuracy 0.988 at FD 10.6 with guidance 1.5 everywhere (0.971 at 8.0 with 1.25) and 0.981 at
    7.8 with this interval; the preset as it is, after mnist-ae's capped 838 steps, 0.980 at FD
    8.15 against the pixel mnist preset's 0.985 at 7.09, its pipeline 1,425 s against the pixel
    preset's 1,800."""
    cfg = mnist_latent()
    flow = mnist_flow()
    dit = DiTConfig(width=128, depth=6, heads=4, mlp_ratio=4.0, patch_size=2)
    return dataclasses.replace(
        cfg,
        preset="mnist-latent-dit",
        model=dataclasses.replace(cfg.model, name="dit", dit=dit, unet=UNetConfig()),
        diffusion=dataclasses.replace(flow.diffusion, clip_x0=0.0),  # latents are not in [-1, 1]
        train=dataclasses.replace(cfg.train, lr=5e-4, steps=7500, time_limit_minutes=15.0),
        sample=dataclasses.replace(flow.sample, guidance=2.0, guidance_tmax=2.0),
    )


def _dit_s2(base: RunConfig, name: str) -> RunConfig:
    """`base`'s data, schedule and eps-prediction with DiT-S/2 (Peebles & Xie 2023, Table 1:
    width 384, depth 12, 6 heads, 2x2 patches) for its U-Net, trained with DiT's recipe (Sec.
    3.2 / App.): AdamW at a constant lr 1e-4 without weight decay or warm-up, batch 256, EMA
    0.9999, no dropout; bf16 where the device has it (precision auto). For a GPU: on a CPU it
    builds and steps, slowly."""
    dit = DiTConfig(width=384, depth=12, heads=6, mlp_ratio=4.0, patch_size=2)
    return dataclasses.replace(
        base,
        preset=name,
        model=ModelConfig(name="dit", dit=dit),
        train=dataclasses.replace(
            base.train,
            batch_size=256,
            lr=1e-4,
            lr_schedule="constant",
            warmup_steps=0,
            weight_decay=0.0,
            ema_decay=0.9999,
            precision="auto",
        ),
    )


def cifar10_dit() -> RunConfig:
    """Unconditional CIFAR-10 with DiT-S/2 (`_dit_s2`): 256 tokens of 2x2x3 pixels, the token
    count of DiT-S/2 at 256x256; 32.4M parameters (DiT-S/2 itself: 33.0M, its 1000-class label
    table and 4 -> 8 latent channels the difference); cifar10's 800k steps. Unmeasured."""
    return _dit_s2(cifar10(), "cifar10-dit")


def celeba_dit() -> RunConfig:
    """Unconditional CelebA 64x64 with DiT-S/2 (`_dit_s2`) in pixels: 1024 tokens of 2x2x3, 4x
    cifar10-dit's tokens (patch_size=4 gives 256 tokens at about a quarter of the cost);
    celeba64's 500k steps. Unmeasured."""
    return _dit_s2(celeba64(), "celeba-dit")


def mnist_sd3() -> RunConfig:
    """A small Stable Diffusion 3 (Esser et al. 2024) on MNIST: an MMDiT (model.dit.text=joint)
    on mnist-ae's 8x8x4 latents (set model.codec to the autoencoder run; patch 2, 16 image
    tokens), reading the frozen all-MiniLM-L6-v2's token states of mnist-text's captions (16
    tokens; the longest caption has 9), trained as a rectified flow with SD3's logit-normal
    time sampling (Sec. 3.1), with q/k RMS norm (Sec. 5.3.2). Width 128, depth 6: two streams
    of mnist-latent-dit's size. Sampling is mnist-flow's solver at guidance 1.5. 5,000 steps
    under an 18-minute cap: with mnist-ae's 10 minutes the pipeline takes 28 minutes on a
    2-core AMD EPYC in fp32 (4,950 steps there), and on held-out prompt wordings 0.986 of the
    samples are judged the digit asked for, at 1.37x the class-label mnist run's judge FD; the
    mnist-latent budget (3,000 steps, 10 minutes) stopped at 2,682 steps with 0.975 and 2.20x
    (bench/RESULTS.md, 2026-12-07 fifth session)."""
    cfg = mnist_latent()
    flow = mnist_flow()
    dit = DiTConfig(width=128, depth=6, heads=4, patch_size=2, qk_norm=True, text="joint")
    return dataclasses.replace(
        cfg,
        preset="mnist-sd3",
        data=DataConfig(name="mnist", text_conditional=True),
        model=dataclasses.replace(
            cfg.model, name="dit", dit=dit, text=TextConfig(encoder="minilm", max_tokens=16)
        ),
        diffusion=dataclasses.replace(flow.diffusion, clip_x0=0.0),  # latents are not in [-1, 1]
        train=dataclasses.replace(cfg.train, lr=5e-4, steps=5000, time_limit_minutes=18.0),
        sample=dataclasses.replace(flow.sample, guidance=1.5),
    )


def _toy2d_few_step(name: str, loss: str, sampler: str, steps: int, **model) -> RunConfig:
    """The toy2d-flow network and data, trained `steps` steps by a one-step loss (MeanFlow or
    a shortcut model: the net reads the second time t2) and sampled in one step by its
    sampler; `model`: ModelConfig changes."""
    flow = toy2d_flow()
    return dataclasses.replace(
        flow,
        preset=name,
        model=dataclasses.replace(flow.model, second_time=True, **model),
        train=dataclasses.replace(flow.train, loss=loss, steps=steps),
        sample=SampleConfig(sampler=sampler, steps=1, spacing="uniform"),
    )


def toy2d_shortcut() -> RunConfig:
    """Shortcut models (Frans et al. 2024) on the checkerboard, from scratch, within 5 CPU
    minutes (7,000 steps took 288-309 s on 2 cores, 2026-12-07): half the batch on the
    self-consistency target (bootstrap fraction 0.5: in-square 0.846 / 0.921 / 0.943 at 1 / 2 / 4
    steps against 0.849 / 0.906 / 0.935 at the paper's 0.25, bench/RESULTS.md)."""
    cfg = _toy2d_few_step("toy2d-shortcut", "shortcut", "shortcut", steps=6500)
    return dataclasses.replace(cfg, shortcut=ShortcutConfig(bootstrap_fraction=0.5))


def toy2d_meanflow() -> RunConfig:
    """MeanFlow (Geng et al. 2025) on the checkerboard, from scratch, within 5 CPU minutes
    (4,000 steps in 255 s on 2 cores, 2026-12-07). model.time_scale=1: with the default 1000
    the net's u spins in t, and the target's (t - r) d_t u term swamped it (in-square 0.55 at
    one step after 8,000 steps; 0.75 at 4,000 with 1, bench/RESULTS.md)."""
    return _toy2d_few_step("toy2d-meanflow", "meanflow", "meanflow", steps=4000, time_scale=1.0)


def mnist_shortcut() -> RunConfig:
    """Shortcut models (Frans et al. 2024) on MNIST, class-conditional, from scratch: mnist-flow's
    U-Net (with the second time input), data, budget and precision; sampled in one step of the
    shortcut sampler with classifier-free guidance at 2.5 (one doubled batch: two network rows a
    sample), the middle of the broad best of a sweep of 1-4 on the trained run (one step: 0.895,
    0.913, 0.954, 0.967, 0.966 judged right and judge FD 77.1, 45.4, 24.6, 23.6, 25.5 at 1, 1.25,
    2, 2.5, 3; bench/RESULTS.md): a one-step sample gets no later steps to correct an
    under-guided start. Four step sizes (max_steps 16: targets for d = 1 / 8 .. 1 built on
    the velocity at d = 1 / 16) and half the batch on them: the paper's 128-step lattice with a
    quarter of batch 64 drew noise at every step count after 30 minutes (7 levels, each target
    built on a finer level that saw ~4,000 examples in the run); with 16 and 0.5, one step
    followed 16 steps' quality from step 300 on (judged right 0.38 / 0.42, bench/RESULTS.md).
    A step took 1.2-1.27 s (fp32, 2 AMD EPYC cores, 2026-12-07): 1,350 steps in 28 minutes (the
    128-step lattice: judged right 0.100, judge FD 979 at one step)."""
    flow = mnist_flow()
    return dataclasses.replace(
        flow,
        preset="mnist-shortcut",
        model=dataclasses.replace(flow.model, second_time=True),
        train=dataclasses.replace(flow.train, loss="shortcut", steps=1350),
        sample=dataclasses.replace(
            flow.sample, sampler="shortcut", steps=1, spacing="uniform", guidance=2.5
        ),
        shortcut=ShortcutConfig(max_steps=16, bootstrap_fraction=0.5),
    )


def mnist_meanflow() -> RunConfig:
    """MeanFlow (Geng et al. 2025) on MNIST, class-conditional, from scratch, with guidance
    folded into training (Sec. 4.2, App. B.1): omega 1, kappa 0.25 learn the field guided at
    scale 1 / 0.75 = 1.33 (mnist's own is 1.25), so a sample is guided at one call (sample.guidance
    stays 1: the run refuses another). mnist-flow's U-Net with the second time input and its
    data; fp32, because the JVP of the U-Net fails under bf16 autocast (issue 40). A step
    (forward, JVP, backward and the guidance's doubled batch) took 2.2 s on 2 AMD EPYC cores
    (2026-12-07), so 800 steps about fill mnist's 30-minute limit (the rate decays to ~0.1%).
    model.time_scale=1, as in toy2d-meanflow: a target that holds (t - r) d_t u wants u smooth
    in t. Measured (bench/RESULTS.md), judged the requested class at 1 / 2 / 4 calls: 0.880 /
    0.944 / 0.953, judge FD 122.6 / 27.3 / 14.9 (800 scheduled, the limit stopped it at 785:
    steps took 2.0-2.3 s); with 1,400 scheduled and cut at 787, 0.900 / 0.949 / 0.959 and
    91.9 / 22.4 / 12.9."""
    flow = mnist_flow()
    return dataclasses.replace(
        flow,
        preset="mnist-meanflow",
        model=dataclasses.replace(flow.model, second_time=True, time_scale=1.0),
        train=dataclasses.replace(flow.train, loss="meanflow", steps=800, precision="fp32"),
        sample=dataclasses.replace(
            flow.sample, sampler="meanflow", steps=1, spacing="uniform", guidance=1.0
        ),
        meanflow=MeanFlowConfig(omega=1.0, kappa=0.25),
    )


PRESETS = {
    "toy2d": toy2d,
    "mnist": mnist,
    "fashion": fashion,
    "cifar10": cifar10,
    "celeba64": celeba64,
    "imagefolder": imagefolder,
    "toy2d-flow": toy2d_flow,
    "mnist-flow": mnist_flow,
    "toy2d-ct": toy2d_ct,
    "toy2d-ect": toy2d_ect,
    "toy2d-cd": toy2d_cd,
    "mnist-ect": mnist_ect,
    "mnist-cd": mnist_cd,
    "mnist-ct": mnist_ct,
    "mnist-ae": mnist_ae,
    "fashion-ae": fashion_ae,
    "cifar10-ae": cifar10_ae,
    "celeba-ae": celeba_ae,
    "mnist-latent": mnist_latent,
    "fashion-latent": fashion_latent,
    "mnist-text": mnist_text,
    "fashion-text": fashion_text,
    "mnist-dit": mnist_dit,
    "mnist-latent-dit": mnist_latent_dit,
    "cifar10-dit": cifar10_dit,
    "celeba-dit": celeba_dit,
    "mnist-sd3": mnist_sd3,
    "toy2d-shortcut": toy2d_shortcut,
    "toy2d-meanflow": toy2d_meanflow,
    "mnist-shortcut": mnist_shortcut,
    "mnist-meanflow": mnist_meanflow,
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
