"""Losses as objects: what the trainer calls, whatever the model family (EDM's
`training/loss.py` has one class per formulation; so do we).

    loss.draw(shape, generator)                       -> noise: tensors of the global batch
    loss.couple(x0, noise, data)                      -> noise paired with the global batch
    loss(model, x0, cond, noise=..., step=..., target=...) -> (per-example loss (B,), t (B,))

Every loss is a `loss_base.Loss`, which declares what a loss may need from the trainer (a
teacher, a target network, trainable state, the judge) with defaults of "nothing".

`draw` and `couple` are separate so that several processes can draw (and pair) the noise of the
global batch and each keep its slice (training/distributed: N processes equal one). A loss may
declare a target network through `target_decay(step)`: None (no target), 0 (a stop-gradient copy
of the online network, refreshed every step) or a decay in (0, 1) (an EMA of it, e.g. consistency
training's mu(k)); the trainer keeps that network, updates it after each optimizer step,
checkpoints it and restores it on resume, and passes it as `target`.

Adding a loss: a `Loss` subclass with draw and __call__ (and whatever else it needs from the
base), registered in `build.LOSSES`.
"""

from __future__ import annotations

from torch import Tensor

from difflab.diffusion.couplings import couple
from difflab.diffusion.loss_base import Loss
from difflab.diffusion.objectives import LossSpec, diffusion_loss, draw_noise


class DiffusionLoss(Loss):
    """The denoising loss (Ho et al. 2020, eq. 14, generalised): t and eps drawn per example,
    x_t = alpha x0 + sigma eps, the denoiser's error in `spec.target` space, weighted in x0
    space (objectives.py says how). On a flow path with target velocity it is the
    flow-matching loss; `coupling` pairs x0 with eps (couplings.py, or "reflow": the data stream's
    stored noise of each (noise, endpoint) pair, Liu et al. 2023, Algorithm 1)."""

    def __init__(self, spec: LossSpec, schedule, coupling: str = "independent"):
        self.spec, self.schedule, self.coupling = spec, schedule, coupling

    def draw(self, shape: tuple[int, ...], generator) -> tuple[Tensor, Tensor]:
        """(t (B,), eps (B, ...)) for a global batch of `shape`, from `generator`."""
        return draw_noise(self.schedule, shape, self.spec, generator)

    def couple(self, x0: Tensor, noise, data) -> tuple[Tensor, Tensor]:
        """The noise of the global batch x0 (B, ...) paired by the coupling (before slicing)."""
        t, eps = noise
        if self.coupling == "reflow":
            return t, data.paired_noise.to(eps.dtype)
        return t, couple(self.coupling, x0, eps)

    def __call__(self, model, x0: Tensor, cond, *, noise, step: int, target=None):
        return diffusion_loss(model.denoiser, x0, cond, self.spec, noise=noise)
