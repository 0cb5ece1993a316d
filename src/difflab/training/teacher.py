"""A teacher for consistency tuning and distillation (`--set consistency.teacher=RUN`, a run
or a weights file such as pretrained:mnist): its EMA weights start the student (ECT, CD) and its
solver gives CD's lower point. The teacher must be a diffusion run on the student's schedule and
data; to start the student from it, also with its network and prediction kind."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import torch
from torch import Tensor

from difflab import build
from difflab.config import ConfigError, RunConfig
from difflab.diffusion.guidance import guided
from difflab.model import DataKind, Model
from difflab.samplers import SampleNoise, sampler_info
from difflab.training.checkpoint import (
    CheckpointError,
    is_weights_file,
    latest_good_checkpoint,
    load_data_info,
    load_weights,
    load_weights_file_into,
    resolve_source,
    weights_file_meta,
)

# What must agree between teacher and student: the path and the data always, the network to
# start from the teacher's weights.
SCHEDULE_KEYS = ("schedule", "num_steps", "beta_start", "beta_end", "sigma_min", "sigma_max")
DATA_KEYS = ("name", "image_size", "channels", "class_conditional")
INIT_KEYS = ("prediction", "sigma_data")


def _differences(student: RunConfig, teacher: RunConfig, init: bool) -> list[str]:
    pairs = [(f"diffusion.{k}", student.diffusion, teacher.diffusion) for k in SCHEDULE_KEYS]
    pairs += [(f"data.{k}", student.data, teacher.data) for k in DATA_KEYS]
    if init:
        pairs += [(f"diffusion.{k}", student.diffusion, teacher.diffusion) for k in INIT_KEYS]
    found = [
        f"{key} ({getattr(a, key.split('.')[1])!r} here, {getattr(b, key.split('.')[1])!r} in the "
        "teacher)"
        for key, a, b in pairs
        if getattr(a, key.split(".")[1]) != getattr(b, key.split(".")[1])
    ]
    if init and student.model != teacher.model:
        found.append("model.* (the student starts from the teacher's weights: same network)")
    return found


def load_teacher(cfg: RunConfig, student: Model) -> Model:
    """The teacher's model (EMA weights, eval mode, frozen) on the student's device: a run
    directory's newest good checkpoint, or a weights file (`pretrained:NAME`, an exported fp16
    EMA file, upcast to float32); ConfigError naming the problem when it is missing, corrupt or
    does not match."""
    path = cfg.consistency.teacher
    if not path:
        raise ConfigError(
            f"train.loss={cfg.train.loss} starts from a trained diffusion run: "
            "--set consistency.teacher=RUN (e.g. runs/toy2d, trained by `difflab train "
            "--preset toy2d --name toy2d`, or pretrained:mnist)"
        )
    tcfg, kind, load = _teacher_source(path)
    problems = _differences(cfg, tcfg, cfg.consistency.init_from_teacher)
    if build.run_kind(tcfg, kind).family not in ("diffusion", "flow"):
        problems.append(f"it was trained with train.loss={tcfg.train.loss}, not diffusion")
    if kind != student.kind.data:
        problems.append(f"its data are {kind.info()}, the student's {student.kind.info()}")
    if problems:
        raise ConfigError(f"consistency.teacher={path} does not match: {'; '.join(problems)}")
    with torch.random.fork_rng(devices=[]):  # the student's RNG stream stays as without one
        teacher = build.build_model(tcfg, kind, student.device)
    load(teacher.net)
    teacher.net.eval().requires_grad_(False)
    teacher.cfg = tcfg
    return teacher


def _teacher_source(path: str):
    """(config, data kind, a loader of the EMA weights into a net) of consistency.teacher."""
    if is_weights_file(path):
        file = resolve_source(path)
        tcfg, kind, _ = weights_file_meta(file)
        return tcfg, kind, functools.partial(load_weights_file_into, file)
    run_dir = Path(path)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"consistency.teacher={path} is not a difflab run directory (no config.json) or "
            "weights file; train the teacher first or fix the path"
        )
    try:
        ckpt = latest_good_checkpoint(run_dir / "checkpoints")
        tcfg = RunConfig.load(ckpt / "config.json")
        kind = DataKind.from_info(load_data_info(ckpt))
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"consistency.teacher={path} cannot be read: {e}") from None

    def load_checkpoint(net) -> None:
        try:
            load_weights(ckpt, net, "ema")
        except CheckpointError as e:
            raise ConfigError(f"consistency.teacher={path}: {e}") from None

    return tcfg, kind, load_checkpoint


def solver_step(teacher: Model, solver: str, guidance: float, sample_cfg, substeps: int = 1):
    """(x, t, t_next, cond, seed) -> x at t_next: `substeps` steps of the registered sampler
    `solver` (with the teacher's sample options) of the teacher, guided at `guidance` when
    conditional, on levels spaced geometrically in s = sigma / alpha between t and t_next."""
    try:
        info = sampler_info(solver)
        denoiser = guided_teacher(teacher, guidance)
    except ValueError as e:
        raise ConfigError(f"consistency.solver / teacher_guidance: {e}") from None
    options = info.options_from(sample_cfg)

    def step(x, t: float, t_next: float, cond, seed: int):
        ends = torch.tensor([t], dtype=torch.float64), torch.tensor([t_next], dtype=torch.float64)
        ts = torch.cat(substep_times(teacher.schedule, *ends, substeps))
        return info.fn(denoiser, x, ts, y=cond, generator=SampleNoise(seed), **options)

    return step


def substep_times(schedule, t: Tensor, t_next: Tensor, substeps: int) -> list[Tensor]:
    """[t, ..., t_next]: substeps + 1 times (each (B,), t's dtype) spaced evenly in log-SNR, i.e.
    geometrically in the noise level s = sigma / alpha (log-SNR = -2 ln s): the teacher's
    sub-steps of one pair of levels (consistency.solver_substeps)."""
    if substeps == 1:
        return [t, t_next]
    lam, lam_next = (schedule.log_snr(u.double().cpu()) for u in (t, t_next))
    inner = []
    for j in range(1, substeps):
        u = schedule.t_from_log_snr(lam + (lam_next - lam) * (j / substeps))
        inner.append(u.clamp(schedule.t_min, schedule.t_max).to(t.device, t.dtype))
    return [t, *inner, t_next]


BATCHED_SOLVERS = ("euler", "heun", "dpm_2s")  # what consistency.levels=jitter can use


def batched_ode_step(denoiser, solver: str, schedule=None, substeps: int = 1):
    """(x (B, ...), t (B,), t_next (B,), cond) -> x at t_next: `substeps` steps (substep_times;
    `schedule` needed for more than one, and for dpm_2s) of the probability-flow ODE in EDM's
    scaled variables x~ = x / alpha, s = sigma / alpha, each example at its own times, so a batch
    costs one or two teacher calls a sub-step whatever levels it holds. VP and VE schedules only
    (samplers/edm.py steps flow paths in t). `solver`:

    | solver | calls | step from (x~, s) to s'                                             |
    |--------|-------|---------------------------------------------------------------------|
    | euler  | 1     | x~ + (s' - s) d, d = (x~ - D(x~, s)) / s (= DDIM)                    |
    | heun   | 2     | the trapezoid of d at both ends (Karras et al. 2022, Algorithm 1)    |
    | dpm_2s | 2     | DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1): D at the log-midpoint u |

    dpm_2s: u = sqrt(s s') (r = 1/2 in log s), x~_u = (u/s) x~ + (1 - u/s) D(x~, s), then
    x~' = (s'/s) x~ + (1 - s'/s) D_2 with D_2 = (1 - 1/(2r)) D(x~, s) + 1/(2r) D(x~_u, u) (r the
    exact ln(s/u) / ln(s/s') of the float32 time of u): second order and exact for a constant D.
    """
    if solver not in BATCHED_SOLVERS:
        raise ValueError(f"no batched step for solver {solver!r}; one of {BATCHED_SOLVERS}")

    def step(x, t, t_next, cond):
        ts = substep_times(schedule, t, t_next, substeps)
        for t_a, t_b in itertools.pairwise(ts):
            x = one(x, t_a, t_b, cond)
        return x

    def one(x, t, t_next, cond):
        alpha, sigma = denoiser.alpha_sigma(t, x)
        alpha_next, sigma_next = denoiser.alpha_sigma(t_next, x)
        s, s_next = sigma / alpha, sigma_next / alpha_next
        x_scaled = x / alpha
        x0_hat, _ = denoiser(x, t, cond)
        if solver == "dpm_2s":
            return alpha_next * midpoint(x_scaled, x0_hat, s, s_next, t, cond)
        d = (x_scaled - x0_hat) / s
        x_next = x_scaled + (s_next - s) * d
        if solver == "heun":  # the trapezoid: average the slopes at both ends
            x0_next, _ = denoiser(alpha_next * x_next, t_next, cond)
            x_next = x_scaled + (s_next - s) * 0.5 * (d + (x_next - x0_next) / s_next)
        return alpha_next * x_next

    def midpoint(x_scaled, x0_hat, s, s_next, t, cond):
        u = torch.sqrt(s * s_next).flatten().double().cpu()  # the level wanted; t is float32
        t_u = schedule.t_from_log_snr(-2 * torch.log(u)).clamp(schedule.t_min, schedule.t_max)
        t_u = t_u.to(t.device, t.dtype)
        alpha_u, sigma_u = denoiser.alpha_sigma(t_u, x_scaled)
        s_u = sigma_u / alpha_u
        x0_u, _ = denoiser(alpha_u * ((s_u / s) * x_scaled + (1 - s_u / s) * x0_hat), t_u, cond)
        r = torch.log(s / s_u) / torch.log(s / s_next)
        d2 = (1 - 1 / (2 * r)) * x0_hat + 1 / (2 * r) * x0_u
        return (s_next / s) * x_scaled + (1 - s_next / s) * d2

    return step


def guided_teacher(teacher: Model, guidance: float):
    """The teacher's denoiser, guided at `guidance` when it is class-conditional."""
    if not teacher.kind.conditional:
        return teacher.denoiser
    teacher.conditioner.check_guidance(guidance)
    return guided(teacher.denoiser, guidance, teacher.conditioner)


def attach(loss, cfg: RunConfig, model: Model) -> None:
    """Give a loss that declares `needs_teacher` its teacher: the student's weights start from
    the teacher's (consistency.init_from_teacher) and a distillation loss gets its solver."""
    teacher = load_teacher(cfg, model)
    if cfg.consistency.init_from_teacher:
        model.net.load_state_dict(teacher.net.state_dict())
    if loss.distils:  # CD: x_lo is the teacher's solver step
        c = cfg.consistency
        loss.teacher_step = solver_step(
            teacher, c.solver, c.teacher_guidance, teacher.cfg.sample, c.solver_substeps
        )
        schedule = teacher.schedule
        if c.solver in BATCHED_SOLVERS and (
            schedule.variance_preserving or schedule.variance_exploding
        ):  # the deterministic ODE steps: one batched call instead of one per level pair
            denoiser = guided_teacher(teacher, c.teacher_guidance)
            loss.teacher_batch_step = batched_ode_step(
                denoiser, c.solver, schedule, c.solver_substeps
            )
        elif c.levels == "jitter":  # every row has its own pair of levels
            raise ConfigError(
                f"consistency.levels=jitter needs a batched teacher step (consistency.solver "
                f"euler, heun or dpm_2s on a VP or VE schedule), got solver {c.solver!r}: use "
                "consistency.solver=heun, or consistency.levels=grid"
            )
