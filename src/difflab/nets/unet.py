"""A configurable DDPM-style U-Net: net(x_t (B, C, H, W), t (B,), y (B,) | None) -> (B, C, H, W).

The layout follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", Appendix B): a
3x3 input conv, `num_res_blocks` ResBlocks per level with a skip saved after each and after each
downsample, a middle of ResBlocks with self-attention between them, and on the way up
`num_res_blocks + 1` ResBlocks per level, each eating one skip. Every ResBlock and attention block
ends in a zero-initialised layer, so at init each is exactly the identity.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from difflab.nets.layers import TimeEmbedding

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
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
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
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, h: Tensor) -> Tensor:
        B, C, H, W = h.shape
        qkv = self.qkv(self.norm(h)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, C // heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C // heads)
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


class _Stage(nn.ModuleList):
    """Layers run in order; only ResBlocks see the embedding. With `checkpointing` (set by the
    UNet) each block's activations are recomputed in the backward pass instead of stored."""

    checkpointing = False

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self:
            args = (h, emb) if isinstance(layer, ResBlock) else (h,)
            h = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return h


def _validate(base: int, mults: tuple, attention_levels: tuple, **kw) -> None:
    """Raise ValueError for a configuration that cannot be built; see UNet's Args."""
    n = len(mults)
    if n < 1:
        raise ValueError("channel_mults must name at least one level")
    for level in attention_levels:
        if not 0 <= level < n:
            raise ValueError(
                f"attention level {level} is out of range: valid levels are 0..{n - 1} for "
                f"{n} channel_mults"
            )
    for name, choices in (("downsample", DOWNSAMPLE_CHOICES), ("upsample", UPSAMPLE_CHOICES)):
        if kw[name] not in choices:
            raise ValueError(f"unknown {name} {kw[name]!r}; choose one of {choices}")
    for ch in (base, *(base * m for m in mults)):
        if ch % kw["norm_groups"]:
            raise ValueError(f"norm_groups={kw['norm_groups']} does not divide channel count {ch}")
    heads = kw["num_heads"]
    attended = [base * mults[i] for i in attention_levels]
    attended += [base * mults[-1]] if kw["mid_attention"] else []
    if heads < 1 or any(ch % heads for ch in attended):
        raise ValueError(f"num_heads={heads} must be >= 1 and divide the channels {attended}")
    if kw["mid_attention"] and kw["bottleneck_blocks"] < 2:
        raise ValueError("mid_attention sits between ResBlocks: it needs bottleneck_blocks >= 2")


def _down_path(base, mults, num_res_blocks, attn, make) -> tuple[nn.ModuleList, list[int]]:
    """One _Stage per saved skip; returns them and the skip channel counts, in order."""
    stages, ch, skip_chs = nn.ModuleList(), base, [base]  # conv_in's output is the first skip
    for level, mult in enumerate(mults):
        for _ in range(num_res_blocks):
            stage = [make["res"](ch, base * mult)]
            ch = base * mult
            stages.append(_Stage(stage + ([make["attn"](ch)] if level in attn else [])))
            skip_chs.append(ch)
        if level < len(mults) - 1:
            stages.append(_Stage([make["down"](ch)]))
            skip_chs.append(ch)
    return stages, skip_chs


def _up_path(base, mults, num_res_blocks, attn, make, skip_chs) -> nn.ModuleList:
    """num_res_blocks + 1 stages per level, each eating one skip (last saved, first eaten)."""
    stages, ch, skip_chs = nn.ModuleList(), skip_chs[-1], list(skip_chs)
    for level in reversed(range(len(mults))):
        for i in range(num_res_blocks + 1):
            stage = [make["res"](ch + skip_chs.pop(), base * mults[level])]
            ch = base * mults[level]
            stage += [make["attn"](ch)] if level in attn else []
            stage += [make["up"](ch)] if level > 0 and i == num_res_blocks else []
            stages.append(_Stage(stage))
    return stages


class UNet(nn.Module):
    """DDPM's U-Net (Ho et al. 2020), configurable; the network knows nothing about schedules.

    Args:
        in_channels: image channels C of x_t.
        out_channels: channels of the output (default in_channels).
        base_channels: channels at level 0; also the sinusoidal time-embedding width. The
            embedding MLP outputs emb_dim = 4 * base_channels (as DDPM).
        channel_mults: channels at level i are base_channels * channel_mults[i]; each level but
            the last halves H and W.
        num_res_blocks: ResBlocks per level on the way down (num_res_blocks + 1 on the way up).
        attention_levels: indices of the levels whose ResBlocks are each followed by
            self-attention; level i works at resolution H / 2^i (e.g. (1,) = 16x16 for 32x32).
        num_heads: attention heads (>= 1, must divide the channels where attention is).
        bottleneck_blocks: ResBlocks in the middle, at the lowest resolution.
        mid_attention: self-attention between consecutive middle ResBlocks.
        dropout: dropout probability inside each ResBlock.
        num_classes: 0 = unconditional; > 0 adds a label embedding with num_classes + 1 rows,
            index num_classes being the "null" label used when y is None (classifier-free
            guidance trains one net for both).
        weight_standardization: ResBlock convs standardise their weights (Qiao et al. 2019).
        downsample: "conv" (strided 3x3, DDPM), "avgpool" or "space_to_depth".
        upsample: "nearest" (DDPM) or "bilinear", each followed by a 3x3 conv.
        norm_groups: GroupNorm groups; must divide every channel count.
        checkpointing: recompute each block's activations in the backward pass (activation
            checkpointing; Chen et al. 2016): much less memory for about a third more compute.
            Training only; results are the same.

    The output conv is zero-initialised (DDPM's was not; guided-diffusion's is): the untrained
    net returns 0, the mean of eps, and every block starts as the identity.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 128,
        channel_mults: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] = (1,),
        num_heads: int = 1,
        bottleneck_blocks: int = 2,
        mid_attention: bool = True,
        dropout: float = 0.0,
        num_classes: int = 0,
        weight_standardization: bool = False,
        downsample: str = "conv",
        upsample: str = "nearest",
        norm_groups: int = 32,
        checkpointing: bool = False,
    ):
        super().__init__()
        base, mults, attn = base_channels, tuple(channel_mults), tuple(attention_levels)
        _validate(
            base, mults, attn, num_heads=num_heads, bottleneck_blocks=bottleneck_blocks,
            mid_attention=mid_attention, downsample=downsample, upsample=upsample,
            norm_groups=norm_groups,
        )  # fmt: skip
        self.num_levels, self.num_classes, emb_dim = len(mults), num_classes, 4 * base
        self.time_emb = TimeEmbedding(emb_dim, sinusoid_dim=base)
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        make = {
            "res": partial(ResBlock, emb_dim=emb_dim, dropout=dropout, groups=norm_groups,
                           ws=weight_standardization),
            "attn": partial(AttentionBlock, num_heads=num_heads, groups=norm_groups),
            "down": partial(downsample_layer, kind=downsample),
            "up": partial(upsample_layer, mode=upsample),
        }  # fmt: skip
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down, skip_chs = _down_path(base, mults, num_res_blocks, attn, make)
        ch = skip_chs[-1]
        mid = [make["res"](ch, ch)]
        for _ in range(bottleneck_blocks - 1):
            mid += [make["attn"](ch)] if mid_attention else []
            mid += [make["res"](ch, ch)]
        self.mid = _Stage(mid)
        self.up = _up_path(base, mults, num_res_blocks, attn, make, skip_chs)
        out_conv = _zero_(nn.Conv2d(base, out_channels or in_channels, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(norm_groups, base), nn.SiLU(), out_conv)
        for stage in self.modules():
            if isinstance(stage, _Stage):
                stage.checkpointing = checkpointing

    def _embed(self, t: Tensor, y: Tensor | None, batch: int) -> Tensor:
        """Time embedding plus label embedding: (B,), (B,) | None -> (B, emb_dim)."""
        emb = self.time_emb(t)
        if self.label_emb is None:
            if y is not None:
                raise ValueError("y given to an unconditional net (num_classes=0); pass y=None")
            return emb
        if y is None:  # unconditional: the null label
            y = torch.full((batch,), self.num_classes, device=t.device, dtype=torch.long)
        else:
            self._check_labels(y)
        return emb + self.label_emb(y)

    def _check_labels(self, y: Tensor) -> None:
        """Labels in [0, num_classes] (num_classes = null). On the CPU a clear error; on a GPU a
        device-side assert, because reading the answer back would stall every training step."""
        valid = ((y >= 0) & (y <= self.num_classes)).all()
        message = (
            f"labels out of range [0, {self.num_classes}) (or {self.num_classes}, the null label)"
        )
        if y.device.type != "cpu":
            torch._assert_async(valid, message)
        elif not bool(valid):
            raise ValueError(f"{message}: got min {int(y.min())}, max {int(y.max())}")

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x_t (B, C, H, W), t (B,) in [0, 1], y (B,) int labels or None -> (B, C_out, H, W).

        y may hold the null label num_classes on some rows, so one batch can mix conditional and
        unconditional examples (label dropout, classifier-free guidance).
        """
        k = self.num_levels - 1
        H, W = x_t.shape[-2:]
        if H % 2**k or W % 2**k:
            raise ValueError(
                f"image size {H}x{W} is not divisible by 2^{k} = {2**k} required by a U-Net with "
                f"{k} downsamplings; resize/pad the images or use fewer levels"
            )
        emb = self._embed(t, y, x_t.shape[0])  # (B, emb_dim)
        h = self.conv_in(x_t)  # (B, base, H, W)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.mid(h, emb)  # (B, base * mults[-1], H / 2^k, W / 2^k)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def ddpm_cifar10(**overrides) -> UNet:
    """DDPM's CIFAR-10 net (Ho et al. 2020, Appendix B), 35.7M parameters; `overrides` replace
    any UNet argument (e.g. num_classes=10).
    """
    config = dict(
        in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
        attention_levels=(1,), num_heads=1, bottleneck_blocks=2, mid_attention=True, dropout=0.1,
    )  # fmt: skip
    return UNet(**{**config, **overrides})
