"""A configurable DDPM-style U-Net: net(x_t (B, C, H, W), t (B,), y (B,) | None) -> (B, C, H, W).

The layout follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", Appendix B): a
3x3 input conv, `num_res_blocks` ResBlocks per level with a skip saved after each and after each
downsample, a middle of ResBlocks with self-attention between them, and on the way up
`num_res_blocks + 1` ResBlocks per level, each eating one skip. Every ResBlock and attention block
ends in a zero-initialised layer, so at init each is exactly the identity.

This module holds the assembly (UNet, its stages, configuration checks, ddpm_cifar10); the blocks
themselves (ResBlock, AttentionBlock, WSConv2d, down/up-sampling) are in blocks.py.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab.errors import ConfigError
from difflab.nets.blocks import (
    DOWNSAMPLE_CHOICES,
    UPSAMPLE_CHOICES,
    AttentionBlock,
    ResBlock,
    _zero_,
    downsample_layer,
    upsample_layer,
)
from difflab.nets.layers import GroupNorm, SecondTime, TimeEmbedding, add_second_time, check_labels
from difflab.nets.text import CrossAttentionBlock, pooled


class _Stage(nn.ModuleList):
    """Layers run in order; only ResBlocks see the embedding, only cross-attention the text
    (context, mask). With `checkpointing` (set by the UNet) each block's activations are
    recomputed in the backward pass instead of stored."""

    checkpointing = False

    def forward(self, h: Tensor, emb: Tensor, text: tuple | None = None) -> Tensor:
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self:
            args = (h, emb) if isinstance(layer, ResBlock) else (h,)
            args = (h, *text) if isinstance(layer, CrossAttentionBlock) else args
            h = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return h


def _validate(base: int, mults: tuple, attention_levels: tuple, **kw) -> None:
    """Raise ValueError for a configuration that cannot be built; see UNet's Args."""
    n = len(mults)
    if n < 1:
        raise ConfigError("channel_mults must name at least one level")
    for level in attention_levels:
        if not 0 <= level < n:
            raise ConfigError(
                f"attention level {level} is out of range: valid levels are 0..{n - 1} for "
                f"{n} channel_mults"
            )
    for name, choices in (("downsample", DOWNSAMPLE_CHOICES), ("upsample", UPSAMPLE_CHOICES)):
        if kw[name] not in choices:
            raise ConfigError(f"unknown {name} {kw[name]!r}; choose one of {choices}")
    for ch in (base, *(base * m for m in mults)):
        if ch % kw["norm_groups"]:
            raise ConfigError(f"norm_groups={kw['norm_groups']} does not divide channel count {ch}")
    heads = kw["num_heads"]
    attended = [base * mults[i] for i in attention_levels]
    attended += [base * mults[-1]] if kw["mid_attention"] else []
    if heads < 1 or any(ch % heads for ch in attended):
        raise ConfigError(f"num_heads={heads} must be >= 1 and divide the channels {attended}")
    if kw["mid_attention"] and kw["bottleneck_blocks"] < 2:
        raise ConfigError("mid_attention sits between ResBlocks: it needs bottleneck_blocks >= 2")


def _down_path(base, mults, num_res_blocks, attn, make) -> tuple[nn.ModuleList, list[int]]:
    """One _Stage per saved skip; returns them and the skip channel counts, in order."""
    stages, ch, skip_chs = nn.ModuleList(), base, [base]  # conv_in's output is the first skip
    for level, mult in enumerate(mults):
        for _ in range(num_res_blocks):
            stage = [make["res"](ch, base * mult)]
            ch = base * mult
            stage += [make["attn"](ch)] if level in attn else []
            stages.append(_Stage(stage + make["cross"](ch, level)))
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
            stage += make["cross"](ch, level)
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
        cross_attention_levels: levels whose blocks are each followed by cross-attention to the
            text (nets/text.py); the middle then attends too. Needs `text_encoder`.
        text_encoder: a text net's condition -> (context (B, L, D), mask (B, L)): a CharEncoder
            (trained with the net) or FrozenContext. Its pooled context is also added to the
            time embedding (Saharia et al. 2022, Imagen, Sec. 2.2 / App. F). None: no text.

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
        cross_attention_levels: tuple[int, ...] = (),
        text_encoder: nn.Module | None = None,
        second_time: bool = False,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        base, mults, attn = base_channels, tuple(channel_mults), tuple(attention_levels)
        _validate(
            base,
            mults,
            attn,
            num_heads=num_heads,
            bottleneck_blocks=bottleneck_blocks,
            mid_attention=mid_attention,
            downsample=downsample,
            upsample=upsample,
            norm_groups=norm_groups,
        )
        self.num_levels, self.num_classes, emb_dim = len(mults), num_classes, 4 * base
        self.time_emb = TimeEmbedding(emb_dim, sinusoid_dim=base, scale=time_scale)
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        cross = _text_modules(self, text_encoder, tuple(cross_attention_levels), mults, emb_dim)
        for ch in {base * mults[level] for level in self.cross}:
            if ch % num_heads:
                raise ConfigError(f"num_heads={num_heads} must divide the channels {ch}")
        make = {
            "res": partial(
                ResBlock,
                emb_dim=emb_dim,
                dropout=dropout,
                groups=norm_groups,
                ws=weight_standardization,
            ),
            "attn": partial(AttentionBlock, num_heads=num_heads, groups=norm_groups),
            "down": partial(downsample_layer, kind=downsample),
            "up": partial(upsample_layer, mode=upsample),
            "cross": lambda ch, level: (
                [CrossAttentionBlock(ch, cross, num_heads, norm_groups)]
                if level in self.cross
                else []
            ),
        }
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down, skip_chs = _down_path(base, mults, num_res_blocks, attn, make)
        ch = skip_chs[-1]
        mid = [make["res"](ch, ch)]
        for _ in range(bottleneck_blocks - 1):
            mid += [make["attn"](ch)] if mid_attention else []
            mid += [make["res"](ch, ch)]
        self.mid = _Stage(mid + make["cross"](ch, -1))  # last: the other indices stay
        self.up = _up_path(base, mults, num_res_blocks, attn, make, skip_chs)
        out_conv = _zero_(nn.Conv2d(base, out_channels or in_channels, 3, padding=1))
        self.out = nn.Sequential(GroupNorm(norm_groups, base), nn.SiLU(), out_conv)
        # t2 (MeanFlow's t - r, a shortcut's d) beside t; made last, so nets without it are the same
        self.second_time = second_time
        self.time2_emb = (
            SecondTime(emb_dim, sinusoid_dim=base, scale=time_scale) if second_time else None
        )
        for stage in self.modules():
            if isinstance(stage, _Stage):
                stage.checkpointing = checkpointing

    def _embed(self, t: Tensor, y: Tensor | None, batch: int, t2: Tensor | None = None) -> Tensor:
        """Time embedding (t and t2) plus label embedding: (B,), (B,) | None -> (B, emb_dim)."""
        emb = add_second_time(self.time_emb(t), self.time2_emb, t, t2)
        if self.label_emb is None:
            if y is not None:
                raise ValueError("y given to an unconditional net (num_classes=0); pass y=None")
            return emb
        if y is None:  # unconditional: the null label
            y = torch.full((batch,), self.num_classes, device=t.device, dtype=torch.long)
        else:
            check_labels(y, self.num_classes)
        return emb + self.label_emb(y)

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, *, t2: Tensor | None = None
    ) -> Tensor:
        """x_t (B, C, H, W), t (B,) in [0, 1], y (B,) int labels or None, t2 (B,) the second time
        (nets built with second_time) -> (B, C_out, H, W).

        y may hold the null label num_classes on some rows, so one batch can mix conditional and
        unconditional examples (label dropout, classifier-free guidance).
        """
        k = self.num_levels - 1
        H, W = x_t.shape[-2:]
        if H % 2**k or W % 2**k:
            raise ConfigError(
                f"image size {H}x{W} is not divisible by 2^{k} = {2**k} required by a U-Net with "
                f"{k} downsamplings; resize/pad the images or use fewer levels"
            )
        text = None
        if self.text_encoder is None:
            emb = self._embed(t, y, x_t.shape[0], t2)  # (B, emb_dim)
        else:
            if y is None:
                raise ValueError("a text net needs its condition (token ids or token states)")
            text = self.text_encoder(y)  # context (B, L, D), mask (B, L)
            emb = add_second_time(self.time_emb(t), self.time2_emb, t, t2)
            emb = emb + self.text_pool(pooled(*text))
        h = self.conv_in(x_t)  # (B, base, H, W)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, text)
            skips.append(h)
        h = self.mid(h, emb, text)  # (B, base * mults[-1], H / 2^k, W / 2^k)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, text)
        return self.out(h)


def _text_modules(net, encoder, levels, mults, emb_dim) -> int:
    """Attach a text net's encoder and pooled projection; returns the context dimension (0 and
    nothing attached without text). The middle (level -1) attends whenever a level does."""
    net.text_encoder, net.cross = encoder, (*levels, -1) if levels else ()
    for level in levels:
        if not 0 <= level < len(mults):
            raise ConfigError(f"cross-attention level {level} is out of range 0..{len(mults) - 1}")
    if (encoder is None) != (not levels):
        raise ConfigError("model.unet.cross_attention_levels and a text encoder come together")
    if encoder is None:
        return 0
    # no bias: a row without text adds exactly nothing to the time embedding
    net.text_pool = _zero_(nn.Linear(encoder.context_dim, emb_dim, bias=False))
    return encoder.context_dim


def ddpm_cifar10(**overrides) -> UNet:
    """DDPM's CIFAR-10 net (Ho et al. 2020, Appendix B), 35.7M parameters; `overrides` replace
    any UNet argument (e.g. num_classes=10).
    """
    config = dict(
        in_channels=3,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_levels=(1,),
        num_heads=1,
        bottleneck_blocks=2,
        mid_attention=True,
        dropout=0.1,
    )
    return UNet(**{**config, **overrides})
