"""Couplings: which noise eps each clean example x0 is paired with in a training batch.

- independent: x0 and eps drawn apart, plain flow matching / diffusion (Lipman et al. 2023).
- reflow: the noise stored with each (noise, ODE endpoint) pair (reflow.py; Liu et al. 2023).
- ot: mini-batch optimal transport (Tong et al. 2023, "Improving and generalizing flow-based
  generative models with minibatch optimal transport", Sec. 3.2 and Algorithm 2, OT-CFM): the
  batch's noise is permuted so that sum_i ||x0_i - eps_pi(i)||^2 is minimal, an exact assignment
  (scipy.optimize.linear_sum_assignment, the Hungarian method's O(B^3) successor), so paths
  cross less and a trained flow is straighter.

A coupling permutes the noise of the *global* batch before the trainer slices it between
processes (training/step.py), so N processes pair exactly as one does.

| code     | paper symbol (Tong et al. 2023)          |
|----------|------------------------------------------|
| x0, eps  | x1 ~ q(x1) (data), x0 ~ q(x0) (noise)    |
| cost     | c(x0, x1) = ||x0 - x1||^2                |
| perm     | the OT plan pi on the batch (a permutation) |
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from difflab.errors import ConfigError

COUPLINGS = ("independent", "ot", "reflow")
# Exact assignment costs O(B^3): 2048 points take ~0.3 s on one CPU core, 4096 take ~3 s.
OT_MAX_BATCH = 2048


def check_coupling(name: str, batch: int, pairs: str = "", latent: bool = False) -> str:
    """Refuse an unknown coupling, an OT batch too large for an exact assignment per step,
    reflow's stored pairs without a pairs folder (`pairs` is data.pairs) and the reverse, and a
    data-dependent coupling in a latent run (`latent`: model.codec is set)."""
    if name not in COUPLINGS:
        raise ConfigError(f"unknown coupling {name!r}; choose one of {', '.join(COUPLINGS)}")
    if latent and name != "independent":
        # the coupling sees the batch before the codec encodes it (pixels, or cached moments),
        # while the noise has the latents' shape: pairing them would mean nothing
        raise ConfigError(
            f"diffusion.coupling={name} pairs noise with the data as the stream gives it, and "
            "a latent run's noise lives in the autoencoder's latent space; use "
            "diffusion.coupling=independent with model.codec"
        )
    if (name == "reflow") != bool(pairs):
        raise ConfigError(
            "diffusion.coupling=reflow and data.pairs=FOLDER go together (the stored pairs' "
            "noise is the coupling): `difflab reflow RUN` sets both"
        )
    if name == "ot" and batch > OT_MAX_BATCH:
        raise ConfigError(
            f"diffusion.coupling=ot solves an exact {batch} x {batch} assignment every step "
            f"(O(B^3): about 3 s at 4096); use micro-batches of at most {OT_MAX_BATCH} "
            f"(train.batch_size <= {OT_MAX_BATCH}, or train.grad_accum = "
            f"{-(-batch // OT_MAX_BATCH)} or more)"
        )
    return name


def ot_permutation(x0: Tensor, eps: Tensor) -> Tensor:
    """The permutation perm (B,) minimising sum_i ||x0_i - eps_perm[i]||^2 (exact).

    Args:
        x0: clean batch (B, ...).
        eps: noise batch of the same shape.
    Returns:
        perm (B,) int64: eps[perm] is the noise paired with x0.
    """
    a = x0.reshape(len(x0), -1).double()
    b = eps.reshape(len(eps), -1).double()
    cost = torch.cdist(a, b).pow(2).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def couple(name: str, x0: Tensor, eps: Tensor) -> Tensor:
    """The noise paired with x0 under coupling `name`: eps itself, or eps permuted by OT."""
    if name == "independent":
        return eps
    if x0.shape != eps.shape:
        raise ConfigError(
            f"OT coupling pairs data and noise of one shape; the batch is {tuple(x0.shape)} and "
            f"its noise {tuple(eps.shape)} (a codec's latent): use diffusion.coupling=independent"
        )
    return eps[ot_permutation(x0, eps).to(eps.device)]
