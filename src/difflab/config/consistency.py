"""The consistency section of a run's config (`--set consistency.teacher=runs/x`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConsistencyConfig:
    """Consistency models (train.loss = ct | ict | ect | cd; diffusion/consistency_losses.py)."""

    teacher: str = ""  # ect / cd: a trained difflab diffusion run directory
    init_from_teacher: bool = True  # ect / cd: the student starts from the teacher's EMA weights
    solver: str = "heun"  # cd: the teacher's step, any sampler (euler/heun/dpm_2s batched)
    solver_substeps: int = 1  # cd: solver steps between two levels (geometric in sigma / alpha)
    teacher_guidance: float = 1.0  # cd, class-conditional teacher: distil it guided at this scale
    distance: str = "pseudo_huber"  # pseudo_huber | l2 (squared, mean over elements)
    huber_c: float = -1.0  # pseudo-Huber c; < 0 = 0.00054 sqrt(d) (Song & Dhariwal 2023)
    s0: int = 10  # ct / ict: initial number of discretisation steps
    s1: int = 1280  # ct / ict: final number
    mu0: float = 0.9  # ct: initial target EMA rate
    num_levels: int = 18  # cd: discretisation steps N (fixed)
    levels: str = "grid"  # cd: grid (the N Karras levels) | jitter (the grid at a random offset)
    target_ema: float = 0.0  # cd: target EMA rate (0 = a stop-gradient copy)
    weighting: str = "one"  # cd: lambda = 1 (Song et al. 2023) | inverse_gap (iCT's lambda)
    rho: float = 7.0  # Karras grid of noise levels
    p_mean: float = -1.1  # ict / ect: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 2.0
    ect_q: float = 2.0  # ect: r(t) = t (1 - q^-(stage + 1) (1 + k sigmoid(-b t)))
    ect_k: float = 8.0
    ect_b: float = 1.0
    stage_steps: int = 0  # ect: steps per stage; 0 = train.steps / 4
