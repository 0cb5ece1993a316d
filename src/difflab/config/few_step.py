"""The few-step sections of a run's config: shortcut models and MeanFlow
(`--set train.loss=shortcut`, `--set shortcut.bootstrap_fraction=0.25`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShortcutConfig:
    """Shortcut models (Frans et al. 2024; diffusion/few_step_losses.py)."""

    max_steps: int = 128  # the finest step 1 / max_steps (a power of two): the grid of d
    bootstrap_fraction: float = 0.25  # k: the share of the batch on the self-consistency target


@dataclass
class MeanFlowConfig:
    """MeanFlow (Geng et al. 2025; diffusion/few_step_losses.py)."""

    fraction: float = 0.25  # the share of (t, r) pairs with r != t (the rest: flow matching)
    times: str = "logit_normal"  # (t, r): two draws, sorted, of logit_normal | uniform
    loc: float = -0.4  # logit_normal: sigmoid(N(loc, scale^2))
    scale: float = 1.0
    power: float = 1.0  # adaptive weight 1 / (||err||^2 + constant)^power (0 = plain MSE)
    constant: float = 1e-3
    # guidance folded into the target (Sec. 4.2 and App. B.1): v~ = omega v + kappa u(c)
    # + (1 - omega - kappa) u(null), an effective CFG scale omega / (1 - kappa) that the net
    # learns, so a guided sample costs one call; omega 1, kappa 0 = none (class labels needed)
    omega: float = 1.0
    kappa: float = 0.0
    guidance_t_start: float = 0.0  # folded only where t is in [start, end] (t = 1 is noise)
    guidance_t_end: float = 1.0
