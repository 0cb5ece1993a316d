"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any decreasing grid of times.

One step from t to s < t samples the posterior q(x_s | x_t, x0 = x0_hat) (Kingma et al. 2021,
eq. 33 for a general pair of times):

| code        | paper symbol                                        |
|-------------|-----------------------------------------------------|
| alpha_ts    | alpha_{t|s} = alpha_t / alpha_s                     |
| var_ts      | sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (= beta_t for adjacent steps) |
| mean        | mu~_t(x_t, x0) (DDPM eq. 7)                         |
| "small"     | sigma^2 = beta~_t = sigma_{t|s}^2 sigma_s^2 / sigma_t^2 (DDPM Sec. 3.2) |
| "large"     | sigma^2 = beta_t = sigma_{t|s}^2                    |
The last step, to s = 0, returns the mean (x0_hat) with no noise, as Algorithm 2 does at t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.samplers.common import Callback, StepState, denoise, schedule_at
from difflab.samplers.noise import SampleNoise, as_noise
from difflab.samplers.registry import Option, register

VARIANCES = ("small", "large")


@register(
    "ddpm",
    options=(Option("variance", str, "DDPM posterior variance: small or large", "--variance"),),
    deterministic=False,
)
@torch.no_grad()
def sample_ddpm(
    denoiser,
    x_T: Tensor,
    ts: Tensor,
    *,
    y: Tensor | None = None,
    generator: SampleNoise | int | None = None,
    callback: Callback | None = None,
    variance: str = "small",
) -> Tensor:
    """Ancestral sampling from x_T (B, ...) along the decreasing times ts (n + 1,), ts[-1] = 0.

    Returns x0 (B, ...).
    """
    if variance not in VARIANCES:
        raise ConfigError(f"unknown DDPM variance {variance!r}; choose 'small' or 'large'")
    noise = as_noise(generator)
    x = x_T
    for i in range(len(ts) - 1):
        t, s = float(ts[i]), float(ts[i + 1])
        x0_hat, _ = denoise(denoiser, x, t, y, i)
        alpha_t, sigma_t = schedule_at(denoiser, t)
        alpha_s, sigma_s = schedule_at(denoiser, s)
        alpha_ts = alpha_t / alpha_s
        var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
        mean = (alpha_s * var_ts / sigma_t**2) * x0_hat + (alpha_ts * sigma_s**2 / sigma_t**2) * x
        if s > 0:
            var = var_ts * sigma_s**2 / sigma_t**2 if variance == "small" else var_ts
            z = noise.randn(x.shape, i + 1, x.device, x.dtype)
            x_next = mean + var**0.5 * z
        else:
            x_next = mean
        if callback is not None:
            callback(StepState(i, t, s, x, x0_hat, x_next))
        x = x_next
    return x
