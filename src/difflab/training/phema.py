"""Power-function EMA profiles, tracked during training, and their snapshots for post-hoc EMA.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
Sec. 3 and Appendix C. A power-function EMA weighs the weights theta_tau of step tau <= t by
(Eq. 121)

    p(tau; t, gamma) = (gamma + 1) tau^gamma / t^(gamma + 1)        on [0, t],

so its length grows with training. Its width relative to t is sigma_rel (Eq. 123):

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

Tracking it needs only one copy per profile, updated every step with (Eq. 127, one step = 1)

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1).

Unrolled, step tau gets weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1) exactly (the
products of beta telescope), the discrete form of p. Snapshots of every profile every
`train.phema_every` steps are what `difflab ema` later combines into any other sigma_rel
(posthoc.py).

Names: t is the optimizer step counted from 1 (the weights after the first update are t = 1).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from difflab.errors import ConfigError
from difflab.files import replace_atomically

# gamma > 0: the profile never weighs an earlier step more than a later one, and sigma_rel is
# one-to-one in gamma there; gamma = 0 (a uniform average of all steps) has sigma_rel = 1/sqrt(12).
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
SNAPSHOT_FOLDER = "phema"  # RUN/phema/step-<N>.safetensors


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent gamma
    (EDM2 Eq. 123). Args: gamma > -1. Returns: sigma_rel > 0."""
    gamma = float(gamma)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma of the profile of width sigma_rel (EDM2 Eq. 126, Algorithm 2): the
    largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + 12 - sigma_rel^-2,
    Eq. 123 squared and cleared of fractions. Args: 0 < sigma_rel < 1/sqrt(12)."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def check_sigma_rel(sigma_rel: float, name: str) -> None:
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(
            f"{name}={sigma_rel:g} is outside (0, {SIGMA_REL_MAX:.4f}): a power-function EMA "
            "is at most as wide as the plain average of every step (sigma_rel = 1/sqrt(12)); "
            "EDM2 uses 0.05 to 0.10"
        )


def power_beta(gamma: float, t: int) -> float:
    """beta_t of EDM2 Eq. 127 for step t >= 1 (0 at t = 1: the first update copies)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def check_config(train) -> list[str]:
    """Problems of train.phema_sigma_rels and train.phema_every (for check_train_config)."""
    rels, problems = tuple(train.phema_sigma_rels), []
    for s in rels:
        if not 0.0 < s < SIGMA_REL_MAX:
            problems.append(
                f"train.phema_sigma_rels holds {s:g}, outside (0, {SIGMA_REL_MAX:.4f}) (EDM2 "
                "keeps 0.05,0.10)"
            )
    if len(set(rels)) != len(rels):
        problems.append(f"train.phema_sigma_rels repeats a value: {rels}")
    if rels and train.phema_every < 1:
        problems.append("train.phema_sigma_rels needs train.phema_every >= 1 (snapshot steps)")
    if train.phema_every < 0:
        problems.append(f"train.phema_every must be >= 0, got {train.phema_every}")
    return problems


class PowerEMA:
    """One frozen copy of `net` per sigma_rel, each a power-function EMA of the training steps.

    Args:
        net: the trained network (read, never changed).
        sigma_rels: the profiles' widths, each in (0, 1/sqrt(12)).
    """

    def __init__(self, net: nn.Module, sigma_rels: tuple[float, ...]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_of(s) for s in self.sigma_rels)
        self.models = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: nn.Module, t: int) -> None:
        """Average in the weights after step t (counted from 1)."""
        params = [p.detach() for p in net.parameters()]
        for gamma, model in zip(self.gammas, self.models, strict=True):
            beta = power_beta(gamma, t)
            ema_params = list(model.parameters())
            if beta == 0.0:
                torch._foreach_copy_(ema_params, params)
            else:
                torch._foreach_lerp_(ema_params, params, 1.0 - beta)
            for b_ema, b in zip(model.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every profile's weights, keyed "<profile index>.<name>" (CPU, contiguous)."""
        return {
            f"{i}.{k}": v.detach().contiguous().cpu()
            for i, model in enumerate(self.models)
            for k, v in model.state_dict().items()
        }

    def save_snapshot(self, run_dir: Path, step: int) -> Path:
        """RUN/phema/step-<step>.safetensors, written atomically: every profile's weights, and
        the step and sigma_rels in its metadata."""
        path = Path(run_dir) / SNAPSHOT_FOLDER / f"step-{step}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        # one metadata key: safetensors writes several in a random order, so the same snapshot
        # would not be the same bytes
        meta = {"phema": json.dumps({"step": step, "sigma_rels": list(self.sigma_rels)})}
        tensors = self.tensors()
        replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    def state_dict(self) -> dict:
        profiles = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.models]
        return {"sigma_rels": list(self.sigma_rels), "profiles": profiles}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["sigma_rels"]) != self.sigma_rels:
            raise ConfigError(
                f"the checkpoint tracks sigma_rels {tuple(state['sigma_rels'])}, the config "
                f"{self.sigma_rels}; resume with the run's own train.phema_sigma_rels"
            )
        for model, weights in zip(self.models, state["profiles"], strict=True):
            model.load_state_dict(weights)
