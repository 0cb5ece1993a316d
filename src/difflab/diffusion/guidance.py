"""Classifier-free guidance (Ho & Salimans 2022, eq. 6): a denoiser in, a denoiser out.

    raw_guided = raw_uncond + w (raw_cond - raw_uncond)

w = guidance_scale: 0 gives the unconditional model, 1 the conditional one, > 1 sharper classes.
The combination is done on the network's raw output; every prediction kind turns raw into
(x0_hat, eps_hat) by a map that is affine in raw for fixed (x_t, t), so guiding raw is the same as
guiding eps, x0 or v, and x0 clipping then acts on the guided result. Both branches run as one
doubled batch: one network call per step, not two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.diffusion.prediction import Denoiser


class GuidedNet:
    """`net(x_t, t, cond)` evaluated with the condition and with the null condition, then
    combined; the conditioner makes the null condition and the doubled batch, so this works
    for any condition (class labels, token embeddings).

    Args:
        net: a conditional network trained with condition dropout.
        guidance_scale: w above; >= 0.
        conditioner: the network's conditioner (`null_like`, `cat`: conditioners.py).
    """

    def __init__(self, net, guidance_scale: float, conditioner):
        if guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        self.net, self.guidance_scale, self.conditioner = net, guidance_scale, conditioner

    def __call__(self, x_t: Tensor, t: Tensor, y=None) -> Tensor:
        if y is None:
            raise ValueError(
                "classifier-free guidance needs class labels y; pass --class or --per-class"
            )
        w, c = self.guidance_scale, self.conditioner
        null = c.null_like(y)
        if w == 0:
            return self.net(x_t, t, null)
        if w == 1:
            return self.net(x_t, t, y)
        raw = self.net(_twice(x_t), _twice(t), c.cat(y, null))
        raw_cond, raw_uncond = raw.chunk(2)
        return raw_uncond + w * (raw_cond - raw_uncond)


def _twice(x: Tensor) -> Tensor:
    """x twice along the batch: the doubled batch's inputs (memory format kept)."""
    return torch.cat([x, x])


def guided(denoiser: Denoiser, guidance_scale: float, conditioner) -> Denoiser:
    """The denoiser of `denoiser`'s network under classifier-free guidance.

    Args:
        denoiser: wraps a conditional network trained with condition dropout.
        guidance_scale: 0 = unconditional, 1 = conditional, > 1 = guided.
        conditioner: the network's conditioner (conditioners.py).
    """
    if not conditioner.conditional:
        raise ValueError(
            "guidance needs a class-conditional model; this one was trained without labels "
            "(model.num_classes = 0)"
        )
    net = GuidedNet(denoiser.net, guidance_scale, conditioner)
    return denoiser.with_net(net)
