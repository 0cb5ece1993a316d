"""The consistency parameterisation (Song et al. 2023, "Consistency Models", Sec. 3 and App. C):
a model f(x_t, t) that maps every point of a probability-flow trajectory to its end, with the
boundary condition f(x, sigma_min) = x built in.

Every difflab schedule is written through the scaled variables of EDM (Karras et al. 2022,
eq. 4): x~ = x_t / alpha(t) and s = sigma(t) / alpha(t), so that x~ = x0 + s eps on any affine
path (VE / EDM: alpha = 1; VP tables through their continuous view; rectified flow 1 - t, t).
The consistency function lives on those variables:

| code          | paper symbol                         | value                               |
|---------------|--------------------------------------|-------------------------------------|
| s             | sigma (EDM's noise level, t in CM)   | sigma(t) / alpha(t)                 |
| sigma_min     | epsilon                              | s(t_min): where the trajectory ends |
| c_skip        | c_skip(t) (CM, App. C)               | sd^2 / ((s - sigma_min)^2 + sd^2)   |
| c_out         | c_out(t)                             | sd (s - sigma_min) / sqrt(sd^2+s^2) |
| F             | F_theta(x, t)                        | (x0_hat - c_skip' x~) / c_out'      |
| f             | f_theta(x, t) = c_skip x + c_out F   | returned as x0_hat                  |

c_skip' = sd^2 / (s^2 + sd^2) and c_out' = sd s / sqrt(sd^2 + s^2) are EDM's (Karras et al. 2022,
Table 1): F is the EDM-preconditioned raw output that the wrapped denoiser's x0_hat implies,
whatever the run's prediction kind (eps, x0, v or edm), as in ECT (Geng et al. 2024), whose
consistency model is the EDM network with only sigma_min shifted into c_skip and c_out. As
c_out / c_out' = (s - sigma_min) / s,

    f = c_skip x~ + (s - sigma_min) / s (x0_hat - c_skip' x~),

so f = x0_hat up to O(sigma_min / s): a trained diffusion run is, unchanged, a consistency model
away from sigma_min (the r = 0 end of ECT's curriculum, what ECT and CD start from), and
c_skip(sigma_min) = 1, c_out(sigma_min) = 0 hold exactly in float arithmetic: f(x_t, t_min) =
x_t / alpha(t_min), which is x_t itself on VE and EDM. (Mixing c_skip x~ + (1 - c_skip) x0_hat
instead keeps half of x~ at s = sd, so a teacher's weights start far from its own denoiser.)
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from difflab.diffusion.prediction import Denoiser, eps_from_x0, split_raw
from difflab.diffusion.schedules import Schedule, _broadcast


def sigma_of(schedule: Schedule, t: Tensor | float) -> Tensor:
    """EDM's noise level s = sigma(t) / alpha(t) (float64) of schedule times t."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return schedule.sigma(t) / schedule.alpha(t)


def t_of_sigma(schedule: Schedule, s: Tensor | float) -> Tensor:
    """The schedule time (float64) whose noise level sigma / alpha is s, in [t_min, t_max]."""
    s = torch.as_tensor(s, dtype=torch.float64)
    t = schedule.t_from_log_snr(-2 * torch.log(s))
    return t.clamp(schedule.t_min, schedule.t_max)


def noise_range(schedule: Schedule) -> tuple[float, float]:
    """(sigma_min, sigma_max): s at the float32 times t_min and t_max the network is fed."""
    ends = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float32).double()
    s = sigma_of(schedule, ends)
    return float(s[0]), float(s[1])


def c_skip_of(s: Tensor, sigma_min: float, sigma_data: float) -> Tensor:
    """c_skip(s) of the table (1 at and below sigma_min, exactly)."""
    gap = (s - sigma_min).clamp_min(0.0)
    return sigma_data**2 / (gap**2 + sigma_data**2)


def consistency_coefficients(
    s: Tensor, sigma_min: float, sigma_data: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, (s - sigma_min) / s, EDM's c_skip') at noise levels s (float64), for f = c_skip
    x~ + ratio (x0_hat - c_skip' x~); ratio is 0 at and below sigma_min, exactly."""
    gap = (s - sigma_min).clamp_min(0.0)
    ratio = torch.where(gap > 0, gap / s.clamp_min(1e-300), torch.zeros_like(s))  # s = 0 at t_min
    return c_skip_of(s, sigma_min, sigma_data), ratio, sigma_data**2 / (s**2 + sigma_data**2)


class ConsistencyDenoiser:
    """f(x_t, t) = c_skip x~ + c_out F(x_t, t) around a Denoiser, itself a denoiser:
    `(x0_hat, eps_hat) = cm(x_t, t, y)` with x0_hat = f, so every sampler, guidance and loss
    sees it through the one interface.

    Args:
        inner: the Denoiser of the network (its kind says what F's raw output means).
    """

    consistency = True  # what the consistency sampler checks for

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.net, self.schedule, self.kind = inner.net, inner.schedule, inner.kind
        self.sigma_data, self.clip_x0 = inner.sigma_data, inner.clip_x0
        self.sigma_min, self.sigma_max = noise_range(inner.schedule)

    def with_net(self, net) -> ConsistencyDenoiser:
        return ConsistencyDenoiser(self.inner.with_net(net))

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner.alpha_sigma(t, like)

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x_t (B, ...), t (B,) or a scalar -> (f (B, ...), eps_hat (B, ...))."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        alpha, sigma = self.inner.alpha_sigma(t.detach(), x_t)
        raw = self.inner.raw(x_t, t, y, alpha, sigma).to(x_t.dtype)
        rates = self.inner.rates(t.detach(), x_t)  # a velocity F (a flow teacher) needs them
        x0_inner, _ = split_raw(raw, x_t, alpha, sigma, self.kind, self.sigma_data, rates)
        s = sigma_of(self.schedule, t.detach().double().cpu())
        c_skip, ratio, c_skip_edm = (
            _broadcast(c.to(x_t.device), x_t)
            for c in consistency_coefficients(s, self.sigma_min, self.sigma_data)
        )
        x_scaled = x_t / alpha
        f = c_skip * x_scaled + ratio * (x0_inner - c_skip_edm * x_scaled)
        if self.clip_x0 is not None:
            f = f.clamp(-self.clip_x0, self.clip_x0)
        return f, eps_from_x0(x_t, f, alpha, sigma.clamp_min(1e-12))


def is_consistency(denoiser) -> bool:
    return bool(getattr(denoiser, "consistency", False))


def gaussian_consistency(
    x_t: Tensor, t: Tensor | float, schedule: Schedule, mu: float, std: float
) -> Tensor:
    """The exact consistency function of data N(mu, std^2 I) (in the scaled variables):
    f*(x, s) = mu + (x~ - mu) sqrt((std^2 + sigma_min^2) / (std^2 + s^2)), the probability-flow
    ODE's flow from s down to sigma_min (x~ - mu shrinks with the marginal's standard deviation).

    Args:
        x_t: (B, ...) states at time t; t: a time or (B,) times of `schedule`.
    Returns:
        (B, ...) the trajectory's point at t_min in the scaled variable x~.
    """
    t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
    alpha = _broadcast(schedule.alpha(t), x_t)
    s = _broadcast(sigma_of(schedule, t), x_t)
    sigma_min = noise_range(schedule)[0]
    scale = torch.sqrt((std**2 + sigma_min**2) / (std**2 + s**2))
    return mu + (x_t / alpha - mu) * scale


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """Per-example pseudo-Huber distance sqrt(||d||^2 + c^2) - c (Song & Dhariwal 2023, eq. 7;
    ||.|| over every element of an example): ||d||^2 / (2 c) for ||d|| << c, ||d|| - c for
    ||d|| >> c, and the L2 distance ||d|| at c = 0."""
    squared = diff.float().reshape(diff.shape[0], -1).pow(2).sum(dim=1)
    if c == 0:
        return torch.sqrt(squared)
    return squared / (torch.sqrt(squared + c**2) + c)  # = sqrt(.) - c, without cancellation


def huber_c(dims: int, c: float) -> float:
    """c < 0 means Song & Dhariwal's rule c = 0.00054 sqrt(d) for d-dimensional data."""
    return 0.00054 * dims**0.5 if c < 0 else c


@contextlib.contextmanager
def same_dropout(seed: int, device: torch.device):
    """Run the block with the torch RNG seeded `seed` and restore the RNG after, so two forwards
    under the same seed draw the same dropout masks (ECT, Geng et al. 2024, Sec. 3.2). Only the
    CPU generator and, on CUDA, that device's are touched: nothing needs a CUDA RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
