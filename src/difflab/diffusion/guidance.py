"""Guidance: a denoiser in, a denoiser out. Four methods (`sample.guidance_method`):

| method | paper                                   | one evaluation is                          |
|--------|-----------------------------------------|--------------------------------------------|
| cfg    | Ho & Salimans 2022, eq. 6               | one doubled batch (cond, null)             |
| apg    | Sadat et al. 2024, Alg. 1               | one doubled batch (cond, null)             |
| cfg++  | Chung et al. 2024, Alg. 2 (DDIM only)   | one doubled batch (cond, null)             |
| auto   | Karras et al. 2024, eq. 1               | the strong and the weak network, once each |

Classifier-free guidance (cfg):

    raw_guided = raw_uncond + w (raw_cond - raw_uncond)

w = guidance_scale: 0 gives the unconditional model, 1 the conditional one, > 1 sharper classes.
The combination is done on the network's raw output; every prediction kind turns raw into
(x0_hat, eps_hat) by a map that is affine in raw for fixed (x_t, t), so guiding raw is the same as
guiding eps, x0 or v, and x0 clipping then acts on the guided result. Both branches run as one
doubled batch: one network call per step, not two.

The other three methods are not linear in raw the same way (APG projects on x0_hat, CFG++ mixes
two predictions, autoguidance may join two runs of different prediction kinds), so they combine
the two (x0_hat, eps_hat) pairs, unclipped, and clip the result (`_Combined`).

Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval improves sample and distribution quality"): w applies only where the noise level
s = sigma / alpha lies in (s_lo, s_hi]; elsewhere the model is conditional (w = 1) and costs one
undoubled call. High-noise guidance mostly narrows the sample's spread, low-noise guidance adds
little, so an interval in the middle keeps most of the class sharpness at a better FD. Every
method takes it: outside the interval each gives the plain conditional (strong) denoiser.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.diffusion.guidance_methods import AutoGuided, CFGPlusPlus, ProjectedGuided, twice
from difflab.diffusion.prediction import Denoiser
from difflab.errors import ConfigError

GUIDANCE_METHODS = ("cfg", "apg", "cfg++", "auto")
# Samplers whose step is CFG++ exactly when the denoiser returns (guided x0, unconditional eps):
# DDIM at eta = 0 (CFGPlusPlus docstring). Every other sampler reads eps through x0 or adds noise.
CFG_PP_SAMPLERS = ("ddim",)


class GuidedNet:
    """`net(x_t, t, cond)` evaluated with the condition and with the null condition, then
    combined; the conditioner makes the null condition and the doubled batch, so this works
    for any condition (class labels, token embeddings).

    Args:
        net: a conditional network trained with condition dropout.
        guidance_scale: w above; >= 0.
        conditioner: the network's conditioner (`null_like`, `cat`: conditioners.py).
        interval: (s_lo, s_hi, noise_level): guide only rows whose noise level
            noise_level(t) = sigma / alpha is in (s_lo, s_hi]; None guides everywhere.
    """

    def __init__(self, net, guidance_scale: float, conditioner, interval=None):
        if guidance_scale < 0:
            raise ConfigError(f"guidance scale must be >= 0, got {guidance_scale}")
        self.net, self.guidance_scale, self.conditioner = net, guidance_scale, conditioner
        self.interval = interval

    def __call__(self, x_t: Tensor, t: Tensor, y=None, **t2) -> Tensor:
        # t2: a few-step model's second time (MeanFlow, shortcut), passed on beside t
        if y is None:
            raise ConfigError(
                "classifier-free guidance needs class labels y; pass --class or --per-class"
            )
        w, c = self.guidance_scale, self.conditioner
        inside = None
        if self.interval is not None and w != 1:
            s_lo, s_hi, noise_level = self.interval
            s = noise_level(t)
            inside = (s > s_lo) & (s <= s_hi)
            if not bool(inside.any()):  # the whole batch outside: conditional, one call
                return self.net(x_t, t, y, **t2)
            if bool(inside.all()):
                inside = None
        null = c.null_like(y)
        if w == 0 and inside is None:
            return self.net(x_t, t, null, **t2)
        if w == 1:
            return self.net(x_t, t, y, **t2)
        doubled = {key: twice(value) for key, value in t2.items()}
        raw = self.net(twice(x_t), twice(t), c.cat(y, null), **doubled)
        raw_cond, raw_uncond = raw.chunk(2)
        guided = raw_uncond + w * (raw_cond - raw_uncond)
        if inside is None:
            return guided
        return torch.where(inside.view(-1, *([1] * (guided.dim() - 1))), guided, raw_cond)


def guided(
    denoiser: Denoiser, guidance_scale: float, conditioner, s_lo: float = 0.0, s_hi: float = 0.0
) -> Denoiser:
    """The denoiser of `denoiser`'s network under classifier-free guidance.

    Args:
        denoiser: wraps a conditional network trained with condition dropout.
        guidance_scale: 0 = unconditional, 1 = conditional, > 1 = guided.
        conditioner: the network's conditioner (conditioners.py).
        s_lo, s_hi: guide only at noise levels sigma / alpha in (s_lo, s_hi] (conditional
            elsewhere); s_hi = 0 means no upper limit, and 0, 0 guides everywhere.
    """
    if not conditioner.conditional:
        raise ConfigError(
            "guidance needs a class-conditional model; this one was trained without labels "
            "(model.num_classes = 0)"
        )
    net = GuidedNet(denoiser.net, guidance_scale, conditioner, _interval(denoiser, s_lo, s_hi))
    return denoiser.with_net(net)


def _interval(denoiser: Denoiser, s_lo: float, s_hi: float):
    """(s_lo, s_hi, noise_level) of a guidance interval, or None for guidance everywhere."""
    check_interval(s_lo, s_hi)
    if s_lo <= 0 and s_hi <= 0:
        return None
    schedule = denoiser.schedule
    hi = s_hi if s_hi > 0 else math.inf

    def noise_level(t: Tensor) -> Tensor:
        return schedule.sigma(t) / schedule.alpha(t)  # inf where alpha = 0 (a flow's t = 1)

    return (s_lo, hi, noise_level)


def check_interval(s_lo: float, s_hi: float) -> None:
    """ValueError unless (s_lo, s_hi] is a usable interval of noise levels (s_hi = 0: none)."""
    if not (math.isfinite(s_lo) and math.isfinite(s_hi)) or s_lo < 0 or s_hi < 0:
        raise ConfigError(
            f"sample.guidance_tmin / guidance_tmax must be finite noise levels >= 0 "
            f"(sigma / alpha), got {s_lo}, {s_hi}"
        )
    if s_hi > 0 and s_hi <= s_lo:
        raise ConfigError(
            f"sample.guidance_tmax={s_hi} must be above guidance_tmin={s_lo} (guidance applies "
            "in (guidance_tmin, guidance_tmax]); 0 means no upper limit"
        )


def guide(
    denoiser: Denoiser,
    method: str,
    guidance_scale: float,
    conditioner,
    s_lo: float = 0.0,
    s_hi: float = 0.0,
    *,
    weak: Denoiser | None = None,
    apg_eta: float = 0.0,
    apg_momentum: float = 0.0,
    apg_threshold: float = 0.0,
) -> Denoiser:
    """`denoiser` guided by `method` (GUIDANCE_METHODS; module table).

    Args:
        denoiser: the run's denoiser (the strong model for autoguidance).
        method: cfg | apg | cfg++ | auto.
        guidance_scale: w of cfg, apg and auto (>= 0; 1 = the conditional / strong model);
            lambda of cfg++ (in [0, 1]).
        conditioner: the network's conditioner (null condition, doubled batch).
        s_lo, s_hi: the guidance interval of noise levels (0, 0 = everywhere).
        weak: autoguidance's weak denoiser (same schedule, data and conditioning).
        apg_eta, apg_momentum, apg_threshold: APG's eta, beta and r (APG docstring).
    """
    check_method(method, guidance_scale, has_weak=weak is not None)
    if method == "cfg":
        return guided(denoiser, guidance_scale, conditioner, s_lo, s_hi)
    interval = _interval(denoiser, s_lo, s_hi)
    if method == "auto":
        return AutoGuided(denoiser, weak, guidance_scale, interval)
    if not conditioner.conditional:
        raise ConfigError(
            f"guidance_method={method} needs a conditional model; this one was trained without "
            "conditions (autoguidance, guidance_method=auto, guides any run with a weak one)"
        )
    if method == "apg":
        check_apg(apg_eta, apg_momentum, apg_threshold)
        return ProjectedGuided(
            denoiser, guidance_scale, conditioner, interval, apg_eta, apg_momentum, apg_threshold
        )
    return CFGPlusPlus(denoiser, guidance_scale, conditioner, interval)


def check_method(
    method: str,
    guidance_scale: float,
    *,
    sampler: str | None = None,
    eta: float = 0.0,
    has_weak: bool = True,
) -> None:
    """ConfigError unless `method` can guide at `guidance_scale` (with `sampler` and its DDIM
    `eta`, when given; with a weak model loaded, for auto)."""
    if method not in GUIDANCE_METHODS:
        raise ConfigError(
            f"unknown sample.guidance_method {method!r}; choose one of "
            f"{', '.join(GUIDANCE_METHODS)}"
        )
    if method == "cfg++":
        if not 0 <= guidance_scale <= 1:
            raise ConfigError(
                f"CFG++'s guidance scale lambda must be in [0, 1] (Chung et al. 2024), got "
                f"{guidance_scale}; pass --guidance between 0 and 1"
            )
        if sampler is not None and (sampler not in CFG_PP_SAMPLERS or eta != 0):
            raise ConfigError(
                f"guidance_method=cfg++ is defined for deterministic DDIM (eta = 0) only, not "
                f"{sampler}{f' with eta {eta}' if sampler == 'ddim' else ''}: use --sampler ddim "
                "--eta 0, or guidance_method cfg / apg"
            )
    elif method != "cfg" and guidance_scale < 0:  # cfg: the conditioner checks it
        raise ConfigError(f"guidance scale must be >= 0, got {guidance_scale}")
    if method == "auto" and not has_weak:
        raise ConfigError(
            "guidance_method=auto (autoguidance) needs a weak model to guide with, and this run "
            "has no companion (RUN/guide, trained with train.guide_model): pass --guide-with "
            "RUN[:step-N] (an earlier checkpoint or a smaller run on the same data)"
        )


def check_apg(eta: float, momentum: float, threshold: float) -> None:
    """ConfigError unless APG's eta, momentum beta and norm threshold r are usable."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"sample.apg_eta must be a finite number >= 0, got {eta}")
    if not -1 < momentum < 1:
        raise ConfigError(
            f"sample.apg_momentum must be in (-1, 1) (the paper's beta is negative), got {momentum}"
        )
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ConfigError(f"sample.apg_threshold must be >= 0 (0 = no threshold), got {threshold}")


def per_draw(sampler, denoiser):
    """`sampler`, resetting `denoiser`'s state (APG's momentum) before each call: every call of
    a sampler is one draw of fresh trajectories, so no state passes from one batch to the next
    and a sample depends only on its own trajectory (its seed and index)."""
    if not hasattr(denoiser, "reset"):
        return sampler

    def fresh(*args, **kwargs):
        denoiser.reset()
        return sampler(*args, **kwargs)

    return fresh
