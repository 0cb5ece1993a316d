"""Gaussian data N(mu, s^2 I): the ideal denoiser and the probability-flow endpoint in closed form.

With x_t = alpha x0 + sigma eps and x0 ~ N(mu, s^2), x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) and
E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).
The probability-flow ODE moves every marginal quantile along with the marginal, so the
standardised value z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is constant along a path and
the exact endpoint from x_T at time t_T is mu + s z.
"""

from __future__ import annotations

import torch

from difflab.diffusion import schedules
from difflab.diffusion.schedules import Schedule

# The Gaussian data of the golden tests, and every kind of schedule to run them on.
MU = torch.tensor([0.5, -0.3])
S = torch.tensor([0.4, 0.7])
ALL_SCHEDULES = {
    "linear": schedules.linear(),
    "cosine": schedules.CosineSchedule(),
    "sigmoid": schedules.SigmoidSchedule(),
    "vp": schedules.VPSDESchedule(),
    "ve": schedules.VESchedule(),
    "edm": schedules.EDMSchedule(),
    "rectified": schedules.RectifiedFlowSchedule(),  # affine flow paths (issue 12)
    "trig": schedules.TrigFlowSchedule(),
}


class GaussianDenoiser:
    """The exact posterior-mean denoiser for N(mu, s^2) data under `schedule`."""

    def __init__(self, schedule: Schedule, mu: torch.Tensor, s: torch.Tensor):
        self.schedule, self.mu, self.s = schedule, mu.double(), s.double()

    def __call__(self, x_t, t, y=None):
        alpha = self.schedule.alpha(t.double())[:, None]
        sigma = self.schedule.sigma(t.double())[:, None]
        var = alpha**2 * self.s**2 + sigma**2
        resid = x_t.double() - alpha * self.mu
        x0_hat = self.mu + alpha * self.s**2 * resid / var
        eps_hat = sigma * resid / var  # E[eps | x_t]; finite at sigma = 0
        return x0_hat.to(x_t.dtype), eps_hat.to(x_t.dtype)


def pf_endpoint(schedule: Schedule, mu, s, x_T, t_T: float):
    """Exact probability-flow ODE solution at t = 0 from x_T at time t_T."""
    alpha, sigma = float(schedule.alpha(t_T)), float(schedule.sigma(t_T))
    z = (x_T.double() - alpha * mu.double()) / torch.sqrt(alpha**2 * s.double() ** 2 + sigma**2)
    return mu.double() + s.double() * z


def pf_solution(schedule: Schedule, mu, s, x_t, t_from: float, t_to: float):
    """Exact probability-flow ODE solution at time t_to from x_t at time t_from (any schedule)."""

    def moments(t):
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        return alpha * mu.double(), torch.sqrt(alpha**2 * s.double() ** 2 + sigma**2)

    mean_from, std_from = moments(t_from)
    mean_to, std_to = moments(t_to)
    return mean_to + std_to * (x_t.double() - mean_from) / std_from


class CorrelatedGaussianDenoiser:
    """The exact posterior-mean denoiser for N(mu, cov) data (any covariance) under `schedule`:
    E[x0 | x_t] = mu + alpha cov (alpha^2 cov + sigma^2 I)^-1 (x_t - alpha mu)."""

    def __init__(self, schedule: Schedule, mu: torch.Tensor, cov: torch.Tensor):
        self.schedule, self.mu, self.cov = schedule, mu.double(), cov.double()

    def __call__(self, x_t, t, y=None):
        eye = torch.eye(len(self.mu), dtype=torch.float64)
        x0_hat, eps_hat = [], []
        for tk in t.double().unique():
            rows = t.double() == tk
            alpha, sigma = float(self.schedule.alpha(tk)), float(self.schedule.sigma(tk))
            gain = torch.linalg.solve(alpha**2 * self.cov + sigma**2 * eye, eye)  # symmetric
            resid = (x_t[rows].double() - alpha * self.mu) @ gain
            x0_hat.append((rows, self.mu + alpha * resid @ self.cov))
            eps_hat.append((rows, sigma * resid))
        out = [torch.empty_like(x_t), torch.empty_like(x_t)]
        for k, parts in enumerate((x0_hat, eps_hat)):
            for rows, value in parts:
                out[k][rows] = value.to(x_t.dtype)
        return out[0], out[1]
