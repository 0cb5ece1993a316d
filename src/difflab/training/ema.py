"""Exponential moving average of weights, used for sampling by default.

theta_ema <- d theta_ema + (1 - d) theta. With warm-up the decay starts low so the average is not
anchored to the random initial weights: d_k = min(decay, (1 + k) / (10 + k)) (the schedule of
TensorFlow's ExponentialMovingAverage with num_updates, used by DDPM's code).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from difflab.errors import ConfigError


class EMA:
    """Keeps a frozen copy of `model` and averages into it.

    Args:
        model: the trained network (its parameters and buffers are read, never changed).
        decay: the target decay in [0, 1]; 0 copies the model, 1 keeps the initial weights.
        warmup: use the warm-up schedule above.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Average `model` in; returns the decay used."""
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if d == 0.0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1
        return d

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup = state["decay"], state["warmup"]
        self.num_updates = int(state["num_updates"])
