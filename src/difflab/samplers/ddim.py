"""DDIM (Song, Meng & Ermon 2021, eq. 12): deterministic at eta = 0, DDPM-like at eta = 1.

| code       | paper symbol                                                        |
|------------|---------------------------------------------------------------------|
| alpha_t    | sqrt(alpha_t) in the DDIM paper (its alpha is our alpha_bar)        |
| sigma_eta  | sigma_t(eta) = eta sqrt((1 - a_s)/(1 - a_t)) sqrt(1 - a_t / a_s)     |
| x0_hat     | "predicted x0"                                                      |
| direction  | "direction pointing to x_t": sqrt(1 - a_s - sigma_eta^2) eps_hat    |

On an affine flow path sigma_eta is eta times the DDPM posterior std (ddpm.py), which on a VP
schedule is the formula above; VE keeps the formula as written (alpha_t / alpha_s = 1 there).
On the rectified path (alpha = 1 - t, sigma = t) the eta = 0 step alpha_s x0_hat + sigma_s eps_hat
equals x_t + (s - t) u_hat: DDIM is Euler's method on the flow ODE dx/dt = u.

With eta = 0 this is the first-order (Euler) step of the probability-flow ODE in log-SNR
(Lu et al. 2022, DPM-Solver-1), and run on increasing times it is DDIM inversion.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, StepState, denoise, schedule_at
from difflab.samplers.noise import SampleNoise, as_noise
from difflab.samplers.registry import Option, register


@register("ddim", options=(Option("eta", float, "DDIM eta (0 = deterministic)", "--eta"),))
@torch.no_grad()
def sample_ddim(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM from x_T (B, ...) along times ts (n + 1,).

    Decreasing ts (ending at 0) sample; increasing ts (from 0) invert data to noise (eta = 0).
    Returns the state at ts[-1].
    """
    if eta < 0:
        raise ConfigError(f"DDIM eta must be >= 0, got {eta}")
    noise = as_noise(generator)
    x = x_T
    for i in range(len(ts) - 1):
        t, s = float(ts[i]), float(ts[i + 1])
        x0_hat, eps_hat = denoise(denoiser, x, t, y, i)
        alpha_s, sigma_s = schedule_at(denoiser, s)
        sigma_eta = 0.0
        if eta > 0 and s > 0 and s < t:
            alpha_t, sigma_t = schedule_at(denoiser, t)
            if denoiser.schedule.variance_preserving or denoiser.schedule.variance_exploding:
                sigma_eta = eta * (sigma_s / sigma_t) * (1 - (alpha_t / alpha_s) ** 2) ** 0.5
            else:  # DDIM's sigma_t(eta) for any affine path: eta times the DDPM posterior std
                var_ts = max(sigma_t**2 - (alpha_t / alpha_s * sigma_s) ** 2, 0.0)
                sigma_eta = eta * (sigma_s / sigma_t) * var_ts**0.5
        x_next = alpha_s * x0_hat + max(sigma_s**2 - sigma_eta**2, 0.0) ** 0.5 * eps_hat
        if sigma_eta > 0:
            x_next = x_next + sigma_eta * noise.randn(x.shape, i + 1, x.device, x.dtype)
        if callback is not None:
            callback(StepState(i, t, s, x, x0_hat, x_next))
        x = x_next
    return x
