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

from difflab.prediction import Denoiser


class GuidedNet:
    """`net(x_t, t, y)` evaluated with labels y and with the null label, then combined.

    Args:
        net: a class-conditional network whose label `null_label` means "no label".
        guidance_scale: w above; >= 0.
        null_label: the unconditional label index (difflab nets use num_classes).
    """

    def __init__(self, net, guidance_scale: float, null_label: int):
        if guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        self.net, self.guidance_scale, self.null_label = net, guidance_scale, null_label

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            raise ValueError(
                "classifier-free guidance needs class labels y; pass --class or --per-class"
            )
        w = self.guidance_scale
        null = torch.full_like(y, self.null_label)
        if w == 0:
            return self.net(x_t, t, null)
        if w == 1:
            return self.net(x_t, t, y)
        raw = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        raw_cond, raw_uncond = raw.chunk(2)
        return raw_uncond + w * (raw_cond - raw_uncond)


def guided(denoiser: Denoiser, guidance_scale: float, num_classes: int) -> Denoiser:
    """The denoiser of `denoiser`'s network under classifier-free guidance.

    Args:
        denoiser: wraps a class-conditional network trained with label dropout.
        guidance_scale: 0 = unconditional, 1 = conditional, > 1 = guided.
        num_classes: the network's number of classes; its null label is num_classes.
    """
    if num_classes < 1:
        raise ValueError(
            "guidance needs a class-conditional model; this one was trained without labels "
            "(model.num_classes = 0)"
        )
    net = GuidedNet(denoiser.net, guidance_scale, num_classes)
    return denoiser.with_net(net)
