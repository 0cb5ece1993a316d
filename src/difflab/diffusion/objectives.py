"""Training objectives: draw t, noise the data, and score the denoiser per example.

A loss takes the denoiser and a clean batch and returns a per-example loss (B,) together with the
t it drew, so the trainer can log loss by noise level.

Weighting is stated in x0 space and converted to the space the loss is measured in, so that the
same name means the same thing whatever the target. For a fixed x_t, an error d in x0_hat is an
error sqrt(SNR) d in eps_hat and sqrt(SNR + 1) d in v_hat (SNR = alpha^2 / sigma^2), so a squared
loss in those spaces already carries x0-space weight SNR or SNR + 1.

| weighting | x0-space weight          | source                                  |
|-----------|--------------------------|-----------------------------------------|
| none      | (plain loss in the target space)                                   ||
| snr       | SNR                      | = eps-MSE, DDPM's L_simple (Ho et al. 2020, eq. 14) |
| min_snr   | min(SNR, gamma)          | Hang et al. 2023, eq. 8 ("Min-SNR-gamma")  |
| snr_plus_one | SNR + 1               | = v-MSE (Salimans & Ho 2022)            |
| edm       | SNR + 1 / sigma_data^2   | = edm-MSE; EDM's lambda (Karras et al. 2022, Table 1) |

In velocity space (flow matching, u = alpha' x0 + sigma' eps) an error d in x0_hat is an error
(D / sigma) d in u_hat (D = alpha sigma' - sigma alpha', prediction.py note 3), so the plain
flow-matching loss (Lipman et al. 2023, eq. 23; weighting none) carries x0-space weight
D^2 / sigma^2 = 1 / t^2 on the rectified path; any x0-space weighting above converts to it.

EDM-preconditioned networks ("edm" kind) carry x0-space weight 1 / c_out^2 = SNR + 1 / sd^2 in
their own space, which is EDM's loss weighting; their natural t-sampling is "lognormal"
(ln(sigma / alpha) ~ N(P_mean, P_std^2), EDM Table 1: -1.2 and 1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion.prediction import Denoiser, check_kind, split_raw
from difflab.diffusion.schedules import DiscreteSchedule, Schedule, _broadcast
from difflab.errors import ConfigError

LOSS_TYPES = ("mse", "l1", "huber")
WEIGHTINGS = ("none", "snr", "min_snr", "snr_plus_one", "edm")
T_SAMPLINGS = ("uniform", "stratified", "lognormal", "logit_normal", "mode")


@dataclass
class LossSpec:
    """How to score a denoiser.

    Args:
        target: the space the loss is measured in: "eps", "x0" or "v"; None = the network's kind.
        loss: "mse", "l1" or "huber".
        weighting: see the module table.
        min_snr_gamma: gamma of min-SNR weighting (5 in Hang et al.).
        huber_delta: the Huber loss is quadratic below delta, linear above.
        t_sampling: "uniform" draws t i.i.d.; "stratified" spreads the batch over [0, 1]
            (one draw per 1/B slice, in random order): the same distribution with less variance;
            "lognormal" draws ln(sigma / alpha) ~ N(lognormal_mean, lognormal_std^2) (EDM);
            "logit_normal" draws logit(u) ~ N(logit_loc, logit_scale^2) and "mode" draws
            u = 1 - w - mode_scale (cos^2(pi w / 2) - 1 + w), w uniform (SD3: Esser et al.
            2024, Sec. 3.1, eqs. 19 and 20); u in [0, 1] is then placed on [t_min, t_max].
        sigma_data: the data's standard deviation in the "edm" weighting.
    """

    target: str | None = None
    loss: str = "mse"
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    huber_delta: float = 0.1
    t_sampling: str = "uniform"
    lognormal_mean: float = -1.2
    lognormal_std: float = 1.2
    sigma_data: float = 0.5
    logit_loc: float = 0.0
    logit_scale: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        if self.target is not None:
            check_kind(self.target)
        for value, allowed, what in (
            (self.loss, LOSS_TYPES, "loss"),
            (self.weighting, WEIGHTINGS, "weighting"),
            (self.t_sampling, T_SAMPLINGS, "t_sampling"),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if min(self.min_snr_gamma, self.huber_delta, self.lognormal_std, self.sigma_data) <= 0:
            raise ConfigError(
                "min_snr_gamma, huber_delta, lognormal_std and sigma_data must be > 0"
            )
        if self.logit_scale <= 0:
            raise ConfigError(f"logit_scale must be > 0 (SD3 uses 1.0), got {self.logit_scale}")
        if not -1 <= self.mode_scale <= 2 / (torch.pi - 2):  # keeps the density non-negative
            raise ConfigError(
                f"mode_scale must lie in [-1, {2 / (torch.pi - 2):.3f}] for a valid density "
                f"(SD3 uses 1.29), got {self.mode_scale}"
            )


def sample_t(
    schedule: Schedule,
    batch: int,
    method: str = "uniform",
    generator=None,
    device=None,
    lognormal: tuple[float, float] = (-1.2, 1.2),
    spec: LossSpec | None = None,
) -> Tensor:
    """Draw training times (B,): on the grid i / T for a discrete schedule, else in [t_min, t_max].

    `lognormal` is (mean, std) of ln(sigma / alpha) for method "lognormal"; `spec` gives the
    logit_normal and mode parameters. Returns float32 times on `device`.
    """
    if method == "lognormal":
        log_s = lognormal[0] + lognormal[1] * torch.randn(batch, generator=generator)
        t = schedule.t_from_log_snr(-2 * log_s.double()).clamp(schedule.t_min, schedule.t_max)
        if isinstance(schedule, DiscreteSchedule):  # the nearest trained step, i in 1..T
            t = (t * schedule.num_steps).round().clamp(1, schedule.num_steps) / schedule.num_steps
        return t.to(device=device, dtype=torch.float32)
    if method == "stratified":
        u = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
        u = u[torch.randperm(batch, generator=generator)]
    elif method == "logit_normal":
        spec = spec or LossSpec()
        u = torch.sigmoid(
            spec.logit_loc + spec.logit_scale * torch.randn(batch, generator=generator)
        )
    elif method == "mode":
        w = torch.rand(batch, generator=generator)
        scale = (spec or LossSpec()).mode_scale
        u = 1 - w - scale * (torch.cos(torch.pi / 2 * w) ** 2 - 1 + w)
    else:
        u = torch.rand(batch, generator=generator)
    if isinstance(schedule, DiscreteSchedule):
        # i ~ U{1..T}: floor(u T) + 1, so each step is equally likely, as in DDPM Algorithm 1.
        t = (
            (u * schedule.num_steps).floor().clamp(max=schedule.num_steps - 1) + 1
        ) / schedule.num_steps
    else:
        t = schedule.t_min + u * (schedule.t_max - schedule.t_min)
    return t.to(device=device, dtype=torch.float32)


def space_weight(
    spec: LossSpec, target: str, snr: Tensor, velocity_gain: Tensor | None = None
) -> Tensor:
    """The weight to put on a squared loss in `target` space for the x0-space weighting `spec`;
    `velocity_gain` is D^2 / sigma^2 (module docstring), needed for the velocity target."""
    if spec.weighting == "none":
        return torch.ones_like(snr)
    edm = snr + 1 / spec.sigma_data**2
    x0_weight = {
        "snr": snr,
        "min_snr": snr.clamp(max=spec.min_snr_gamma),
        "snr_plus_one": snr + 1,
        "edm": edm,
    }[spec.weighting]
    if target == "velocity":
        return x0_weight / velocity_gain
    carried = {"x0": torch.ones_like(snr), "eps": snr, "v": snr + 1, "edm": edm}[target]
    return x0_weight / carried


def elementwise_loss(spec: LossSpec, pred: Tensor, target: Tensor) -> Tensor:
    if spec.loss == "mse":
        return (pred - target) ** 2
    if spec.loss == "l1":
        return (pred - target).abs()
    return F.huber_loss(pred, target, reduction="none", delta=spec.huber_delta)


def draw_noise(
    schedule: Schedule, shape: tuple[int, ...], spec: LossSpec, generator=None
) -> tuple[Tensor, Tensor]:
    """The random part of `diffusion_loss` for a batch of `shape` (B, ...), on the CPU.

    A caller that trains on a slice of a larger batch (one of several processes) draws the noise
    of the whole batch and passes its slice, so the slices together equal one undivided batch.

    Returns:
        t float32 (B,) and eps (B, ...), drawn in that order from `generator`.
    """
    lognormal = (spec.lognormal_mean, spec.lognormal_std)
    t = sample_t(schedule, shape[0], spec.t_sampling, generator, None, lognormal, spec)
    return t, torch.randn(shape, generator=generator)


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    y: Tensor | None,
    spec: LossSpec,
    generator=None,
    noise: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-example diffusion loss.

    Args:
        denoiser: wraps the network being trained.
        x0: clean batch (B, ...).
        y: labels (B,) or None.
        spec: target space, loss, weighting, t-sampling.
        generator: a CPU torch.Generator for t and eps (reproducible training).
        noise: (t (B,), eps (B, ...)) from `draw_noise`; None draws them from `generator`.
    Returns:
        loss (B,) and the times t (B,) it used.
    """
    schedule = denoiser.schedule
    t, eps = draw_noise(schedule, x0.shape, spec, generator) if noise is None else noise
    t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
    alpha, sigma = denoiser.alpha_sigma(t, x0)
    x_t = alpha * x0 + sigma * eps
    raw = denoiser.raw(x_t, t, y, alpha, sigma)
    target_space = spec.target or denoiser.kind
    rates = None
    if "velocity" in (target_space, denoiser.kind):
        rates = _broadcast(schedule.d_alpha(t), x0), _broadcast(schedule.d_sigma(t), x0)
    if target_space == denoiser.kind:
        pred = raw  # measure the network's own output directly: no division by alpha or sigma
    else:
        x0_hat, eps_hat = split_raw(  # never clipped in training
            raw, x_t, alpha, sigma, denoiser.kind, denoiser.sigma_data, rates
        )
        pred = denoiser.target(target_space, x0_hat, eps_hat, alpha, sigma, rates)
    target = denoiser.target(target_space, x0, eps, alpha, sigma, rates)
    per_elem = elementwise_loss(spec, pred.float(), target.float())
    per_example = per_elem.reshape(x0.shape[0], -1).mean(dim=1)
    if spec.weighting == "none":  # no SNR needed (it is infinite at t = 0 on a flow path)
        return per_example, t
    snr = schedule.log_snr(t).exp().float()
    gain = None
    if target_space == "velocity":
        det = schedule.alpha(t) * schedule.d_sigma(t) - schedule.sigma(t) * schedule.d_alpha(t)
        gain = (det / schedule.sigma(t)).pow(2).float()
    return per_example * space_weight(spec, target_space, snr, gain), t
