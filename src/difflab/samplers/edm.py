"""EDM's Euler and Heun samplers (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 2; at s_churn = 0 the deterministic Algorithm 1).

EDM writes a schedule as x = s(t) (x0 + sigma(t) eps) (Sec. 4, eq. 4 and Table 1). Ours is
x_t = alpha(t) x0 + sigma(t) eps, so s = alpha and EDM's noise level is sigma(t) / alpha(t). In
the scaled variables x~ = x_t / alpha(t) the probability-flow ODE is eq. 4 with s = 1 and the
noise level as its own time, the score being (D - x~) / sigma~^2 (eq. 3), as Algorithms 1-2 use:

    dx~ / dsigma~ = (x~ - D(x~; sigma~)) / sigma~,        D = x0_hat,

one ODE for every schedule: VP (alpha^2 + sigma^2 = 1) and VE (alpha = 1) schedules differ only in
the noise levels their grid visits. So the sampler steps (x~, sigma~) and calls the denoiser with
x_t = alpha(t) x~ at the schedule's own time t. Below, `sigma` always means EDM's sigma~.

| code              | paper symbol (Algorithm 2)                                              |
|-------------------|-------------------------------------------------------------------------|
| t, t_next         | times of our schedule for t_i, t_{i+1} (EDM's time is its noise level)  |
| alpha             | s(t_i)                                                                  |
| sigma, sigma_next | sigma(t_i), sigma(t_{i+1}): sigma(t) / alpha(t) in our schedule's terms |
| x_scaled          | x_i / s(t_i)                                                            |
| gamma             | gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma <= S_tmax    |
| t_hat, sigma_hat  | t^_i, the raised noise level sigma (1 + gamma_i), as a time and a level |
| x0_hat            | D_theta(x^_i; t^_i)                                                     |
| d, d_next         | d_i, d'_i                                                               |
| s_churn, s_noise  | S_churn, S_noise                                                        |
| s_tmin, s_tmax    | S_tmin, S_tmax: a window of noise levels sigma (not of times t)         |

On an affine flow path (neither VP nor VE, e.g. rectified flow) sigma~ = t / (1 - t) runs to 999
at t_max = 0.999, and a trapezoid over [999, 9] multiplies the change of D between its ends by
the step's length in sigma~ (5 Heun steps: error 2.2 on the tests' Gaussian, Euler's 0.18), so
there Heun's correction is taken in the flow's own bounded time t, on dx/dt = u = alpha' x0_hat +
sigma' eps_hat (Euler's predictor is the same step in both variables on the rectified path).

Churn raises the level to sigma_hat, turns it back into a time with the schedule's inverse
log-SNR (lam = -2 log sigma_hat) clamped to [t_min, t_max], and adds noise of variance
sigma_hat^2 - sigma^2 at that time's exact level. Step i draws its churn noise from stream i + 1
(stream 0 is x_T); nothing else in a step is random.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, StepState, denoise, schedule_at
from difflab.samplers.noise import SampleNoise, as_noise
from difflab.samplers.registry import Option, register

CHURN = (
    Option("s_churn", float, "Euler/Heun: EDM's S_churn (0 = the deterministic ODE)", "--churn"),
    Option("s_tmin", float, "churn only from this noise level (sigma / alpha)"),
    Option("s_tmax", float, "churn only up to this noise level (0 = no limit)"),
    Option("s_noise", float, "EDM's S_noise: the churn noise's scale"),
)


def _level(denoiser, t: float) -> tuple[float, float]:
    """(alpha(t), EDM's noise level sigma(t) / alpha(t)) at time t."""
    alpha, sigma = schedule_at(denoiser, t)
    return alpha, sigma / alpha


def _raised(denoiser, t: float, sigma_hat: float) -> tuple[float, float, float]:
    """(t_hat, alpha_hat, sigma_hat): the time at noise level sigma_hat, within the schedule.

    The level is recomputed at the clamped time, so noise and denoiser agree on where x lives.
    """
    schedule = denoiser.schedule
    t_hat = float(schedule.t_from_log_snr(-2 * math.log(sigma_hat)))
    # Never below t: a clamp or an inexact inverse must not lower the noise level.
    t_hat = max(min(max(t_hat, schedule.t_min), schedule.t_max), t)
    return t_hat, *_level(denoiser, t_hat)


def _velocity(denoiser, t: float, x0_hat: Tensor, eps_hat: Tensor) -> Tensor:
    """u = alpha'(t) x0_hat + sigma'(t) eps_hat: the flow ODE's dx/dt (prediction.py, note 3)."""
    schedule = denoiser.schedule
    return float(schedule.d_alpha(t)) * x0_hat + float(schedule.d_sigma(t)) * eps_hat


def _heun_in_t(denoiser, x, t, t_next, y, i, x0_hat, eps_hat) -> Tensor:
    """Heun's step of dx/dt = u(x, t) in the flow's own time t (module note)."""
    u = _velocity(denoiser, t, x0_hat, eps_hat)
    x_euler = x + (t_next - t) * u
    x0_next, eps_next = denoise(denoiser, x_euler, t_next, y, i)
    return x + (t_next - t) * 0.5 * (u + _velocity(denoiser, t_next, x0_next, eps_next))


def _check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    if not s_churn >= 0:
        raise ConfigError(f"s_churn must be >= 0 (0 = deterministic), got {s_churn}")
    if not 0 <= s_tmin <= s_tmax:
        raise ConfigError(
            f"need 0 <= s_tmin <= s_tmax (noise levels where churn applies), "
            f"got s_tmin={s_tmin}, s_tmax={s_tmax}"
        )
    if not s_noise >= 0:
        raise ConfigError(f"s_noise must be >= 0 (EDM uses 1.0 to 1.007), got {s_noise}")


def _sample(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    y: Tensor | None,
    generator: SampleNoise | int | None,
    callback: Callback | None,
    heun: bool,
    churn: tuple[float, float, float, float],
) -> Tensor:
    """Algorithm 2 with (heun=True) or without Heun's correction; see the module docstring."""
    _check_churn(*churn)
    s_churn, s_tmin, s_tmax, s_noise = churn
    schedule = denoiser.schedule
    flow_time = not (schedule.variance_preserving or schedule.variance_exploding)
    noise = as_noise(generator)
    num_steps = len(ts) - 1
    x = x_T  # (B, ...)
    for i in range(num_steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        alpha, sigma = _level(denoiser, t)
        alpha_next, sigma_next = _level(denoiser, t_next)
        x_scaled = x / alpha
        # 1. Churn: add fresh noise to climb from sigma to sigma_hat = sigma (1 + gamma).
        churn_here = s_churn > 0 and sigma > 0 and s_tmin <= sigma <= s_tmax
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if churn_here else 0.0
        t_hat, alpha_hat, sigma_hat = t, alpha, sigma
        if gamma > 0:
            t_hat, alpha_hat, sigma_hat = _raised(denoiser, t, sigma * (1 + gamma))
            z = noise.randn(x.shape, i + 1, x.device, x.dtype)
            x_scaled = x_scaled + s_noise * max(sigma_hat**2 - sigma**2, 0.0) ** 0.5 * z
        # 2. Euler step from sigma_hat to sigma_next; it lands on x0_hat when sigma_next = 0.
        x0_hat, eps_hat = denoise(denoiser, alpha_hat * x_scaled, t_hat, y, i)
        d = (x_scaled - x0_hat) / sigma_hat
        x_next_scaled = x_scaled + (sigma_next - sigma_hat) * d
        # 3. Heun: average the slopes at both ends (trapezoid rule). At sigma_next = 0 the slope
        # is undefined and EDM keeps the Euler step.
        if heun and sigma_next > 0 and flow_time:
            x_next = _heun_in_t(
                denoiser, alpha_hat * x_scaled, t_hat, t_next, y, i, x0_hat, eps_hat
            )
            x_next_scaled = x_next / alpha_next
        elif heun and sigma_next > 0:
            x0_next, _ = denoise(denoiser, alpha_next * x_next_scaled, t_next, y, i)
            d_next = (x_next_scaled - x0_next) / sigma_next
            x_next_scaled = x_scaled + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x_next = alpha_next * x_next_scaled
        if callback is not None:
            callback(StepState(i, t, t_next, x, x0_hat, x_next))
        x = x_next
    return x


@register("euler", options=CHURN)
@torch.no_grad()
def sample_euler(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps of the probability-flow ODE in EDM's variables, with optional churn.

    First order: N steps cost N model calls and the error falls as 1 / N. With s_churn > 0 each
    step first adds noise (Algorithm 2, lines 5-6) and is then k-diffusion's `sample_euler`.

    Args:
        denoiser: (x_t, t, y) -> (x0_hat, eps_hat) with a `schedule` (VP or VE).
        x_T: start state (B, ...) at time ts[0].
        ts: (n + 1,) decreasing times; usually ts[-1] = 0 (sigma = 0, clean data).
        y: (B,) class labels or None.
        generator: a SampleNoise or int seed, for the churn noise.
        callback: receives a StepState after every step.
        s_churn: total churn S_churn >= 0; gamma_i = min(s_churn / n, sqrt(2) - 1).
        s_tmin, s_tmax: churn only where s_tmin <= sigma(t) / alpha(t) <= s_tmax.
        s_noise: scale of the churn noise (S_noise >= 0).
    Returns:
        The state at ts[-1] (B, ...).
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _sample(denoiser, x_T, ts, y, generator, callback, heun=False, churn=churn)


@register("heun", options=CHURN, cost=(2, 1))  # no correction on the last step
@torch.no_grad()
def sample_heun(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """EDM's Heun sampler: Euler plus a trapezoid correction (Algorithm 2, lines 7-11).

    Second order: the error falls as 1 / N^2. A grid ending at sigma = 0 costs 2 N - 1 model
    calls (no correction on the last step), one ending above it 2 N.

    Args:
        denoiser: (x_t, t, y) -> (x0_hat, eps_hat) with a `schedule` (VP or VE).
        x_T: start state (B, ...) at time ts[0].
        ts: (n + 1,) decreasing times; usually ts[-1] = 0 (sigma = 0, clean data).
        y: (B,) class labels or None.
        generator: a SampleNoise or int seed, for the churn noise.
        callback: receives a StepState after every step.
        s_churn: total churn S_churn >= 0; gamma_i = min(s_churn / n, sqrt(2) - 1).
        s_tmin, s_tmax: churn only where s_tmin <= sigma(t) / alpha(t) <= s_tmax.
        s_noise: scale of the churn noise (S_noise >= 0).
    Returns:
        The state at ts[-1] (B, ...).
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _sample(denoiser, x_T, ts, y, generator, callback, heun=True, churn=churn)
