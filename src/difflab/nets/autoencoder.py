"""A KL-regularised convolutional autoencoder in the style of LDM's `AutoencoderKL` (Rombach et
al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G),
and the patch discriminator of its adversarial loss (Isola et al. 2017, pix2pix's PatchGAN).

    encoder: x (B, C, H, W) -> posterior moments (B, 2 c, H / f, W / f): mean and log-variance
    decoder: z (B, c, H / f, W / f) -> x_hat (B, C, H, W)

f = 2^(len(channel_mults) - 1). Each level holds `num_res_blocks` ResBlocks (GroupNorm, SiLU,
conv 3x3, twice, plus the input); the middle is ResBlock, optional self-attention, ResBlock.
The attention and resampling layers are the U-Net's (blocks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.errors import ConfigError
from difflab.nets.blocks import AttentionBlock, downsample_layer, upsample_layer
from difflab.nets.layers import GroupNorm

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamps the log-variance here


class AEResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3x3 -> GroupNorm -> SiLU -> Dropout -> Conv3x3, plus the input
    (through a 1x1 conv when channels change). LDM's ResnetBlock without a time embedding.
    Shapes: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        z = self.conv1(F.silu(self.norm1(h)))
        z = self.conv2(self.dropout(F.silu(self.norm2(z))))
        return self.skip(h) + z


def _middle(ch: int, groups: int, attention: bool, dropout: float) -> nn.Sequential:
    attn = [AttentionBlock(ch, 1, groups)] if attention else []
    return nn.Sequential(
        AEResBlock(ch, ch, groups, dropout), *attn, AEResBlock(ch, ch, groups, dropout)
    )


class AutoencoderKL(nn.Module):
    """Encoder, diagonal Gaussian posterior and decoder.

    Args:
        in_channels: image channels C.
        base_channels: width of the first level; level i has base_channels * channel_mults[i].
        channel_mults: one entry per level; len - 1 halvings give f = 2^(len - 1).
        num_res_blocks: ResBlocks per level in the encoder (the decoder has one more, as LDM).
        latent_channels: c, the channels of the latent.
        mid_attention: self-attention between the two middle ResBlocks.
        norm_groups: GroupNorm groups (must divide every width).
        dropout: inside the ResBlocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        mid_attention: bool = True,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        if not widths or any(w % norm_groups for w in widths) or num_res_blocks < 1:
            raise ConfigError(
                f"autoencoder widths {widths} must be divisible by norm_groups={norm_groups}, "
                f"with at least one level and num_res_blocks >= 1 (got {num_res_blocks})"
            )
        if latent_channels < 1:
            raise ConfigError(f"latent_channels must be >= 1, got {latent_channels}")
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.factor = 2 ** (len(widths) - 1)
        g = norm_groups
        # encoder: conv_in, levels (ResBlocks, then a halving except at the last), middle, out
        down, ch = [nn.Conv2d(in_channels, widths[0], 3, padding=1)], widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(AEResBlock(ch, w, g, dropout))
                ch = w
            if i < len(widths) - 1:
                down.append(downsample_layer(ch, "conv"))
        down += [_middle(ch, g, mid_attention, dropout), GroupNorm(g, ch), nn.SiLU()]
        down.append(nn.Conv2d(ch, 2 * latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*down)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        # decoder: the mirror image, with one more ResBlock per level
        up = [nn.Conv2d(latent_channels, ch, 3, padding=1), _middle(ch, g, mid_attention, dropout)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                up.append(AEResBlock(ch, w, g, dropout))
                ch = w
            if i > 0:
                up.append(upsample_layer(ch, "nearest"))
        up += [GroupNorm(g, ch), nn.SiLU()]
        self.decoder = nn.Sequential(*up)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)  # the adaptive weight's layer

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """(c, H / f, W / f) for images of shape (C, H, W); ValueError if f does not divide."""
        _, height, width = shape
        if height % self.factor or width % self.factor:
            raise ConfigError(
                f"image size {height}x{width} is not divisible by the autoencoder's f = "
                f"{self.factor}"
            )
        return (self.latent_channels, height // self.factor, width // self.factor)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior q(z | x) = N(mean, exp(logvar)): x (B, C, H, W) in [-1, 1] -> mean and
        logvar, each (B, c, H / f, W / f); logvar clamped to LOGVAR_RANGE as in LDM."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, c, h, w) -> x_hat (B, C, f h, f w), unbounded (images live in [-1, 1])."""
        return self.conv_out(self.decoder(self.post_quant_conv(z)))

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruct x through z = mean + exp(logvar / 2) eps (the reparameterisation of
        Kingma & Welling 2014, eq. 10; eps None: z = mean). Returns (x_hat, mean, logvar)."""
        mean, logvar = self.moments(x)
        z = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN (as LDM's NLayerDiscriminator): conv 4x4 stride 2 with
    LeakyReLU(0.2), `layers - 1` more with doubling width (capped at 8x), one stride-1 conv,
    then a one-channel map of real/fake logits, one per overlapping patch. GroupNorm instead of
    BatchNorm, so a logit does not depend on the rest of the batch.
    Shapes: (B, C, H, W) -> (B, 1, H', W')."""

    def __init__(self, in_channels: int = 1, width: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1 or width % 8:
            raise ConfigError(f"discriminator needs layers >= 1 and width % 8 == 0, got {layers}")
        seq = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for n in range(1, layers + 1):
            out = width * min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(ch, out, 4, stride, 1), GroupNorm(8, out), nn.LeakyReLU(0.2)]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # pix2pix's init: N(0, 0.02) convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
