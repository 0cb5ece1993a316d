"""Consistency losses through the loss seam (losses.py): CT, iCT, ECT and CD.

Each compares the model f at a noisier point of a trajectory with a target network's f at a
less noisy point of the same trajectory:

    loss = lambda(sigma_hi, sigma_lo) d(f_theta(x_hi, sigma_hi), f_target(x_lo, sigma_lo))

| loss | x_lo from                     | target network         | schedule           | d, lambda  |
|------|-------------------------------|------------------------|--------------------|------------|
| ct   | the same eps (x0 + s_lo eps)  | EMA at mu(k)           | N(k), square root  | l2, 1      |
| ict  | the same eps                  | stop-gradient copy     | N(k), doubling     | p-H, A     |
| ect  | the same eps, at r(t)         | stop-gradient copy     | r(t) by stage      | p-H, B     |
| cd   | one solver step of a teacher  | consistency.target_ema | N fixed, or jitter | p-H, 1, A' |
p-H: pseudo-Huber; A = 1 / (s_hi - s_lo); B = 1 / (t - r); A' = A / E[A] (consistency.weighting).

Points are drawn on EDM's noise level s = sigma / alpha and mapped to schedule times, so every
loss runs on any schedule (curriculum.py and consistency.py say how). Both points use one
dropout draw (`same_dropout`). `draw` returns uniforms or normals (B,) and eps, so the curriculum
(which depends on the step) is applied in `__call__` and N processes still equal one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.diffusion.consistency import (
    huber_c,
    noise_range,
    pseudo_huber,
    same_dropout,
    sigma_of,
    t_of_sigma,
)
from difflab.diffusion.curriculum import (
    check_curriculum,
    check_ect,
    ct_decay,
    ct_steps,
    ect_r,
    ict_steps,
    interval_index,
    jittered_pair,
    karras,
    lognormal_weights,
)
from difflab.diffusion.loss_base import Loss
from difflab.errors import ConfigError

DISTANCES = ("pseudo_huber", "l2")
LEVELS = ("grid", "jitter")
WEIGHTINGS = ("one", "inverse_gap")


def _choose(c, key: str, allowed: tuple[str, ...]) -> None:
    if getattr(c, key) not in allowed:
        raise ConfigError(
            f"unknown consistency.{key} {getattr(c, key)!r}; choose one of {', '.join(allowed)}"
        )


class _ConsistencyLoss(Loss):
    """What the four losses share: the draw, the two points, the distance."""

    def __init__(self, cfg, schedule):
        c = cfg.consistency
        _choose(c, "distance", DISTANCES)
        if cfg.diffusion.prediction == "v" and not schedule.variance_preserving:
            raise ConfigError("v-prediction needs a variance-preserving schedule")
        self.c, self.schedule, self.steps, self.seed = c, schedule, cfg.train.steps, cfg.train.seed
        self.sigma_min, self.sigma_max = noise_range(schedule)

    def draw(self, shape: tuple[int, ...], generator) -> tuple[Tensor, Tensor]:
        """(u (B,) uniform in [0, 1), eps (B, ...)) for a global batch of `shape`."""
        return torch.rand(shape[0], generator=generator), torch.randn(shape, generator=generator)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self.c.distance == "l2":
            return (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).mean(dim=1)
        return pseudo_huber(a - b, huber_c(a[0].numel(), self.c.huber_c))

    def point(self, x0: Tensor, eps: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """x_t = alpha x0 + sigma eps at the times (B,) float32 whose noise level is s (B,)."""
        t = t_of_sigma(self.schedule, s.cpu()).float()
        alpha = self.schedule.alpha(t.double()).to(x0.device, x0.dtype)
        sigma = self.schedule.sigma(t.double()).to(x0.device, x0.dtype)
        shape = (-1, *([1] * (x0.dim() - 1)))
        return alpha.reshape(shape) * x0 + sigma.reshape(shape) * eps, t.to(x0.device)

    def position(self, t: Tensor) -> Tensor:
        """Where t lies in [0, 1] in log noise level: the loss-by-t buckets of the log."""
        lo, hi = torch.log(torch.tensor([self.sigma_min, self.sigma_max], dtype=torch.float64))
        s = sigma_of(self.schedule, t.double().cpu())
        return ((torch.log(s) - lo) / (hi - lo)).clamp(0, 1).float().to(t.device)

    def pair(self, model, x0, cond, eps, s_hi, s_lo, target, step, x_lo=None):
        """(d(f(x_hi), f_target(x_lo)) (B,), t_hi (B,)); x_lo defaults to the same eps at s_lo."""
        x_hi, t_hi = self.point(x0, eps, s_hi)
        seed = (self.seed * 1_000_003 + step) % (2**63)
        with same_dropout(seed, x0.device):
            f_hi, _ = model.denoiser(x_hi, t_hi, cond)
        t_lo = t_of_sigma(self.schedule, s_lo.cpu()).float().to(x0.device)
        if x_lo is None:
            x_lo, _ = self.point(x0, eps, s_lo)
        frozen = model.denoiser.with_net(target if target is not None else model.net)
        with torch.no_grad(), same_dropout(seed, x0.device):
            f_lo, _ = frozen(x_lo, t_lo, cond)
        return self.distance(f_hi, f_lo.detach()), t_hi


class ConsistencyTraining(_ConsistencyLoss):
    """Consistency training, CT (Song et al. 2023, Algorithm 3 and eq. 10): n ~ U{1..N(k)-1},
    lambda = 1, target network an EMA at rate mu(k) (App. C; curriculum.py)."""

    def __init__(self, cfg, schedule):
        super().__init__(cfg, schedule)
        check_curriculum(self.c.s0, self.c.s1)
        if not 0 < self.c.mu0 < 1:
            raise ConfigError(f"consistency.mu0 must be in (0, 1), got {self.c.mu0}")

    def num_levels(self, step: int) -> int:
        return ct_steps(step, self.steps, self.c.s0, self.c.s1)

    def target_decay(self, step: int) -> float:
        return ct_decay(step, self.steps, self.c.s0, self.c.s1, self.c.mu0)

    def index(self, u: Tensor, sigmas: Tensor) -> Tensor:
        return (u.double() * (len(sigmas) - 1)).floor().long().clamp(max=len(sigmas) - 2)

    def weight(self, s_hi: Tensor, s_lo: Tensor) -> Tensor:
        return torch.ones_like(s_hi)

    def __call__(self, model, x0: Tensor, cond, *, noise, step: int, target=None):
        u, eps = noise
        sigmas = karras(self.num_levels(step), self.sigma_min, self.sigma_max, self.c.rho)
        i = self.index(u, sigmas)
        s_lo, s_hi = sigmas[i], sigmas[i + 1]
        loss, t = self.pair(model, x0, cond, eps.to(x0), s_hi, s_lo, target, step)
        return loss * self.weight(s_hi, s_lo).to(loss), self.position(t)

    def log_row(self, step: int) -> dict:
        decay = self.target_decay(step)
        return {"consistency_N": self.num_levels(step), "target_decay": decay}


class ImprovedConsistencyTraining(ConsistencyTraining):
    """Improved CT, iCT (Song & Dhariwal 2023): a stop-gradient target (Sec. 3.2), the
    pseudo-Huber distance with c = 0.00054 sqrt(d) (eq. 7), the doubling N(k) (eq. 9), levels
    drawn by the discretised log-normal (eq. 10) and lambda = 1 / (sigma_i+1 - sigma_i)
    (Sec. 3.3)."""

    def num_levels(self, step: int) -> int:
        return ict_steps(step, self.steps, self.c.s0, self.c.s1)

    def target_decay(self, step: int) -> float:
        return 0.0

    def index(self, u: Tensor, sigmas: Tensor) -> Tensor:
        return interval_index(u, lognormal_weights(sigmas, self.c.p_mean, self.c.p_std))

    def weight(self, s_hi: Tensor, s_lo: Tensor) -> Tensor:
        return 1.0 / (s_hi - s_lo)


class EasyConsistencyTuning(_ConsistencyLoss):
    """Easy Consistency Tuning, ECT (Geng et al. 2024, eq. 6-10): start from a trained diffusion
    run (consistency.teacher), draw ln t ~ N(p_mean, p_std^2), r = r(t) of the stage (a stage
    every consistency.stage_steps steps), target the stop-gradient f at r (the data itself where
    r < sigma_min: there the loss is the denoising loss), weight 1 / (t - r), pseudo-Huber d."""

    def __init__(self, cfg, schedule):
        super().__init__(cfg, schedule)
        self.stage_steps = self.c.stage_steps or max(cfg.train.steps // 4, 1)
        check_ect(self.c.ect_q, self.stage_steps)
        self.needs_teacher = self.c.init_from_teacher  # else it starts from scratch

    def target_decay(self, step: int) -> float:
        return 0.0

    def draw(self, shape: tuple[int, ...], generator) -> tuple[Tensor, Tensor]:
        """(n (B,) standard normal for ln t, eps (B, ...))."""
        return torch.randn(shape[0], generator=generator), torch.randn(shape, generator=generator)

    def stage(self, step: int) -> int:
        return step // self.stage_steps

    def __call__(self, model, x0: Tensor, cond, *, noise, step: int, target=None):
        n, eps = noise
        eps = eps.to(x0)
        s_t = torch.exp(self.c.p_mean + self.c.p_std * n.double())
        s_t = s_t.clamp(self.sigma_min, self.sigma_max)
        r = ect_r(s_t, self.stage(step), self.c.ect_q, self.c.ect_k, self.c.ect_b)
        data = (r < self.sigma_min).to(x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
        x_r, _ = self.point(x0, eps, r.clamp_min(self.sigma_min))
        # where r < sigma_min the target is x0: f(x, sigma_min) = x~ at the end of the ODE
        x_r = torch.where(data, x0 * self.schedule.alpha(self.schedule.t_min).item(), x_r)
        loss, t = self.pair(
            model, x0, cond, eps, s_t, r.clamp_min(self.sigma_min), target, step, x_lo=x_r
        )
        return loss / (s_t - r).to(loss), self.position(t)

    def log_row(self, step: int) -> dict:
        return {"ect_stage": self.stage(step), "target_decay": 0.0}


class ConsistencyDistillation(ConsistencyTraining):
    """Consistency distillation, CD (Song et al. 2023, Algorithm 2 and eq. 7): x_lo is one step
    of a teacher's solver (consistency.solver, any registered sampler; a class-conditional
    teacher guided at consistency.teacher_guidance, so the student needs no doubled batch) from
    x_hi = x0 + sigma_n+1 eps to sigma_n, on a fixed grid of N = consistency.num_levels levels
    (consistency.levels=jitter: that grid moved by a uniform offset per example, so the pairs
    keep the grid's spacing but cover every level; needs the batched euler / heun step); the
    target network is an EMA at consistency.target_ema (0: a stop-gradient copy).
    consistency.weighting=inverse_gap: iCT's lambda = 1 / (s_hi - s_lo) (Song & Dhariwal 2023,
    Sec. 3.3) over its mean under the draw, so the sharp low levels count (bench/RESULTS.md)."""

    needs_teacher = True
    distils = True
    teacher_step = None  # (x, t, t_next, cond, seed) -> x at t_next; set by training.teacher
    teacher_batch_step = None  # (x, t (B,), t_next (B,), cond) -> x: euler / heun, batched

    def __init__(self, cfg, schedule):
        _ConsistencyLoss.__init__(self, cfg, schedule)
        if self.c.num_levels < 2:
            raise ConfigError(f"consistency.num_levels must be >= 2, got {self.c.num_levels}")
        if self.c.solver_substeps < 1:
            raise ConfigError(
                f"consistency.solver_substeps must be >= 1, got {self.c.solver_substeps}"
            )
        if not 0 <= self.c.target_ema < 1:
            raise ConfigError(f"consistency.target_ema must be in [0, 1), got {self.c.target_ema}")
        _choose(self.c, "levels", LEVELS)
        _choose(self.c, "weighting", WEIGHTINGS)
        # E[1 / (s_hi - s_lo)] over the draw at 4,096 midpoints of u: a constant, so N
        # processes weight as one
        s_lo, s_hi, _ = self.levels((torch.arange(4096, dtype=torch.float64) + 0.5) / 4096)
        self.mean_weight = float((1.0 / (s_hi - s_lo)).mean())

    def num_levels(self, step: int) -> int:
        return self.c.num_levels

    def target_decay(self, step: int) -> float:
        return self.c.target_ema

    def __call__(self, model, x0: Tensor, cond, *, noise, step: int, target=None):
        if self.teacher_step is None:
            raise ConfigError("train.loss=cd needs a teacher: --set consistency.teacher=RUN")
        u, eps = noise
        eps = eps.to(x0)
        s_lo, s_hi, i = self.levels(u)
        x_hi, t_hi = self.point(x0, eps, s_hi)
        t_lo = t_of_sigma(self.schedule, s_lo).float()
        with torch.no_grad():
            x_lo = self.lower_point(x_hi, t_hi, t_lo, i, cond, step)
        loss, t = self.pair(model, x0, cond, eps, s_hi, s_lo, target, step, x_lo=x_lo)
        return loss * self.weight(s_hi, s_lo).to(loss), self.position(t)

    def weight(self, s_hi: Tensor, s_lo: Tensor) -> Tensor:
        if self.c.weighting == "one":
            return torch.ones_like(s_hi)
        return 1.0 / ((s_hi - s_lo) * self.mean_weight)

    def levels(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(s_lo, s_hi, i) (B,) of uniforms u: grid interval i, or a jittered pair and no index
        (the batched teacher step, training.teacher.attach)."""
        if self.c.levels == "jitter":
            return *self.jittered_pair(u), None
        sigmas = karras(self.c.num_levels, self.sigma_min, self.sigma_max, self.c.rho)
        i = self.index(u, sigmas)
        return sigmas[i], sigmas[i + 1], i

    def jittered_pair(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return jittered_pair(u, self.c.num_levels, self.sigma_min, self.sigma_max, self.c.rho)

    def lower_point(
        self, x_hi: Tensor, t_hi: Tensor, t_lo: Tensor, i: Tensor | None, cond, step: int
    ):
        """x_lo (B, ...): the teacher's step from t_hi to t_lo (B,): batched where the solver
        allows, else one solver step per level pair i present in the batch."""
        if self.teacher_batch_step is not None:
            return self.teacher_batch_step(x_hi, t_hi, t_lo.to(x_hi.device), cond).to(x_hi)
        x_lo = torch.empty_like(x_hi)
        for j in torch.unique(i).tolist():
            rows = (i == j).nonzero().flatten().to(x_hi.device)
            sub = None if cond is None else cond[rows]
            t_a, t_b = float(t_hi[rows[0]]), float(t_lo[rows[0].cpu()])
            seed = (self.seed * 1_000_003 + step) * 4096 + j
            x_lo[rows] = self.teacher_step(x_hi[rows], t_a, t_b, sub, seed).to(x_hi)
        return x_lo


CONSISTENCY_LOSSES = {
    "ct": ConsistencyTraining,
    "ict": ImprovedConsistencyTraining,
    "ect": EasyConsistencyTuning,
    "cd": ConsistencyDistillation,
}
