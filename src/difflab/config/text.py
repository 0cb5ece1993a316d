"""The text encoder's part of the config (model.text), for runs with data.text_conditional."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextConfig:
    # char (built in, trained with the U-Net) | minilm (frozen all-MiniLM-L6-v2; difflab[text])
    encoder: str = "char"
    max_tokens: int = 48  # tokens read per prompt; longer prompts are truncated with a warning
    width: int = 128  # char: the context dimension (minilm's is 384)
    layers: int = 2  # char: transformer layers
    heads: int = 4  # char: attention heads
