"""The config sections of latent diffusion (issue 14): the autoencoder network
(`model.autoencoder`) and its loss (`train.autoencoder`). The codec a diffusion run uses is
`model.codec` (config/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AutoencoderConfig:  # model.name=autoencoder: LDM's AutoencoderKL (nets/autoencoder.py)
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)  # f = 2^(len - 1): 2, 4 or 8
    num_res_blocks: int = 1
    latent_channels: int = 4  # c
    mid_attention: bool = True
    norm_groups: int = 8
    dropout: float = 0.0


@dataclass
class AutoencoderLossConfig:  # train.loss=autoencoder (diffusion/autoencoder_loss.py)
    pixel: str = "l1"  # l1 | l2: the reconstruction term
    kl_weight: float = 1e-6  # LDM's f4 / f8 KL weight
    discriminator: bool = False  # a patch discriminator (hinge loss) from disc_start on
    disc_start: int = 1000  # the first step that trains and uses the discriminator
    disc_weight: float = 0.5  # times LDM's adaptive weight (gradient-norm ratio at conv_out)
    disc_layers: int = 2  # strided layers of the PatchGAN
    disc_width: int = 64
    disc_lr: float = 2e-4
    feature_weight: float = 0.0  # judge-feature loss (L2 of judge embeddings); 0 = off
    feature_judge: str = ""  # the judge's .safetensors; "" = the data set's default judge
