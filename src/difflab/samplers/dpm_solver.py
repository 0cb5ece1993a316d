"""DPM-Solver++ (Lu et al. 2022b): 2M, 3M, 2M-SDE and 2S, in data-prediction form, any schedule.

With lam = log(alpha / sigma) (half of `Schedule.log_snr`) and f(lam) = x0_hat(x_lam, lam), the
probability-flow ODE has the exact step from t to s < t (variation of constants, Lu et al. 2022b,
data-prediction form), h = lam_s - lam_t > 0:

    x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^{-(h - tau)} f(lam_t + tau) dtau
        = (sigma_s / sigma_t) x_t + alpha_s sum_k h phi_{k+1}(-h) [h^k f^(k)(lam_t)],

phi_k(z) = sum_j z^j / (j + k)!. Order p keeps k < p and estimates h^k f^(k) from the last p
model outputs (multistep, one evaluation a step) or from an extra evaluation inside the step
(singlestep 2S). The SDE family with noise scale eta (eta = 0: the ODE; eta = 1: the reverse SDE
of SDE-DPM-Solver++, Lu et al. 2022b) has the same form with nu = (1 + eta) h in the weights:

    x_s = (sigma_s / sigma_t) e^{-eta h} x_t + alpha_s sum_k nu phi_{k+1}(-nu) [h^k f^(k)]
          + sigma_s sqrt(1 - e^{-2 eta h}) z.

| code          | paper symbol (Lu et al. 2022b)                                    |
|---------------|-------------------------------------------------------------------|
| lam           | lambda_t = log(alpha_t / sigma_t) = log_snr(t) / 2                 |
| h             | h_i = lambda_{t_i} - lambda_{t_{i-1}}                             |
| r             | r_i = h_{i-1} / h_i (2M); r_1 = 1/2 for the 2S midpoint            |
| x0_hat, m0    | x_theta(x_t, t), the data prediction at the current step          |
| D1, D2        | estimates of h f'(lam_t), h^2 f''(lam_t)                          |
| phi(k, z)     | phi_k(z), the exponential-integrator functions                    |
| eta, nu       | SDE noise scale; nu = (1 + eta) h                                 |

The last step to t = 0 (sigma = 0, lam = +inf, h = inf) cannot use differences in lam, so it is
a first-order step, which there is exactly x_0 = x0_hat (k-diffusion and diffusers do the same).
A grid ending at ts[-1] > 0 just stops there at full order.

The machinery shared with UniPC (`Step`, `make_step`, `phi`, `step_orders`, the multistep loop
and its checks) is in multistep.py; this file re-exports it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, StepState, denoise
from difflab.samplers.multistep import (  # noqa: F401  (re-exported: they lived here)
    LOWER_ORDER_FINAL_BELOW,
    Step,
    _multistep,
    check_grid,
    check_grid_and_final,
    lam_at,
    make_step,
    phi,
    step_orders,
)
from difflab.samplers.noise import SampleNoise, as_noise
from difflab.samplers.registry import register

SOLVER_TYPES = ("midpoint", "heun")


def derivatives(history: list[tuple[float, Tensor]], h: float, order: int) -> list[Tensor]:
    """[h f', h^2 f''][: order - 1] at the newest of the (lam, x0_hat) pairs (oldest first), by
    divided differences of the last `order`; errors O(h^order) (order 2: Lu et al. 2022b Alg. 2)."""
    if order == 1:
        return []
    (lam_0, m0), (lam_1, m1) = history[-1], history[-2]
    r0 = (lam_0 - lam_1) / h
    d1_0 = (m0 - m1) / r0  # h f' + O(h^2)
    if order == 2:
        return [d1_0]
    lam_2, m2 = history[-3]
    r1 = (lam_1 - lam_2) / h
    d1_1 = (m1 - m2) / r1
    d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # h^2 f'' + O(h^3)
    return [d1_0 + r0 / 2 * d2, d2]  # h f' + O(h^3)


def multistep_update(
    x: Tensor,
    step: Step,
    history: list[tuple[float, Tensor]],
    order: int,
    eta: float = 0.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """The deterministic part of one DPM-Solver++ multistep step (plus the e^{-eta h} factor of
    the SDE family); `history` ends with (lam_t, x0_hat at t)."""
    m0 = history[-1][1]
    if step.to_data:
        return step.first_order(x, m0)
    h = step.h
    nu = (1 + eta) * h
    x_next = (step.sigma_s / step.sigma_t) * math.exp(-eta * h) * x
    x_next = x_next + step.alpha_s * nu * phi(1, -nu) * m0
    terms = derivatives(history, h, order)
    weights = [nu * phi(k + 2, -nu) for k in range(len(terms))]
    if order == 2 and solver_type == "midpoint":  # Alg. 2: D = x0 + D1 / 2, weight h phi_1 / 2
        weights[0] = 0.5 * nu * phi(1, -nu)
    for weight, term in zip(weights, terms, strict=True):
        x_next = x_next + step.alpha_s * weight * term
    return x_next


def _check_solver_type(solver_type: str) -> None:
    if solver_type not in SOLVER_TYPES:
        raise ConfigError(f"unknown solver_type {solver_type!r}; choose 'midpoint' or 'heun'")


@register("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    lower_order_final: bool = True,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) from x_T (B, ...) along decreasing ts.

    Second order, NFE = len(ts) - 1 (one evaluation a step); the first step is first order.
    Step i: r = h_{i-1} / h_i, D = (1 + 1/(2r)) x0_hat_i - 1/(2r) x0_hat_{i-1},
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h_i}) D.

    Args:
        lower_order_final: first-order last step on grids under 15 steps (see `step_orders`).
        solver_type: "midpoint" is Algorithm 2; "heun" weights h f' by h phi_2(-h) instead of
            (1 - e^{-h}) / 2 (diffusers' solver_type); both are second order.
        generator: unused (deterministic); accepted for the common signature.
    Returns:
        the state at ts[-1] (B, ...).
    """
    check_grid_and_final(ts, lower_order_final)
    _check_solver_type(solver_type)
    orders = step_orders(len(ts) - 1, 2, lower_order_final)

    def update(x, step, history, order, i):
        return multistep_update(x, step, history, order, solver_type=solver_type)

    return _multistep(denoiser, x_T, ts, y, callback, orders, update)


@register("dpmpp_3m")
@torch.no_grad()
def sample_dpmpp_3m(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(3M): third-order multistep, NFE = len(ts) - 1 (first steps warm up at 1, 2).

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i
              + alpha_{i+1} [h phi_1(-h) x0_hat_i + h phi_2(-h) D1 + h phi_3(-h) D2],
    D1, D2 the second-order divided-difference estimates of h f', h^2 f'' from the last three
    x0_hat (`derivatives`). The weight of D2 = h^2 f'' is the Taylor one, h phi_3(-h). Note that
    dpm-solver's `multistep_dpm_solver_third_update` and k-diffusion's `sample_dpmpp_3m_sde` pair
    that weight with (D1_0 - D1_1) / (r0 + r1) = h^2 f'' / 2, half the term, which measures as
    second order (tests/test_samplers_dpm.py).

    Args:
        lower_order_final: on grids under 15 steps the last two steps use orders 2 and 1.
        generator: unused (deterministic).
    Returns:
        the state at ts[-1] (B, ...).
    """
    check_grid_and_final(ts, lower_order_final)
    orders = step_orders(len(ts) - 1, 3, lower_order_final)

    def update(x, step, history, order, i):
        return multistep_update(x, step, history, order, solver_type="heun")

    return _multistep(denoiser, x_T, ts, y, callback, orders, update)


@register("dpmpp_2m_sde", deterministic=False)
@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b): NFE = len(ts) - 1, noise from stream i + 1.

    x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta h} x_i + alpha_{i+1} (1 - e^{-nu}) x0_hat_i
              + alpha_{i+1} c D1 + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z,   nu = (1 + eta) h,
    D1 = (x0_hat_i - x0_hat_{i-1}) / r, c = (1 - e^{-nu}) / 2 ("midpoint", the paper's) or
    nu phi_2(-nu) ("heun", the exact weight of h f'). eta = 1 is the paper's reverse SDE, eta = 0
    gives `sample_dpmpp_2m`; for a point mass x0 every step keeps q(x_s | x0) exact.

    Args:
        eta: >= 0, scales the injected noise (and the matching drift).
        solver_type: "midpoint" or "heun".
        lower_order_final: as in `sample_dpmpp_2m`.
    Returns:
        the state at ts[-1] (B, ...).
    """
    check_grid_and_final(ts, lower_order_final)
    _check_solver_type(solver_type)
    if not eta >= 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    noise = as_noise(generator)
    orders = step_orders(len(ts) - 1, 2, lower_order_final)

    def update(x, step, history, order, i):
        x_next = multistep_update(x, step, history, order, eta, solver_type)
        if eta > 0 and not step.to_data:
            std = step.sigma_s * math.sqrt(-math.expm1(-2 * eta * step.h))
            x_next = x_next + std * noise.randn(x.shape, i + 1, x.device, x.dtype)
        return x_next

    return _multistep(denoiser, x_T, ts, y, callback, orders, update)


@register("dpm_2s", cost=(2, 1))  # no midpoint on the last step
@torch.no_grad()
def sample_dpm_2s(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1): singlestep, second order.

    NFE = 2 a step, except a last step to t = 0, which is first order (1): 2 (len(ts) - 1) - 1
    for grids ending at 0. With lam_u = lam_t + r h and u = t(lam_u) from the schedule's inverse:
        x_u = (sigma_u / sigma_t) x_t + alpha_u (1 - e^{-r h}) x0_hat(x_t, t),
        D = (1 - 1/(2r)) x0_hat(x_t, t) + 1/(2r) x0_hat(x_u, u),
        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D.

    Args:
        r: where the intermediate point sits in lam, in (0, 1); 1/2 is the midpoint.
        generator: unused (deterministic).
    Returns:
        the state at ts[-1] (B, ...).
    """
    check_grid(ts)
    if not 0 < r < 1:
        raise ConfigError(f"r must lie in (0, 1), got {r}")
    schedule = denoiser.schedule
    x = x_T
    for i in range(len(ts) - 1):
        step = make_step(denoiser, float(ts[i]), float(ts[i + 1]))
        x0_hat, _ = denoise(denoiser, x, step.t, y, i)
        if step.to_data:
            x_next = step.first_order(x, x0_hat)
        else:
            u = float(schedule.t_from_log_snr(2 * (step.lam_t + r * step.h)))
            half = make_step(denoiser, step.t, u)  # its lam_s is the exact lam(u)
            x0_u, _ = denoise(denoiser, half.first_order(x, x0_hat), u, y, i)
            r_u = half.h / step.h
            D = (1 - 1 / (2 * r_u)) * x0_hat + 1 / (2 * r_u) * x0_u
            x_next = step.first_order(x, D)
        if callback is not None:
            callback(StepState(i, step.t, step.s, x, x0_hat, x_next))
        x = x_next
    return x
