"""Gaussian data N(mu, s^2 I) on the rectified path z_t = (1 - t) x + t eps, in closed form.

z_t ~ N(m_t, sd_t^2) per coordinate with m_t = (1 - t) mu and sd_t^2 = (1 - t)^2 s^2 + t^2. The
probability-flow ODE keeps the standardised value (z_t - m_t) / sd_t constant, so the trajectory
through z at time t is z_r = m_r + (sd_r / sd_t) (z - m_t). Hence:

    v(z, t)    = d z_t / dt = -mu + (sd_t' / sd_t) (z - m_t),  sd_t' = (t - (1 - t) s^2) / sd_t
    u(z, r, t) = (z - z_r) / (t - r)  (the average velocity over [r, t]; u(z, t, t) = v(z, t))
    s(z, t, d) = u(z, t - d, t)        (a shortcut model's exact step of size d)

From t = 1 (sd_1 = 1, m_1 = 0) one exact jump gives z_0 = mu + s z_1: N(mu, s^2) exactly.
"""

from __future__ import annotations

import torch

MU = torch.tensor([0.5, -0.3])
S = torch.tensor([0.4, 0.7])


def _sd(t):
    t = t[:, None]
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def velocity(z, t):
    """The exact marginal velocity v(z, t) (B, 2)."""
    sd = _sd(t)
    d_sd = (t[:, None] - (1 - t[:, None]) * S**2) / sd
    return -MU + d_sd / sd * (z - (1 - t[:, None]) * MU)


def endpoint(z, r, t):
    """z_r on the trajectory through z at time t."""
    m_t, m_r = (1 - t[:, None]) * MU, (1 - r[:, None]) * MU
    return m_r + _sd(r) / _sd(t) * (z - m_t)


def average_velocity(z, r, t):
    """The exact u(z, r, t) = (z - z_r) / (t - r); v(z, t) where r = t."""
    gap = (t - r)[:, None]
    u = (z - endpoint(z, r, t)) / gap.clamp_min(1e-12)
    return torch.where(gap > 0, u, velocity(z, t))


class ExactMeanFlowNet(torch.nn.Module):
    """net(z, t, cond, t2=t - r) = u(z, t - t2, t): the exact MeanFlow model."""

    second_time = True

    def forward(self, z, t, cond=None, *, t2=None):
        t2 = torch.zeros_like(t) if t2 is None else t2
        return average_velocity(z, t - t2, t)
