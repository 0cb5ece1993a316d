"""One-step models trained from scratch on the rectified path z_t = (1 - t) x + t eps, with the
network reading a second time t2 beside t (nets built with second_time):

Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models"): s(z_t, t, d) is
the step of size d, z_{t - d} = z_t - d s. At d = 0 it is the velocity (flow matching, target
eps - x); for a fraction k of the batch, the self-consistency target says one step of size 2d
equals two of size d:

    s(z_t, t, 2d) = (s_1 + s_2) / 2,  s_1 = s(z_t, t, d),  s_2 = s(z_t - d s_1, t - d, d)

(stop-gradient), with d on the power-of-two grid 1/max_steps .. 1/2 and t a multiple of 2d.
The finest step d_min = 1/max_steps is the velocity's Euler step: its queries read t2 = 0, the
flow-matching rows' input, so the pyramid of step sizes stands on what flow matching trains
(the authors' code, kvfrans/shortcut-models, labels both with d_min; s(., d_min) is otherwise
never a regression target, and a net whose t2 embedding is not smooth near 0 answers noise).

MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): u(z_t, r, t) is the
average velocity over [r, t], z_r = z_t - (t - r) u; the net reads t2 = t - r. The MeanFlow
identity u = v - (t - r) du/dt, with du/dt = v d_z u + d_t u the total derivative along the
path, gives the target u_tgt = v - (t - r) (v d_z u + d_t u) (stop-gradient), the derivative by
one forward-mode Jacobian-vector product along (v, 0, 1) in (z, r, t). A fraction of the pairs
has r != t; the rest (r = t) is flow matching. (t, r) are two logit-normal (or uniform) draws,
sorted. The adaptive weight is w = 1 / (||err||^2 + c)^p (stop-gradient), ||.||^2 the mean over
elements.

MeanFlow with guidance (Geng et al. 2025, Sec. 4.2 "Mean Flows with Guidance", and App. B.1's
improved CFG with the mixing scale kappa): the net learns the average velocity of the guided
field v_cfg(z, t | c) = omega' v(z, t | c) + (1 - omega') v(z, t | null), omega' = omega /
(1 - kappa), so one call samples it. In the target, v is replaced by

    v~ = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null)

(u at r = t is the net's instantaneous velocity; stop-gradient), both as the JVP's tangent and in
u_tgt = v~ - (t - r)(v~ d_z u + d_t u). Rows whose condition was dropped (the null label) keep
v~ = v, so the net still learns the unconditional field that v~ reads; as in the authors' code
(Gsunshine/meanflow, `guidance_fn`), v~ = v also outside t in [t_start, t_end]. omega = 1,
kappa = 0 is no guidance: v~ = v, and the loss skips the two extra calls.

| code   | paper symbol (MeanFlow)      | code      | paper symbol (shortcut)    |
|--------|------------------------------|-----------|----------------------------|
| t, r   | t, r (r <= t; t = 1 noise)   | t, d      | t (1 = noise here), d      |
| v      | v = eps - x                  | k         | fraction of bootstrap rows |
| dudt   | d/dt u(z_t, r, t)            | target    | s_target                   |
| v~     | v-tilde (guided, Sec. 4.2)   |           |                            |
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from difflab.diffusion.loss_base import Loss
from difflab.errors import ConfigError


def check_second_time(net, loss: str) -> None:
    """A loss reading t2 refuses a net built without the second time input, in one line."""
    if not getattr(net, "second_time", False):
        raise ConfigError(
            f"train.loss={loss} needs a network with a second time input: set "
            "model.second_time=true (the toy2d-meanflow and toy2d-shortcut presets do)"
        )


def _rows(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ...) against `like`."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _mean_sq(err: Tensor) -> Tensor:
    return err.pow(2).flatten(1).mean(dim=1)


def shortcut_grid(max_steps: int) -> int:
    """log2 of max_steps, a power of two >= 2 (ConfigError otherwise)."""
    if max_steps < 2 or max_steps & (max_steps - 1):
        raise ConfigError(f"shortcut.max_steps must be a power of two >= 2, got {max_steps}")
    return int(math.log2(max_steps))


class ShortcutLoss(Loss):
    """Flow matching at d = 0 for (1 - k) of the batch, self-consistency at d for k of it."""

    second_time = True

    def __init__(self, max_steps: int = 128, bootstrap_fraction: float = 0.25):
        self.levels = shortcut_grid(max_steps)
        if not 0.0 <= bootstrap_fraction <= 1.0:
            raise ConfigError(
                f"shortcut.bootstrap_fraction must be in [0, 1], got {bootstrap_fraction}"
            )
        self.max_steps, self.k = max_steps, bootstrap_fraction

    def draw(self, shape: tuple[int, ...], generator) -> tuple[Tensor, ...]:
        """(t (B,), d (B,): 0 on flow-matching rows, eps (B, ...)) for a global batch."""
        n = shape[0]
        t = torch.rand(n, generator=generator)
        bootstrap = torch.rand(n, generator=generator) < self.k
        # d = 2^-j, j in 1..levels; t a multiple of 2d in (0, 1]
        j = torch.randint(1, self.levels + 1, (n,), generator=generator)
        d = 2.0 ** (-j.float())
        slots = (1.0 / (2 * d)).round()
        t_grid = (torch.floor(torch.rand(n, generator=generator) * slots) + 1) * 2 * d
        t = torch.where(bootstrap, t_grid, t)
        d = torch.where(bootstrap, d, torch.zeros_like(d))
        return t, d, torch.randn(shape, generator=generator)

    def attach(self, model, device, judge=None) -> None:
        check_second_time(model.net, "shortcut")

    def target(self, net, z: Tensor, t: Tensor, d: Tensor, cond) -> Tensor:
        """The step of size 2d from two of size d (no gradient), (B, ...); the finest d's two
        steps query the velocity (t2 = 0)."""
        asked = torch.where(d <= 1 / self.max_steps, torch.zeros_like(d), d)
        with torch.no_grad():
            s1 = net(z, t, cond, t2=asked)
            s2 = net(z - _rows(d, z) * s1, t - d, cond, t2=asked)
        return (s1 + s2) / 2

    def __call__(self, model, x0: Tensor, cond, *, noise, step: int, target=None):
        t, d, eps = (v.to(x0.device) for v in noise)
        eps = eps.to(x0.dtype)
        z = (1 - _rows(t, x0)) * x0 + _rows(t, x0) * eps
        want = eps - x0  # the velocity: the d = 0 rows
        boot = d > 0
        if bool(boot.any()):
            want = want.clone()
            want[boot] = self.target(
                model.net, z[boot], t[boot], d[boot], None if cond is None else cond[boot]
            ).to(want.dtype)
        out = model.net(z, t, cond, t2=2 * d)  # d = 0 rows: 2d = 0, the velocity
        return _mean_sq(out - want), t


class MeanFlowLoss(Loss):
    """MeanFlow's loss: u(z_t, r, t) against v - (t - r)(v d_z u + d_t u), one JVP; v is the
    guided v~ where omega, kappa fold guidance in (module docstring)."""

    second_time = True

    def __init__(
        self,
        fraction: float = 0.25,
        times: str = "logit_normal",
        loc: float = -0.4,
        scale: float = 1.0,
        power: float = 1.0,
        constant: float = 1e-3,
        omega: float = 1.0,
        kappa: float = 0.0,
        guidance_t_start: float = 0.0,
        guidance_t_end: float = 1.0,
    ):
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"meanflow.fraction must be in [0, 1], got {fraction}")
        if scale <= 0 or power < 0 or constant <= 0:
            raise ConfigError(
                "meanflow.scale and meanflow.constant must be > 0 and meanflow.power >= 0, "
                f"got {scale}, {constant}, {power}"
            )
        if times not in ("logit_normal", "uniform"):
            raise ConfigError(f"meanflow.times must be logit_normal or uniform, got {times!r}")
        check_folded_guidance(omega, kappa, guidance_t_start, guidance_t_end)
        self.times = times
        self.fraction, self.loc, self.scale = fraction, loc, scale
        self.power, self.constant = power, constant
        self.omega, self.kappa = omega, kappa
        self.t_start, self.t_end = guidance_t_start, guidance_t_end
        self.folds = (omega, kappa) != (1.0, 0.0)

    def draw(self, shape: tuple[int, ...], generator) -> tuple[Tensor, ...]:
        """(t (B,), r (B,) <= t, eps (B, ...)): two logit-normal (or uniform) times, sorted;
        r = t on a fraction 1 - `fraction` of the rows."""
        n = shape[0]
        if self.times == "uniform":
            a, b = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
        else:
            a = torch.sigmoid(self.loc + self.scale * torch.randn(n, generator=generator))
            b = torch.sigmoid(self.loc + self.scale * torch.randn(n, generator=generator))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        apart = torch.rand(n, generator=generator) < self.fraction
        return t, torch.where(apart, r, t), torch.randn(shape, generator=generator)

    def attach(self, model, device, judge=None) -> None:
        check_second_time(model.net, "meanflow")
        if self.folds and not getattr(model.conditioner, "dropout", 0) > 0:
            raise ConfigError(
                f"meanflow.omega={self.omega:g} / meanflow.kappa={self.kappa:g} fold "
                "classifier-free guidance into the target, which needs a conditional run that "
                "also learns the null condition: set data.class_conditional=true and "
                "train.label_dropout > 0 (the mnist-meanflow preset does), or leave "
                "meanflow.omega=1 and meanflow.kappa=0"
            )

    def guided_velocity(self, net, conditioner, z: Tensor, t: Tensor, v: Tensor, cond) -> Tensor:
        """v~ (B, ...) (no gradient): omega v + kappa u(c) + (1 - omega - kappa) u(null), with
        u(.) = net(z, t, ., t2=0), on the rows that keep their condition and whose t is in
        [t_start, t_end]; v on the others."""
        rows = ~conditioner.is_null(cond) & (t >= self.t_start) & (t <= self.t_end)
        if not bool(rows.any()):
            return v
        z_g, t_g, c_g = z[rows], t[rows], cond[rows]
        t_both = torch.cat([t_g, t_g])
        with torch.no_grad():  # one doubled batch: (c, null) at r = t
            both = net(
                torch.cat([z_g, z_g]),
                t_both,
                conditioner.cat(c_g, conditioner.null_like(c_g)),
                t2=torch.zeros_like(t_both),
            )
            u_cond, u_null = both.to(v.dtype).chunk(2)
            mixed = self.omega * v[rows] + self.kappa * u_cond
            mixed = mixed + (1 - self.omega - self.kappa) * u_null
        guided = v.clone()
        guided[rows] = mixed
        return guided

    def __call__(self, model, x0: Tensor, cond, *, noise, step: int, target=None):
        t, r, eps = (v.to(x0.device) for v in noise)
        eps = eps.to(x0.dtype)
        z = (1 - _rows(t, x0)) * x0 + _rows(t, x0) * eps
        v = eps - x0
        if self.folds:
            v = self.guided_velocity(model.net, model.conditioner, z, t, v, cond)
        u, dudt = mean_velocity_jvp(model.net, z, r, t, v, cond)
        u_tgt = (v - _rows(t - r, x0) * dudt).detach()
        sq = _mean_sq(u - u_tgt)
        if self.power == 0:
            return sq, t
        weight = (sq.detach() + self.constant) ** -self.power
        return weight * sq, t


def check_folded_guidance(omega: float, kappa: float, t_start: float, t_end: float) -> None:
    """MeanFlow's folded guidance must guide: 0 <= kappa < 1, omega > 0 and an effective scale
    omega / (1 - kappa) >= 1 (1 = the conditional model), on an interval 0 <= start < end <= 1;
    one ConfigError line otherwise."""
    finite = all(math.isfinite(x) for x in (omega, kappa, t_start, t_end))
    if not (finite and 0 <= kappa < 1 and omega > 0 and omega + kappa >= 1):
        raise ConfigError(
            f"meanflow.omega={omega:g}, meanflow.kappa={kappa:g}: need 0 <= kappa < 1, omega > 0 "
            "and omega + kappa >= 1 (the folded CFG scale omega / (1 - kappa) >= 1; omega=1, "
            "kappa=0 folds none)"
        )
    if not 0 <= t_start < t_end <= 1:
        raise ConfigError(
            f"meanflow.guidance_t_start={t_start:g}, guidance_t_end={t_end:g}: need 0 <= start "
            "< end <= 1 (the folded guidance's interval of t; 0 and 1 = everywhere)"
        )


def mean_velocity_jvp(net, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond):
    """(u(z, r, t), its total derivative v d_z u + 0 d_r u + 1 d_t u), by one forward-mode JVP
    (torch.func.jvp) of u = net(z, t, cond, t2=t - r); u keeps its graph for the backward pass.
    An op without a forward-mode rule (or one that fails under it, like a convolution under
    bf16 autocast) is refused in one ConfigError line naming the op's error and the network part
    it was in.

    Under DistributedDataParallel (2+ processes) the JVP runs through the wrapped module without
    a graph (DDP's forward syncs buffers in place, which a transform refuses, and the target is
    detached anyway) and u through DDP, whose gradient hooks average it across processes."""
    ddp = isinstance(net, DistributedDataParallel)
    inner = net.module if ddp else net

    def u_of(z_, r_, t_):
        return inner(z_, t_, cond, t2=t_ - r_)

    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    try:
        if not ddp:
            return torch.func.jvp(u_of, (z, r, t), tangents)
        with torch.no_grad():
            _, dudt = torch.func.jvp(u_of, (z, r, t), tangents)
        return net(z, t, cond, t2=t - r), dudt
    except (NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        part = _failing_part(inner, u_of, (z, r, t), tangents)
        raise ConfigError(
            f"MeanFlow's JVP failed in {type(inner).__name__}{part}: {first}; train in fp32 "
            "(train.precision=fp32), or use a network whose ops have forward-mode rules"
        ) from None


def _failing_part(net, fn, primals, tangents) -> str:
    """ " (module NAME)": the innermost module entered when the JVP failed, found by running it
    again with hooks (only after a failure, so training pays nothing)."""
    names = {module: name for name, module in net.named_modules() if name}
    entered: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, args: entered.append(names[m]))
        for module in names
    ]
    try:
        torch.func.jvp(fn, primals, tangents)
    except (NotImplementedError, RuntimeError):
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return f" (module {entered[-1]})" if entered else ""
