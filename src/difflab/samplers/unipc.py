"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data prediction.

With lam = log(alpha / sigma), h = lam_s - lam_t and f(lam) the data prediction (see
dpm_solver.py for the exact step), one step of order p from t to s uses earlier points
lam_m = lam_t + r_m h (r_m < 0) and differences D_m = f(lam_m) - f(lam_t):

    x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) f(lam_t)
          + alpha_s B(h) sum_m a_m D_m / r_m,                        (UniP-p)

where a solves sum_m a_m r_m^{k-1} = k! h phi_{k+1}(-h) / B(h) for k = 1..p-1 (matching the
Taylor terms of the exact step, phi_k as in dpm_solver.py). UniC-p then evaluates the model once
at the predicted x~_s and re-does the same step with that point added (r = 1, D = f(x~_s) - f(x_t)),
solving the system for k = 1..p: one order higher (the paper's order theorem for UniC), at no
extra evaluation, because f(x~_s) is the one the next step needs anyway. As in the paper's
multistep UniPC algorithm (data-prediction form, B(h) "bh1"/"bh2"), the corrected x_s
carries on while the next step reuses f(x~_s); no correction follows the last step, so NFE =
len(ts) - 1. With a single difference (UniP-2, UniC-1) a = 1/2, as in the authors' code.

| code            | paper symbol (Zhao et al. 2023)                                  |
|-----------------|------------------------------------------------------------------|
| lam, h          | lambda_t = log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}} |
| m0              | x_theta(x_{t_{i-1}}, t_{i-1}), the data prediction at the step's start |
| points          | (lambda_{s_m}, x_theta at s_m): the other points; m - m0 = D_m   |
| rs              | r_m = (lambda_{s_m} - lambda_{t_{i-1}}) / h_i                    |
| unipc_weights   | a_p (rhos_p / rhos_c in the authors' code)                       |
| b_of_h          | B(h): "bh1" h, "bh2" 1 - e^{-h} (the paper's e^h - 1, data sign) |
| x_next, x       | x~_{t_i} (UniP output), x^c_{t_i} (after UniC)                   |
| order           | p of UniP-p; the corrected result is of order p + 1              |
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, StepState, denoise
from difflab.samplers.multistep import Step, check_grid_and_final, make_step, phi, step_orders
from difflab.samplers.noise import SampleNoise
from difflab.samplers.registry import Option, register

VARIANTS = ("bh1", "bh2")


def b_of_h(h: float, variant: str) -> float:
    """B(h) in the positive data-prediction sign: h (bh1) or 1 - e^{-h} (bh2)."""
    return h if variant == "bh1" else -math.expm1(-h)


def unipc_weights(rs: list[float], h: float, variant: str) -> list[float]:
    """a with sum_m a_m r_m^{k-1} = k! h phi_{k+1}(-h) / B(h), k = 1..len(rs); 1/2 alone."""
    if len(rs) == 1:
        return [0.5]
    ks = range(1, len(rs) + 1)
    R = np.array([[r ** (k - 1) for r in rs] for k in ks])  # (p, p), rows k, columns m
    rhs = np.array([math.factorial(k) * h * phi(k + 1, -h) for k in ks]) / b_of_h(h, variant)
    return np.linalg.solve(R, rhs).tolist()


def unified_update(
    x: Tensor, step: Step, m0: Tensor, points: list[tuple[float, Tensor]], variant: str
) -> Tensor:
    """x_s from x at t, f(lam_t) = m0 and the other (lam_m, f(lam_m)) points: UniP or UniC."""
    x_next = step.first_order(x, m0)
    if not points or step.to_data:
        return x_next
    h = step.h
    rs = [(lam - step.lam_t) / h for lam, _ in points]
    scale = step.alpha_s * b_of_h(h, variant)
    for a, r, (_, m) in zip(unipc_weights(rs, h, variant), rs, points, strict=True):
        x_next = x_next + (scale * a / r) * (m - m0)
    return x_next


@register("unipc", options=(Option("order", int, "UniPC order (1..3)", "--order"),))
@torch.no_grad()
def sample_unipc(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC-p (UniP-p with UniC after every step but the last) from x_T (B, ...) along ts.

    NFE = len(ts) - 1. The first steps warm up (UniP order 1, 2, ..., up to `order`); a last step
    to t = 0 is first order (x0_hat). The callback's x_t is the corrected state and x0_hat the
    evaluation at the predicted one; x_next is the predictor's output, which the next step corrects.

    Args:
        order: p in 1..3, the predictor's order (UniC adds one).
        variant: "bh2" (B(h) = 1 - e^{-h}) or "bh1" (B = h; diffusers' UniPC docs suggest it
            for unconditional sampling under 10 steps, "bh2" otherwise).
        lower_order_final: on grids under 15 steps ramp the order down over the last steps.
        generator: unused (deterministic).
    Returns:
        the state at ts[-1] (B, ...).
    """
    check_grid_and_final(ts, lower_order_final)
    if order not in (1, 2, 3):
        raise ConfigError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in VARIANTS:
        raise ConfigError(f"unknown UniPC variant {variant!r}; choose 'bh1' or 'bh2'")
    orders = step_orders(len(ts) - 1, order, lower_order_final)
    history: list[tuple[float, Tensor]] = []  # (lam, f) at each step's start, oldest first
    last = None  # (x, step, points) of the previous predictor, for the corrector
    x = x_T
    for i in range(len(ts) - 1):
        step = make_step(denoiser, float(ts[i]), float(ts[i + 1]))
        x0_hat, _ = denoise(denoiser, x, step.t, y, i)
        if last is not None:  # UniC: redo the previous step with this evaluation added
            x_prev, prev_step, points = last
            x = unified_update(
                x_prev, prev_step, history[-1][1], [*points, (step.lam_t, x0_hat)], variant
            )
        history = [*history, (step.lam_t, x0_hat)][-order:]
        points = history[len(history) - orders[i] : -1]  # the orders[i] - 1 earlier points
        x_next = unified_update(x, step, x0_hat, points, variant)
        if callback is not None:
            callback(StepState(i, step.t, step.s, x, x0_hat, x_next))
        last = (x, step, points)
        x = x_next
    return x
