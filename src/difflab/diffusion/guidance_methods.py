"""The guidance methods that combine two (x0_hat, eps_hat) predictions rather than raw outputs:
APG, CFG++ and autoguidance (`guidance.guide` builds them; the table is in guidance.py).

Each wraps a denoiser as a black box, so it works on every prediction kind, on consistency
models and on any conditioner: both predictions are taken unclipped (clip_x0 acts once, on the
result), the conditional and unconditional ones from one doubled batch, and outside the guidance
interval the wrapper is the conditional (strong) denoiser itself.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from difflab.diffusion.prediction import eps_from_x0
from difflab.errors import ConfigError


def twice(x: Tensor) -> Tensor:
    """x twice along the batch: the doubled batch's inputs (memory format kept)."""
    return torch.cat([x, x])


def unclipped(denoiser):
    """`denoiser` with clip_x0 off (a shallow copy: the same network)."""
    plain = copy.copy(denoiser)
    plain.clip_x0 = None
    return plain


class _Combined:
    """A denoiser that combines two unclipped predictions at the same (x_t, t): the conditional
    (strong) one and another (unconditional, or the weak model's); `clip_x0` then acts on the
    result. Outside the guidance interval it is the conditional denoiser itself. Everything
    else a sampler asks of a denoiser (schedule, kind, a consistency model's noise range) is
    the wrapped one's, but for a few-step model's step grid: no second time t2 (MeanFlow, shortcut)
    passes through a combination, so their samplers refuse it."""

    step_grid = None

    def __init__(self, base, guidance_scale: float, interval):
        self.base, self.guidance_scale, self.interval = base, guidance_scale, interval
        self.clip_x0 = base.clip_x0
        self.plain = unclipped(base)

    def __getattr__(self, name: str):
        if name in ("base", "__setstate__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def with_net(self, net):
        raise TypeError("swap the network before guiding: guidance wraps the final denoiser")

    def branches(self, x_t, t, y):
        """((x0_c, eps_c), (x0_o, eps_o)): the conditional prediction and the other one."""
        raise NotImplementedError

    def combine(self, x_t, cond, other, alpha, sigma, inside) -> tuple[Tensor, Tensor]:
        """The guided (x0_hat, eps_hat) from the two unclipped predictions."""
        raise NotImplementedError

    def __call__(self, x_t: Tensor, t: Tensor, y=None) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        inside = None  # (B,) bool: rows guided; None = all of them
        if self.interval is not None:
            s_lo, s_hi, noise_level = self.interval
            s = noise_level(t.detach())
            inside = (s > s_lo) & (s <= s_hi)
            if not bool(inside.any()):  # the whole batch outside: conditional, one call
                return self.base(x_t, t, y)
            if bool(inside.all()):
                inside = None
        alpha, sigma = self.base.alpha_sigma(t.detach(), x_t)
        cond, other = self.branches(x_t, t, y)
        x0_hat, eps_hat = self.combine(x_t, cond, other, alpha, sigma, inside)
        x0_hat, eps_hat = self.clipped(x_t, x0_hat, eps_hat, sigma, alpha)
        if inside is None:
            return x0_hat, eps_hat
        x0_c, eps_c = _Combined.clipped(self, x_t, *cond, sigma, alpha)  # the plain conditional
        row = inside.view(-1, *([1] * (x_t.dim() - 1)))
        return torch.where(row, x0_hat, x0_c), torch.where(row, eps_hat, eps_c)

    def clipped(self, x_t, x0_hat, eps_hat, sigma, alpha) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) with `clip_x0` applied, as `Denoiser.split` does."""
        if self.clip_x0 is None:
            return x0_hat, eps_hat
        x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
        return x0_hat, eps_from_x0(x_t, x0_hat, alpha, sigma.clamp_min(1e-12))


class _ConditionalPair(_Combined):
    """The conditional and unconditional predictions from one doubled batch (as cfg's)."""

    def __init__(self, base, guidance_scale: float, conditioner, interval):
        super().__init__(base, guidance_scale, interval)
        self.conditioner = conditioner

    def branches(self, x_t, t, y):
        if y is None:
            raise ConfigError("guidance needs conditions y; pass --class, --per-class or prompts")
        both = self.conditioner.cat(y, self.conditioner.null_like(y))
        x0_hat, eps_hat = self.plain(twice(x_t), twice(t), both)
        (x0_c, x0_u), (eps_c, eps_u) = x0_hat.chunk(2), eps_hat.chunk(2)
        return (x0_c, eps_c), (x0_u, eps_u)


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

    def __init__(self, base, weak, guidance_scale: float, interval):
        super().__init__(base, guidance_scale, interval)
        self.weak = unclipped(weak)

    def branches(self, x_t, t, y):
        return self.plain(x_t, t, y), self.weak(x_t, t, y)

    def combine(self, x_t, cond, other, alpha, sigma, inside):
        (x0_s, eps_s), (x0_w, eps_w) = cond, other
        w = self.guidance_scale
        return x0_w + w * (x0_s - x0_w), eps_w + w * (eps_s - eps_w)
