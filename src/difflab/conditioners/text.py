"""Text prompts as conditions: token ids for the built-in encoder, or a frozen encoder's token
states, (B, L[, D]), with the empty prompt as the null condition of classifier-free guidance.

Training: each label y of the stream becomes one of its captions (`data.captions.CaptionSet`:
a template drawn per example, or a folder image's own caption), whose conditions were computed
once (for a frozen encoder: cached on disk under the encoder's weights hash and the captions);
a `dropout` share becomes the empty prompt. Sampling: `prompts([...])` encodes any sentences;
over-long ones are truncated with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from difflab.conditioners.encoders import CharTokenizer, MiniLMEncoder, cached_states
from difflab.data.captions import class_names_of, prompts_for
from difflab.errors import ConfigError

ENCODERS = ("char", "minilm")


def text_cache_dir() -> Path:
    """$DIFFLAB_CACHE/text, else ~/.cache/difflab/text (as the reference-feature cache)."""
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab") / "text"


def make_encoder(name: str, max_tokens: int, device="cpu"):
    """The tokenizer or frozen encoder `model.text.encoder` names."""
    if name not in ENCODERS:
        raise ConfigError(
            f"unknown model.text.encoder {name!r}; choose one of {', '.join(ENCODERS)}"
        )
    if max_tokens < 2:
        raise ConfigError(f"model.text.max_tokens must be >= 2, got {max_tokens}")
    return CharTokenizer(max_tokens) if name == "char" else MiniLMEncoder(max_tokens, device)


class TextConditioner:
    """Prompts -> conditions (B, L) ids or (B, L, D) states; null = the empty prompt.

    Args:
        encoder: a CharTokenizer or MiniLMEncoder (`make_encoder`).
        dropout: the share of training captions replaced by the empty prompt (Ho & Salimans
            2022, Algorithm 1), so one network also learns the unconditional model.
        class_names: the data's classes when its captions come from labels (figures, the
            class each default prompt names), else empty.
        dataset: mnist or fashion when captions come from labels (their templates), else "".
    """

    conditional = True
    num_classes = 0  # the network embeds no labels: it reads text

    def __init__(self, encoder, dropout: float = 0.0, class_names=(), dataset: str = ""):
        self.encoder, self.dropout = encoder, dropout
        self.class_names, self.dataset = tuple(class_names), dataset
        self.null = encoder.encode([""])[0][0]  # (L[, D])
        self.table, self.captions = None, None

    def fit(self, captions) -> None:
        """Compute (or read from the cache) the conditions of a data set's CaptionSet."""
        self.captions = captions
        if isinstance(self.encoder, CharTokenizer):
            self.table = self.encoder.encode(captions.captions)[0]
        else:
            self.table = cached_states(self.encoder, captions.captions, text_cache_dir())

    def train_condition(self, y: Tensor, generator: torch.Generator, device) -> Tensor:
        """Conditions of a training batch's labels y (B,): a caption each, a `dropout` share
        made the empty prompt (both drawn from `generator`)."""
        if self.table is None:
            raise RuntimeError("TextConditioner.fit(captions) must come before training")
        y = y.cpu()  # GPU-resident data: the caption tables stay on the CPU
        cond = self.table[self.captions.draw(y, generator)]
        if self.dropout > 0:
            drop = torch.rand(y.shape, generator=generator) < self.dropout
            cond = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), self.null, cond)
        return cond.to(device)

    def prompts(self, prompts: list[str]) -> Tensor:
        """Conditions (n, L[, D]) of sentences; over-long ones are truncated with a warning."""
        cond, truncated = self.encoder.encode(list(prompts))
        for i in truncated:
            warnings.warn(
                f"prompt {prompts[i]!r} is longer than the {self.encoder.max_tokens} tokens the "
                "model reads; it was truncated",
                stacklevel=2,
            )
        return cond

    def default_prompts(self, n: int) -> list[str]:
        """n prompts naming classes 0, 1, ... in turn (the first training template), or n
        empty prompts when the captions do not come from labels."""
        if not self.dataset:
            return [""] * n
        return prompts_for(self.dataset, torch.arange(n) % len(self.class_names))

    def request(self, n: int, *, class_label=None, per_class=False, seed=0) -> Tensor:
        """The default prompts of n samples (`default_prompts`; per_class: in blocks of one
        class each, for figures). Class labels are refused: this model reads text."""
        if class_label is not None:
            raise ConfigError(
                "this model is conditioned on text, not class labels; leave out --class and "
                'pass --prompt "..." or --prompts-file FILE'
            )
        if not per_class:
            return self.balanced(n)
        k = len(self.class_names) or 1
        first = self.default_prompts(k)  # one prompt per class
        return self.prompts([first[j * k // n] for j in range(n)])

    def balanced(self, n: int) -> Tensor:
        """Every class's prompt equally often (arange(n) % classes), as ClassLabels.balanced."""
        return self.prompts(self.default_prompts(n))

    def balanced_classes(self, n: int) -> Tensor | None:
        """The classes `balanced(n)`'s prompts name (n,), or None without classes."""
        return torch.arange(n) % len(self.class_names) if self.class_names else None

    def check_guidance(self, guidance_scale: float) -> None:
        if guidance_scale < 0:
            raise ConfigError(f"guidance scale must be >= 0, got {guidance_scale}")

    def null_like(self, cond: Tensor) -> Tensor:
        return self.null.to(cond.device).expand_as(cond)

    def is_null(self, cond: Tensor) -> Tensor:
        """(B,) bool: the rows that are the empty prompt (dropped at training)."""
        return (cond == self.null_like(cond)).flatten(1).all(dim=1)

    def cat(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b])


def text_conditioner(text_cfg, dropout: float, dataset: str) -> TextConditioner:
    """The conditioner of a text run: its encoder (model.text), prompt dropout, and for mnist
    and fashion the classes their captions name."""
    names = class_names_of(dataset)
    encoder = make_encoder(text_cfg.encoder, text_cfg.max_tokens)
    return TextConditioner(encoder, dropout, names, dataset if names else "")
