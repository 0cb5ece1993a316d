"""The U-Net's building blocks: WSConv2d (weight standardisation), ResBlock, AttentionBlock and
the down/up-sampling layers. ResBlock and AttentionBlock end in a zero-initialised layer
(`_zero_`), so at init each is exactly the identity. The UNet that assembles them is in unet.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.nets.layers import GroupNorm, attention

DOWNSAMPLE_CHOICES = ("conv", "avgpool", "space_to_depth")
UPSAMPLE_CHOICES = ("nearest", "bilinear")


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019, "Micro-Batch Training with
    Batch-Channel Normalization and Weight Standardization") and a learned per-channel gain.

    Each output channel's weight is centred and scaled to variance 1 / fan_in (He-init scale, so
    activations keep their size). The gain exists because a standardised weight cannot be zero:
    a zero-initialised gain (`gain_init=0`) is how a WS conv starts a block as the identity.
    """

    def __init__(self, *args, gain_init: float = 1.0, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), float(gain_init)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight  # (C_out, C_in, k, k)
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(fan_in * (var + self.eps)) * self.gain
        return self._conv_forward(x, w, self.bias)


def _zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's output at init: the WS gain if it has one, else its weight and bias."""
    if isinstance(module, WSConv2d):
        nn.init.zeros_(module.gain)
    else:
        nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3x3 -> + Linear(SiLU(emb)) -> GroupNorm -> SiLU -> Dropout ->
    Conv3x3 (zero-init), plus the input (through a 1x1 conv when channels change).

    Shapes: h (B, C_in, H, W), emb (B, emb_dim) -> (B, C_out, H, W).
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int, ws: bool = False
    ):
        super().__init__()
        conv = WSConv2d if ws else nn.Conv2d
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(conv(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.conv1(F.silu(self.norm1(h)))
        z = z + self.emb_proj(F.silu(emb))[:, :, None, None]  # same shift for every pixel
        z = self.conv2(self.dropout(F.silu(self.norm2(z))))
        return self.skip(h) + z


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H W pixels, plus the input; the output 1x1 conv starts at
    zero. Shapes: (B, C, H, W) -> (B, C, H, W); head dim C // num_heads.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, h: Tensor) -> Tensor:
        B, C, H, W = h.shape
        qkv = self.qkv(self.norm(h)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, C // heads)
        out = attention(q, k, v)  # (B, heads, HW, C // heads)
        return h + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


def downsample_layer(channels: int, kind: str) -> nn.Module:
    """Halve H and W, keeping C: (B, C, H, W) -> (B, C, H / 2, W / 2). "conv" is DDPM's strided
    3x3 conv; "space_to_depth" (pixel_unshuffle(2), which loses nothing, then a 1x1 conv back to C)
    lets the net choose what to keep; "avgpool" has no parameters.
    """
    if kind == "conv":
        return nn.Conv2d(channels, channels, 3, stride=2, padding=1)
    if kind == "space_to_depth":
        return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * channels, channels, 1))
    return nn.AvgPool2d(2)


def upsample_layer(channels: int, mode: str) -> nn.Module:
    """Double H and W by "nearest" or "bilinear" interpolation, then a 3x3 conv (which smooths the
    blockiness of nearest-neighbour copies): (B, C, H, W) -> (B, C, 2 H, 2 W).
    """
    return nn.Sequential(
        nn.Upsample(scale_factor=2.0, mode=mode), nn.Conv2d(channels, channels, 3, padding=1)
    )
