"""The multistep machinery DPM-Solver++ (dpm_solver.py) and UniPC (unipc.py) share.

Both are exponential integrators in lam = log(alpha / sigma) = log_snr / 2 (the exact step and
phi_k are in dpm_solver.py's docstring): a `Step` from t to s < t carries alpha, sigma and lam at
both ends, `make_step` builds it (refusing steps whose lam does not increase), `step_orders`
warms the order up from 1 and lowers it on short grids, `_multistep` is the one-evaluation-a-step
loop that keeps the (lam, x0_hat) history, and `check_grid_and_final` holds the argument checks.

| code          | paper symbol (Lu et al. 2022b)                                    |
|---------------|-------------------------------------------------------------------|
| lam           | lambda_t = log(alpha_t / sigma_t) = log_snr(t) / 2                 |
| h             | h_i = lambda_{t_i} - lambda_{t_{i-1}}                             |
| phi(k, z)     | phi_k(z), the exponential-integrator functions                    |
| first_order   | DPM-Solver++-1 (= DDIM), the step to clean data (lam = +inf)      |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, StepState, denoise, schedule_at

# diffusers' DPMSolverMultistepScheduler lowers the order of the last steps on grids this short.
LOWER_ORDER_FINAL_BELOW = 15


def lam_at(schedule, t: float) -> float:
    """lambda(t) = log(alpha / sigma) = log_snr(t) / 2; +inf at clean data (t = 0 or sigma = 0)."""
    if t == 0.0 or float(schedule.sigma(t)) == 0.0:  # t = 0 even if sigma(0) rounds above 0
        return math.inf
    return 0.5 * float(schedule.log_snr(t))


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j >= 0} z^j / (j + k)!; phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z."""
    if abs(z) < 1.0:  # the recurrence cancels digits near z = 0; the series converges fast there
        return sum(z**j / math.factorial(j + k) for j in range(20))
    out = math.exp(z)
    for j in range(k):
        out = (out - 1.0 / math.factorial(j)) / z
    return out


@dataclass(frozen=True)
class Step:
    """One step from t to s < t, with what every exponential integrator needs."""

    t: float
    s: float
    alpha_s: float
    sigma_t: float
    sigma_s: float
    lam_t: float
    lam_s: float  # +inf when s is clean data

    @property
    def h(self) -> float:
        return self.lam_s - self.lam_t

    @property
    def to_data(self) -> bool:
        """The step ends at clean data (lam = inf), where only a first-order step is defined."""
        return math.isinf(self.lam_s)

    def first_order(self, x: Tensor, x0_hat: Tensor) -> Tensor:
        """DPM-Solver++-1 (= DDIM): x_s = (sigma_s / sigma_t) x + alpha_s (1 - e^{-h}) x0_hat."""
        if self.to_data:
            return self.alpha_s * x0_hat
        return (self.sigma_s / self.sigma_t) * x + self.alpha_s * -math.expm1(-self.h) * x0_hat


def make_step(denoiser, t: float, s: float) -> Step:
    """The step from t to s < t; refuses steps whose lambda does not increase (h > 0)."""
    _, sigma_t = schedule_at(denoiser, t)
    alpha_s, sigma_s = schedule_at(denoiser, s)
    lam_t, lam_s = lam_at(denoiser.schedule, t), lam_at(denoiser.schedule, s)
    if not lam_s > lam_t:
        raise ConfigError(
            f"log-SNR must increase along ts, but t = {t:.6g} -> {s:.6g} has lambda {lam_t:.6g} "
            f"-> {lam_s:.6g}; are the times inside the schedule's range [0, t_max]?"
        )
    return Step(t, s, alpha_s, sigma_t, sigma_s, lam_t, lam_s)


def check_grid(ts: Tensor) -> None:
    if len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()):
        raise ConfigError(
            "ts must be a strictly decreasing grid of at least 2 times, e.g. "
            "samplers.timesteps(schedule, n, 'logsnr')"
        )


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The order of each multistep step: warm up from 1 (history), and with `lower_order_final`
    on grids shorter than LOWER_ORDER_FINAL_BELOW, ramp down to 1 at the end (diffusers'
    `lower_order_final`; stabler at 5-10 steps). A step to sigma = 0 is first order anyway."""
    orders = [min(order, i + 1) for i in range(num_steps)]
    if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
        orders = [min(p, num_steps - i) for i, p in enumerate(orders)]
    return orders


def _multistep(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    y: Tensor | None,
    callback: Callback | None,
    orders: list[int],
    update: Callable[[Tensor, Step, list[tuple[float, Tensor]], int, int], Tensor],
) -> Tensor:
    """The loop all multistep samplers share: one model evaluation per step, keep the history."""
    x = x_T
    history: list[tuple[float, Tensor]] = []  # (lam, x0_hat), oldest first
    for i in range(len(ts) - 1):
        step = make_step(denoiser, float(ts[i]), float(ts[i + 1]))
        x0_hat, _ = denoise(denoiser, x, step.t, y, i)
        history = [*history[-2:], (step.lam_t, x0_hat)]
        x_next = update(x, step, history, orders[i], i)
        if callback is not None:
            callback(StepState(i, step.t, step.s, x, x0_hat, x_next))
        x = x_next
    return x


def check_grid_and_final(ts: Tensor, lower_order_final: bool) -> None:
    """The checks every multistep sampler makes: a decreasing grid, a boolean option."""
    check_grid(ts)
    if not isinstance(lower_order_final, bool):
        raise ConfigError(f"lower_order_final must be True or False, got {lower_order_final!r}")
