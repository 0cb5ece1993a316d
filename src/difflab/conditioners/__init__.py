"""Conditioners: what a model is conditioned on, and everything that depends on what it is.

A conditioner turns a data set's raw condition (class labels, or captions: `text.py`) into what
the network receives through its one argument `net(x_t, t, cond)`, owns the null condition
(the "no condition" of classifier-free guidance), its dropout at training time, the conditions
of a sampling request (one class, balanced, drawn), and the doubled batch of guidance. Nothing
outside a conditioner and the network knows what a condition is.

Adding one: copy `ClassLabels` (or `text.TextConditioner`, which hands the network a sequence
of token states for cross-attention), keep its methods' meaning, and choose it in
`build.build_conditioner`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import ConfigError


class Unconditional:
    """No condition: the network is called with cond=None."""

    conditional = False
    num_classes = 0
    class_names: tuple[str, ...] = ()

    def train_condition(self, y: Tensor | None, generator, device) -> None:
        return None

    def request(self, n: int, *, class_label=None, per_class=False, seed=0) -> None:
        if class_label is not None or per_class:
            raise ConfigError(
                "an unconditional model has no classes; --class and --per-class need one "
                "trained with data.class_conditional=true"
            )
        return None

    def balanced(self, n: int) -> None:
        return None

    def check_guidance(self, guidance_scale: float) -> None:
        if guidance_scale != 1.0:
            raise ConfigError(
                f"guidance {guidance_scale} asked of an unconditional model; guidance needs "
                "one trained with data.class_conditional=true"
            )


class ClassLabels:
    """Integer class labels (B,) in [0, num_classes); the null label is num_classes.

    Args:
        num_classes: classes the network embeds (it also embeds the null label).
        class_names: a name per class, for figures.
        dropout: the share of training labels replaced by the null label, so one network also
            learns the unconditional model guidance needs (Ho & Salimans 2022, Algorithm 1).
    """

    conditional = True

    def __init__(self, num_classes: int, class_names=(), dropout: float = 0.0):
        if num_classes < 1:
            raise ConfigError(f"class labels need num_classes >= 1, got {num_classes}")
        self.num_classes, self.dropout = num_classes, dropout
        self.class_names = tuple(class_names) or tuple(str(k) for k in range(num_classes))
        self.null_label = num_classes

    def train_condition(self, y: Tensor, generator: torch.Generator, device) -> Tensor:
        """Labels for a training batch: a `dropout` share drawn from `generator` made null."""
        if self.dropout > 0:
            drop = torch.rand(y.shape, generator=generator) < self.dropout
            y = torch.where(drop, self.null_label, y)
        return y.to(device)

    def request(
        self, n: int, *, class_label: int | None = None, per_class: bool = False, seed: int = 0
    ) -> Tensor:
        """Labels (n,) of a sampling request: one class, n / num_classes of each in order, or
        uniformly drawn (seeded)."""
        k = self.num_classes
        if class_label is not None:
            if not 0 <= class_label < k:
                raise ConfigError(
                    f"--class {class_label} is out of range; this model has classes 0..{k - 1}"
                )
            return torch.full((n,), class_label, dtype=torch.long)
        if per_class:
            if n % k:
                raise ConfigError(
                    f"--per-class needs --n to be a multiple of the {k} classes, got {n}; "
                    f"try --n {n - n % k or k}"
                )
            return torch.arange(k).repeat_interleave(n // k)
        return torch.randint(k, (n,), generator=torch.Generator().manual_seed(seed))

    def balanced(self, n: int) -> Tensor:
        """Every class equally often, to within one (arange(n) % num_classes), as the data
        sets are: class frequencies drawn at random move FD by themselves (MNIST preset,
        n = 1,000: 7.8 balanced, 11.5 random)."""
        return torch.arange(n) % self.num_classes

    def check_guidance(self, guidance_scale: float) -> None:
        if guidance_scale < 0:
            raise ConfigError(f"guidance scale must be >= 0, got {guidance_scale}")

    def null_like(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.null_label)

    def is_null(self, cond: Tensor) -> Tensor:
        """(B,) bool: the rows whose label is the null label (dropped at training)."""
        return cond == self.null_label

    def cat(self, a: Tensor, b: Tensor) -> Tensor:
        """One batch of two conditions (guidance's doubled batch)."""
        return torch.cat([a, b])
