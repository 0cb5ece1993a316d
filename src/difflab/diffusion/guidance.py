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

from difflab.diffusion.prediction import Denoiser, eps_from_x0, split_raw
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

    def __call__(self, x_t: Tensor, t: Tensor, y=None) -> Tensor:
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
                return self.net(x_t, t, y)
            if bool(inside.all()):
                inside = None
        null = c.null_like(y)
        if w == 0 and inside is None:
            return self.net(x_t, t, null)
        if w == 1:
            return self.net(x_t, t, y)
        raw = self.net(_twice(x_t), _twice(t), c.cat(y, null))
        raw_cond, raw_uncond = raw.chunk(2)
        guided = raw_uncond + w * (raw_cond - raw_uncond)
        if inside is None:
            return guided
        return torch.where(inside.view(-1, *([1] * (guided.dim() - 1))), guided, raw_cond)


def _twice(x: Tensor) -> Tensor:
    """x twice along the batch: the doubled batch's inputs (memory format kept)."""
    return torch.cat([x, x])


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
            "guidance_method=auto (autoguidance) needs a weak model to guide with: pass "
            "--guide-with RUN[:step-N] (an earlier checkpoint or a smaller run on the same data)"
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


class _Combined(Denoiser):
    """A denoiser that combines two predictions at the same (x_t, t): the conditional (strong)
    one and another (unconditional, or the weak model's), both unclipped; `clip_x0` then acts on
    the result. Outside the guidance interval it is the conditional denoiser itself."""

    def __init__(self, base: Denoiser, guidance_scale: float, interval):
        super().__init__(base.net, base.schedule, base.kind, base.clip_x0, base.sigma_data)
        self.base, self.guidance_scale, self.interval = base, guidance_scale, interval

    def branches(self, x_t, t, y, alpha, sigma):
        """((x0_c, eps_c), (x0_o, eps_o)): the conditional prediction and the other one."""
        raise NotImplementedError

    def combine(self, x_t, cond, other, alpha, sigma, inside) -> tuple[Tensor, Tensor]:
        """The guided (x0_hat, eps_hat) from the two unclipped predictions."""
        raise NotImplementedError

    def __call__(self, x_t: Tensor, t: Tensor, y=None) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        alpha, sigma = self.alpha_sigma(t.detach(), x_t)
        inside = None  # (B,) bool: rows guided; None = all of them
        if self.interval is not None:
            s_lo, s_hi, noise_level = self.interval
            s = noise_level(t.detach())
            inside = (s > s_lo) & (s <= s_hi)
            if not bool(inside.any()):  # the whole batch outside: conditional, one call
                return self.base(x_t, t, y)
            if bool(inside.all()):
                inside = None
        cond, other = self.branches(x_t, t, y, alpha, sigma)
        x0_hat, eps_hat = self.combine(x_t, cond, other, alpha, sigma, inside)
        if inside is not None:
            row = inside.view(-1, *([1] * (x_t.dim() - 1)))
            x0_hat, eps_hat = torch.where(row, x0_hat, cond[0]), torch.where(row, eps_hat, cond[1])
        return self.clipped(x_t, x0_hat, eps_hat, sigma, alpha)

    def clipped(self, x_t, x0_hat, eps_hat, sigma, alpha) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) with `clip_x0` applied, as `Denoiser.split` does."""
        if self.clip_x0 is None:
            return x0_hat, eps_hat
        x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
        return x0_hat, eps_from_x0(x_t, x0_hat, alpha, sigma.clamp_min(1e-12))

    def prediction(self, denoiser: Denoiser, raw, x_t, t, alpha, sigma):
        """`denoiser`'s unclipped (x0_hat, eps_hat) from its raw output."""
        rates = denoiser.rates(t.detach(), x_t)
        kind, sigma_data = denoiser.kind, denoiser.sigma_data
        return split_raw(raw.to(x_t.dtype), x_t, alpha, sigma, kind, sigma_data, rates)


class _ConditionalPair(_Combined):
    """The conditional and unconditional predictions from one doubled batch (as cfg's)."""

    def __init__(self, base: Denoiser, guidance_scale: float, conditioner, interval):
        super().__init__(base, guidance_scale, interval)
        self.conditioner = conditioner

    def branches(self, x_t, t, y, alpha, sigma):
        if y is None:
            raise ConfigError("guidance needs conditions y; pass --class, --per-class or prompts")
        both = self.conditioner.cat(y, self.conditioner.null_like(y))
        raw = self.base.raw(_twice(x_t), _twice(t), both, _twice(alpha), _twice(sigma))
        raw_cond, raw_uncond = raw.chunk(2)
        return (
            self.prediction(self.base, raw_cond, x_t, t, alpha, sigma),
            self.prediction(self.base, raw_uncond, x_t, t, alpha, sigma),
        )


class ProjectedGuided(_ConditionalPair):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts
    of High Guidance Scales in Diffusion Models", Sec. 4 and Algorithm 1), in x0 space as the
    paper does. With D = x0_c - x0_u the CFG update at the step:

        D <- D + beta * D_prev          momentum (eq. 12; beta < 0 pushes away from past updates)
        D <- D * min(1, r / ||D||)      norm threshold (eq. 11; r = 0: none)
        D_par = (<D, x0_c> / <x0_c, x0_c>) x0_c,   D_orth = D - D_par          (eq. 8)
        x0_guided = x0_c + (w - 1) (D_orth + eta D_par)                         (eq. 9)

    and eps_guided = eps_c - (alpha / sigma) (x0_guided - x0_c), so (x0, eps) stay consistent
    with x_t. The parallel part oversaturates; eta < 1 damps it (paper: eta = 0). Norms and
    inner products are per example, over every other axis. With eta = 1, beta = 0 and r = 0 this
    is cfg exactly (x0_c + (w - 1)(x0_c - x0_u) = x0_u + w (x0_c - x0_u)).

    Momentum keeps D_prev per example across the network evaluations of one draw (one update per
    evaluation, as the paper's reference code); `reset()` clears it, and `per_draw` calls it
    before every sampler call, so nothing passes from one batch or draw to the next.
    """

    def __init__(self, base, guidance_scale, conditioner, interval, eta, momentum, threshold):
        super().__init__(base, guidance_scale, conditioner, interval)
        self.eta, self.momentum, self.threshold = eta, momentum, threshold
        self.running: Tensor | None = None  # beta-weighted sum of past updates, (B, ...)

    def reset(self) -> None:
        self.running = None

    def combine(self, x_t, cond, other, alpha, sigma, inside):
        (x0_c, eps_c), (x0_u, _) = cond, other
        update = x0_c - x0_u
        if self.momentum != 0:
            if self.running is not None and self.running.shape == update.shape:
                update = update + self.momentum * self.running
            if inside is not None and self.running is not None:  # rows outside keep theirs
                row = inside.view(-1, *([1] * (x_t.dim() - 1)))
                update = torch.where(row, update, self.running)
            self.running = update
        dims = tuple(range(1, x_t.dim()))
        if self.threshold > 0:
            norm = torch.linalg.vector_norm(update, dim=dims, keepdim=True)
            update = update * torch.clamp(self.threshold / norm, max=1.0)
        parallel, orthogonal = project(update, x0_c)
        x0_hat = x0_c + (self.guidance_scale - 1) * (orthogonal + self.eta * parallel)
        return x0_hat, eps_c - (alpha / sigma) * (x0_hat - x0_c)


def project(v: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """(v_par, v_orth) of each example of v (B, ...): v_par along that example's `onto`, v_orth
    orthogonal to it (in float64, as APG's reference code); an all-zero `onto` gives v_par = 0."""
    dims = tuple(range(1, v.dim()))
    v64, onto64 = v.double(), onto.double()
    sq = (onto64 * onto64).sum(dims, keepdim=True)
    parallel = (v64 * onto64).sum(dims, keepdim=True) / sq.clamp_min(1e-300) * onto64
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


class CFGPlusPlus(_ConditionalPair):
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance",
    Algorithm 2) for DDIM at eta = 0. The paper's step, in our alpha, sigma (theirs: sqrt(a_t),
    sqrt(1 - a_t)) with lambda in [0, 1]:

        eps_lam = eps_u + lam (eps_c - eps_u)
        x0_lam  = (x_t - sigma_t eps_lam) / alpha_t
        x_s     = alpha_s x0_lam + sigma_s eps_u          (renoised with the UNconditional eps)

    x0 = (x_t - sigma_t eps) / alpha_t is affine in eps for fixed x_t, so x0_lam =
    x0_u + lam (x0_c - x0_u). This denoiser returns (x0_lam, eps_u), and DDIM's eta = 0 step,
    x_s = alpha_s x0_hat + sigma_s eps_hat, is then Algorithm 2 exactly. The pair is not
    consistent with x_t (alpha x0_lam + sigma eps_u != x_t for lam > 0), which is the method's
    point: any sampler that rederives eps from x0_hat (Euler, Heun, DPM-Solver++, UniPC) or adds
    noise would do something else, so only CFG_PP_SAMPLERS at eta = 0 take it (`check_method`).
    lam = 0 is unconditional DDIM; clip_x0 clips x0_lam and rederives eps from the clipped x0_u.
    """

    def combine(self, x_t, cond, other, alpha, sigma, inside):
        (x0_c, _), (x0_u, eps_u) = cond, other
        x0_hat = x0_u + self.guidance_scale * (x0_c - x0_u)
        if self.clip_x0 is not None:
            eps_u = eps_from_x0(x_t, x0_u.clamp(-self.clip_x0, self.clip_x0), alpha, sigma)
        return x0_hat, eps_u

    def clipped(self, x_t, x0_hat, eps_hat, sigma, alpha):
        if self.clip_x0 is None:
            return x0_hat, eps_hat
        return x0_hat.clamp(-self.clip_x0, self.clip_x0), eps_hat  # eps_u: clipped in combine


class AutoGuided(_Combined):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
    Itself", eq. 1): with D_1 the run's (strong) denoiser and D_0 a weak one, a smaller or
    shorter-trained model of the same data, schedule and conditioning, both conditioned on c:

        D_w(x; sigma, c) = D_0(x; sigma, c) + w (D_1(x; sigma, c) - D_0(x; sigma, c))

    Both predict x0 (and eps, which is affine in x0 for fixed x_t, so the same combination
    holds there). The weak model may have another prediction kind: each is turned into
    (x0_hat, eps_hat) by its own kind before they are joined. w = 1 is the strong model, and
    the weak model equal to the strong one gives the strong one at every w. It guides
    unconditional runs too (c = None). Cost: one call of each network per evaluation.
    """

    def __init__(self, base: Denoiser, weak: Denoiser, guidance_scale: float, interval):
        super().__init__(base, guidance_scale, interval)
        self.weak = weak

    def branches(self, x_t, t, y, alpha, sigma):
        strong = self.base.raw(x_t, t, y, alpha, sigma)
        weak = self.weak.raw(x_t, t, y, alpha, sigma)
        return (
            self.prediction(self.base, strong, x_t, t, alpha, sigma),
            self.prediction(self.weak, weak, x_t, t, alpha, sigma),
        )

    def combine(self, x_t, cond, other, alpha, sigma, inside):
        (x0_s, eps_s), (x0_w, eps_w) = cond, other
        w = self.guidance_scale
        return x0_w + w * (x0_s - x0_w), eps_w + w * (eps_s - eps_w)
