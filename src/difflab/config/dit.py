"""The DiT's part of the config (`model.dit`, for model.name=dit; nets/dit.py, nets/mmdit.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DiTConfig:  # Peebles & Xie 2023; DiT-S is width 384, depth 12, heads 6, mlp_ratio 4
    width: int = 256  # token width (DiT's hidden size); a multiple of 4 and of heads
    depth: int = 6  # transformer blocks
    heads: int = 4  # attention heads: width / heads channels each
    mlp_ratio: float = 4.0  # the MLP's hidden width is mlp_ratio * width
    patch_size: int = 2  # p: each p x p patch of the input grid is one token
    dropout: float = 0.0  # after the attention projection and inside the MLP
    qk_norm: bool = False  # RMS-normalise queries and keys per head (SD3, Esser et al. 2024)
    checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more time
    # "" (labels or none) | joint: MMDiT (SD3), image and text tokens attend together; needs
    # data.text_conditional (nets/mmdit.py)
    text: str = ""
