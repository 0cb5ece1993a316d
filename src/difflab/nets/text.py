"""Text for the U-Net: the context encoders and the cross-attention block that reads them.

A text net's condition is either token ids (B, L) long (the built-in `CharEncoder`, trained with
the U-Net, 0 = padding) or precomputed token states (B, L, D) float of a frozen encoder with
padded positions exactly zero (`FrozenContext`). Either turns into (context (B, L, D), mask
(B, L) bool, True = a real token). A row with no real token (a zero context) adds nothing: the
cross-attention block and the pooled embedding then leave the network exactly as without them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.errors import ConfigError
from difflab.nets.layers import GroupNorm, attention


class CharEncoder(nn.Module):
    """Character embeddings, learned positions and a few pre-norm transformer layers (Vaswani
    et al. 2017), trained jointly with the U-Net: ids (B, L) -> context (B, L, width), mask.

    Args:
        vocab_size: ids the tokenizer makes (0 = padding).
        width: the context dimension D.
        layers, heads: transformer depth and attention heads (heads divides width).
        max_tokens: L, the longest sequence (positions embedded).
    """

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"model.text.heads={heads} must divide model.text.width={width}")
        self.context_dim = width
        self.tokens = nn.Embedding(vocab_size, width, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        if ids.is_floating_point():
            raise ValueError("the built-in text encoder takes token ids (B, L), not embeddings")
        mask = ids != 0  # (B, L)
        h = self.tokens(ids) + self.positions[: ids.shape[1]]  # (B, L, D)
        h = self.layers(h, src_key_padding_mask=~mask)
        return self.norm(h) * mask[..., None], mask


class FrozenContext(nn.Module):
    """Token states of a frozen encoder, computed outside the network (and cached): the
    condition is the context; padded positions are exactly zero, which is the mask."""

    def __init__(self, context_dim: int):
        super().__init__()
        self.context_dim = context_dim

    def forward(self, context: Tensor) -> tuple[Tensor, Tensor]:
        if not context.is_floating_point() or context.dim() != 3:
            raise ValueError(
                f"a frozen-encoder net takes token states (B, L, D), got {context.shape}"
            )
        return context, context.ne(0).any(dim=-1)


def pooled(context: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real tokens' states (B, D); 0 for a row without any."""
    m = mask[..., None].to(context.dtype)
    return (context * m).sum(1) / m.sum(1).clamp(min=1)


class CrossAttentionBlock(nn.Module):
    """Pixels attend to the text tokens (Rombach et al. 2022, eq. 3: Attention(Q, K, V) with
    Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y)), plus the input.

    K, V and the output projection have no bias and the output starts at zero, so at init, and
    for a row with no real token whatever the weights, the block is exactly the identity.
    Shapes: h (B, C, H, W), context (B, L, D), mask (B, L) -> (B, C, H, W).
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, C, H, W = h.shape
        heads, L = self.num_heads, context.shape[1]
        q = self.q(self.norm(h)).reshape(B, heads, C // heads, H * W).transpose(-1, -2)
        kv = self.kv(self.context_norm(context)).reshape(B, L, 2, heads, C // heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, C // heads)
        some = mask.any(dim=1)  # (B,): rows with at least one real token
        attend = (mask | ~some[:, None])[:, None, None, :]  # (B, 1, 1, L): no all-masked row
        out = attention(q, k.to(q.dtype), v.to(q.dtype), attend)
        out = out * some[:, None, None, None].to(out.dtype)  # (B, heads, HW, C // heads)
        return h + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


def text_encoder(text_cfg, encoder) -> nn.Module:
    """The net's text module for model.text: a CharEncoder over `encoder`'s ids (trained with
    the net, so checkpointed and EMA'd with it) or FrozenContext of its states."""
    if text_cfg.encoder == "char":
        t = text_cfg
        return CharEncoder(encoder.vocab_size, t.width, t.layers, t.heads, t.max_tokens)
    return FrozenContext(encoder.context_dim)
