"""train(cfg): one staged loop, read top to bottom.

1. Build everything from the config before touching the disk (a bad config leaves nothing behind).
2. Open the run directory: a fresh one, or resume from its newest good checkpoint.
3. Loop: micro-batches -> loss -> clip -> AdamW step -> EMA; log every `log_every` steps,
   checkpoint every `checkpoint_every` steps and at the end.
Everything random draws from generators whose states are checkpointed, so a run stopped at step
N/2 and resumed ends with the same weights, bit for bit on the CPU, as one trained straight through.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab import build
from difflab.config import ConfigError, RunConfig
from difflab.evaluation.protocol import HIGHER_IS_BETTER
from difflab.evaluation.sampled import TrainingEvaluator
from difflab.model import Model
from difflab.report import charts, grids
from difflab.training import distributed, faults
from difflab.training.checkpoint import (
    CheckpointError,
    latest_good_checkpoint,
    load_config,
    load_state,
    load_weights,
    publish_best,
    remove_leftovers,
    save_checkpoint,
)
from difflab.training.ema import EMA
from difflab.training.logging import MetricsLog
from difflab.training.nonfinite import NonFiniteMonitor, check_config

NUM_BUCKETS = 10  # loss is also logged per tenth of t in [0, 1]
# What a best checkpoint can be chosen by: scalar metrics.jsonl keys (lower is better), or
# "eval": train.eval_metric (better in its own direction, e.g. higher precision).
BEST_METRICS = ("loss_smoothed", "loss", "grad_norm", "eval")
# Keys that may differ between a run's saved config and the one it is resumed with.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_best",
    "train.tensorboard",
    "train.device",
    "train.threads",
    "train.time_limit_minutes",
    "train.compile",
    "train.eval_every",
    "train.eval_n",
    "train.nonfinite",
    "train.nonfinite_max_skips",
)


@dataclass
class Parts:
    """Everything `train` builds from a config."""

    model: Model  # model.net is the module being trained
    loss: object  # losses.py: called as loss(model, x0, cond, noise=..., step=..., target=...)
    ema: EMA
    optimizer: torch.optim.Optimizer
    data: object
    loss_generator: torch.Generator  # condition dropout and the loss's noise
    device: torch.device
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    autocast_dtype: torch.dtype | None  # None = full precision
    forward: Model  # the model the step calls: its net compiled (train.compile), DDP-wrapped
    target: torch.nn.Module | None = None  # the loss's target network, if it declares one
    best: dict = field(default_factory=dict)  # {"metric", "value", "step"} of checkpoints/best
    evaluator: TrainingEvaluator | None = None  # train.eval_metric every train.eval_every steps
    world: distributed.World = field(default_factory=distributed.World)  # this process's rank
    monitor: NonFiniteMonitor | None = None  # non-finite losses and gradients (train.nonfinite)

    @property
    def net(self) -> torch.nn.Module:
        return self.model.net

    def data_info(self) -> dict:
        return self.model.kind.info()


def check_train_config(cfg: RunConfig) -> None:
    t = cfg.train
    problems = []
    if t.steps < 1:
        problems.append(f"train.steps must be >= 1, got {t.steps}")
    if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
        problems.append(
            f"train.batch_size ({t.batch_size}) must be >= 1 and divisible by "
            f"train.grad_accum ({t.grad_accum})"
        )
    if not t.lr > 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    if t.lr_schedule not in ("constant", "cosine"):
        problems.append(f"train.lr_schedule must be constant or cosine, got {t.lr_schedule!r}")
    if not 0 <= t.ema_decay <= 1:
        problems.append(f"train.ema_decay must be in [0, 1], got {t.ema_decay}")
    if (
        t.warmup_steps < 0
        or t.grad_clip < 0
        or t.log_every < 1
        or t.checkpoint_every < 1
        or t.keep_checkpoints < 1
    ):
        problems.append(
            "train.warmup_steps and train.grad_clip must be >= 0; "
            "log_every, checkpoint_every and keep_checkpoints >= 1"
        )
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard "
            "(metrics.jsonl is written either way)"
        )
    if t.best_metric not in BEST_METRICS:
        problems.append(
            f"train.best_metric={t.best_metric!r} is not logged; choose one of "
            f"{', '.join(BEST_METRICS)} (lower is better; eval: train.eval_metric)"
        )
    if t.eval_every < 0 or t.eval_n < 1:
        problems.append(
            f"train.eval_every must be >= 0 and eval_n >= 1, got {t.eval_every}, {t.eval_n}"
        )
    if t.best_metric == "eval" and (t.eval_every == 0 or t.eval_every % t.checkpoint_every):
        problems.append(
            "train.best_metric=eval needs train.eval_every > 0 and a multiple of "
            f"train.checkpoint_every ({t.checkpoint_every}), so every evaluated step is saved"
        )
    problems += check_config(t)
    if problems:
        raise ConfigError("; ".join(problems))


def build_parts(cfg: RunConfig, world: distributed.World | None = None) -> Parts:
    """Stage 1: every object of the run, seeded from train.seed; `world`: this process's rank
    when several train together (default: alone)."""
    world = world or distributed.World()
    check_train_config(cfg)
    device = build.resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)  # weight init, dropout
    data = build.build_data(cfg, seed=cfg.train.seed)
    model = build.build_model(cfg, build.data_kind(cfg, data), device)
    data = build.place_data(data, device)
    loss = build.build_loss(cfg, model.schedule)
    ema = EMA(model.net, cfg.train.ema_decay, cfg.train.ema_warmup)
    optimizer = build.adamw(model.net, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    loss_generator = torch.Generator().manual_seed(cfg.train.seed + 1)  # t, eps, label dropout
    dtype = build.resolve_precision(cfg.train.precision, device, "train.precision")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    forward = model.with_net(build.maybe_compile(model.net, cfg.train.compile, "train.compile"))
    target = None
    if loss.target_decay(0) is not None:  # a stop-gradient copy or an EMA of the online net
        target = copy.deepcopy(model.net).requires_grad_(False)
    evaluator = None
    if cfg.train.eval_every and world.is_main:  # now: a missing judge fails before step 1
        evaluator = TrainingEvaluator(cfg, model)
    return Parts(
        model, loss, ema, optimizer, data, loss_generator, device, scaler, dtype, forward,
        target, evaluator=evaluator, world=world,
        monitor=NonFiniteMonitor(
            cfg, device, lambda s: lr_at(cfg, s), dtype is torch.float16, world.rank
        ),
    )  # fmt: skip


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at train.steps."""
    t = cfg.train
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    if t.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step / t.steps, 1.0)))
    return lr


def _state(parts: Parts, step: int, smoothed: float | None) -> dict:
    return {
        "step": step,
        "optimizer": parts.optimizer.state_dict(),
        "ema": parts.ema.state_dict(),
        "data": parts.data.state_dict(),
        "loss_generator": parts.loss_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "scaler": parts.scaler.state_dict(),
        "smoothed_loss": smoothed,
        "best": parts.best,
        **({"target": parts.target.state_dict()} if parts.target is not None else {}),
    }


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, list) and tuple(a) == b):
            keys.append(prefix + k)
    return keys


def resume_parts(parts: Parts, cfg: RunConfig, run_dir: Path) -> tuple[int, float | None]:
    """Stage 2 (resume): load the newest good checkpoint; returns (step, smoothed loss)."""
    ckpt = latest_good_checkpoint(run_dir / "checkpoints")
    changed = [
        k
        # through RunConfig, so keys added since the checkpoint was written take their defaults
        for k in config_differences(RunConfig.from_dict(load_config(ckpt)).to_dict(), cfg.to_dict())
        if k not in RESUMABLE_CHANGES and not k.startswith("sample.")
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in "
            f"{', '.join(changed)}; "
            f"only {', '.join(RESUMABLE_CHANGES)} and sample.* may change on resume"
        )
    load_weights(ckpt, parts.net, "model")
    load_weights(ckpt, parts.ema.model, "ema")
    state = load_state(ckpt)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.ema.load_state_dict(state["ema"])
    parts.data.load_state_dict(state["data"])
    parts.loss_generator.set_state(state["loss_generator"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    parts.best = dict(state.get("best") or {})
    if parts.target is not None:
        parts.target.load_state_dict(state["target"])
    return int(state["step"]), state["smoothed_loss"]


def open_run(cfg: RunConfig, run_dir: Path, parts: Parts, resume: bool) -> tuple[int, float | None]:
    """Stage 2: a fresh run directory (must not hold a run already), or the resumed state.
    Rank 0 alone creates and tidies the directory; every rank reads a resumed checkpoint."""
    if resume:
        if parts.world.is_main:
            remove_leftovers(run_dir / "checkpoints")  # of a process killed while saving
        return resume_parts(parts, cfg, run_dir)
    if not parts.world.is_main:
        return 0, None
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        raise ConfigError(
            f"{run_dir} already holds a run; resume it with --resume {run_dir} "
            "or choose another --name"
        )
    for sub in ("checkpoints", "samples", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    return 0, None


class IntervalStats:
    """Loss sums by t-bucket, gradient norms and timing over one logging interval, kept on the
    device so the step never waits for the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(NUM_BUCKETS, device=self.device, dtype=torch.float64)
        self.counts = torch.zeros(NUM_BUCKETS, device=self.device, dtype=torch.float64)
        self.grad_norm = torch.zeros((), device=self.device, dtype=torch.float64)
        self.steps, self.examples, self.start = 0, 0, time.perf_counter()

    def add_losses(self, loss: torch.Tensor, t: torch.Tensor) -> None:
        bucket = (t * NUM_BUCKETS).long().clamp(0, NUM_BUCKETS - 1)
        self.sums.index_add_(0, bucket, loss.detach().double())
        self.counts.index_add_(0, bucket, torch.ones_like(loss, dtype=torch.float64))
        self.examples += loss.shape[0]

    def row(self, step: int) -> dict:
        sums, counts = self.sums.cpu(), self.counts.cpu()
        elapsed = time.perf_counter() - self.start
        by_bucket = [float(s / c) if c > 0 else None for s, c in zip(sums, counts, strict=True)]
        return {
            "step": step,
            "loss": float(sums.sum() / counts.sum()),
            "loss_by_t": by_bucket,
            "grad_norm": float(self.grad_norm) / max(self.steps, 1),
            "examples_per_s": self.examples / elapsed,
            "s_per_step": elapsed / max(self.steps, 1),
        }


def train_step(cfg: RunConfig, parts: Parts, stats: IntervalStats, step: int) -> None:
    """One optimizer step over train.grad_accum micro-batches."""
    for group in parts.optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    model = parts.forward
    pending = []  # (loss, t) of each micro-batch: counted once the update is taken
    for _ in range(cfg.train.grad_accum):
        x0, y = parts.data.next_batch(micro)
        cond = model.conditioner.train_condition(y, parts.loss_generator, parts.device)
        shape = (len(x0), *model.codec.latent_shape(tuple(x0.shape[1:])))
        noise = parts.loss.draw(shape, parts.loss_generator)
        # Every rank draws the global micro-batch and its noise and keeps its slice, so N ranks
        # equal one process and the stream state stays global (distributed.py says more).
        x0, cond, *noise = parts.world.shard(x0, cond, *noise)
        z = model.codec.encode(x0.to(parts.device, memory_format=model.memory_format))
        with torch.autocast(
            parts.device.type,
            parts.autocast_dtype or torch.float32,
            enabled=parts.autocast_dtype is not None,
        ):
            loss, t = parts.loss(model, z, cond, noise=noise, step=step, target=parts.target)
        loss = parts.monitor.poison(loss, step)  # a test hook, off unless DIFFLAB_FAULT_NAN_STEP
        parts.scaler.scale(loss.mean() / cfg.train.grad_accum).backward()
        pending.append((loss.detach(), t))
    parts.scaler.unscale_(parts.optimizer)
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.net.parameters(), clip)
    if not parts.monitor.observe(parts.world, step, [loss for loss, _ in pending], grad_norm):
        parts.optimizer.zero_grad(set_to_none=True)  # train.nonfinite=skip: drop this update
        return
    for loss, t in pending:
        stats.add_losses(loss, t)
    stats.grad_norm += grad_norm.double()
    parts.monitor.scaler_step(parts.scaler, parts.optimizer)  # counts fp16's own skips
    parts.optimizer.zero_grad(set_to_none=True)
    parts.ema.update(parts.net)
    if parts.target is not None:
        update_target(parts.target, parts.net, parts.loss.target_decay(step + 1))
    stats.steps += 1


@torch.no_grad()
def update_target(target: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """target <- decay target + (1 - decay) net: a stop-gradient copy at decay 0."""
    for p_target, p in zip(target.parameters(), net.parameters(), strict=True):
        p_target.lerp_(p.detach(), 1.0 - decay)
    for b_target, b in zip(target.buffers(), net.buffers(), strict=True):
        b_target.copy_(b)


SNAPSHOT_N = 64  # samples in a training-time grid


@torch.no_grad()
def snapshot(cfg: RunConfig, parts: Parts, run_dir: Path, step: int) -> Path:
    """samples/grid-step-N.png from the EMA weights and fixed noise (the same every time, so
    grids across training show progress, not noise); per class for conditional models."""
    model = parts.model.with_net(parts.ema.model)
    n = SNAPSHOT_N if model.kind.is_image else 2000
    scfg = dataclasses.replace(cfg.sample, n=n, batch_size=SNAPSHOT_N, compile=False)
    x = model.sample(scfg, cond=model.conditioner.balanced(n)).numpy()
    path = run_dir / "samples" / f"grid-step-{step}.png"
    if model.kind.is_image:
        return grids.save_grid(x, path, nrow=model.kind.num_classes or None)
    return charts.scatter(x, path, f"step {step}")


def log_interval(
    cfg: RunConfig,
    parts: Parts,
    stats: IntervalStats,
    log: MetricsLog,
    step: int,
    smoothed: float | None,
) -> float:
    """Write one metrics row for the interval ending at `step`; returns the row."""
    parts.world.sum_interval(stats)  # every rank's share: the row is the global batch's
    row = stats.row(step + 1)
    if smoothed is None or not math.isfinite(smoothed):
        smoothed = row["loss"]
    elif math.isfinite(row["loss"]):  # an interval whose updates were all skipped has no loss
        smoothed = 0.9 * smoothed + 0.1 * row["loss"]
    params = torch.cat([p.detach().flatten() for p in parts.net.parameters()])
    row.update(
        loss_smoothed=smoothed,
        lr=lr_at(cfg, step),
        ema_decay=parts.ema.current_decay(),
        param_norm=float(params.norm()),
        peak_memory_mb=build.peak_memory_mb(parts.device),
        **parts.monitor.row(),
    )
    log.write(row)
    stats.reset()
    return row


def note_best(cfg: RunConfig, parts: Parts, row: dict | None, step: int) -> bool:
    """Record `step` as the best so far if train.best_metric improved on it: the latest logged
    row's value, or for "eval" the evaluation of this very step (row = its result)."""
    metric = cfg.train.best_metric
    if not cfg.train.keep_best or row is None:
        return False
    higher = False
    if metric == "eval":
        if row.get("step") != step:
            return False
        metric = row["eval"]["metric"]
        value, higher = float(row["eval"][metric]), metric in HIGHER_IS_BETTER
    else:
        value = float(row[metric])
    if not math.isfinite(value):  # never a non-finite best
        return False
    if parts.best and not (value > parts.best["value"] if higher else value < parts.best["value"]):
        return False
    parts.best = {"metric": metric, "value": value, "step": step}
    return True


def evaluate_step(parts: Parts, log: MetricsLog, step: int) -> dict:
    """Run the training-time evaluator on the EMA weights; log and return {"step", "eval"}."""
    was_training = parts.ema.model.training
    parts.ema.model.eval()
    try:
        result = parts.evaluator(parts.model.with_net(parts.ema.model))
    finally:
        parts.ema.model.train(was_training)
    row = {"step": step, "eval": result}
    log.write(row)
    return row


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train the model `cfg` describes, writing everything under run_dir.

    Args:
        cfg: the resolved config.
        run_dir: the run directory (created; must not hold another run unless resume=True).
        resume: continue from the newest good checkpoint in run_dir.
        progress: show a progress bar.
        stop_after: stop (with a checkpoint) after this global step, as if interrupted; for tests.
    Returns:
        the path of the last checkpoint written.
    """
    run_dir = Path(run_dir)
    world = distributed.setup(cfg)  # one of several processes (torchrun, --nproc), or alone
    parts = build_parts(cfg, world)  # 1. build
    start, smoothed = open_run(cfg, run_dir, parts, resume)  # 2. open or resume
    distributed.attach(parts, cfg, world, start)  # DDP; this rank's dropout RNG
    try:
        log = distributed.SilentLog()  # ranks other than 0 write nothing
        if world.is_main:
            log = MetricsLog(
                run_dir / "metrics.jsonl",
                resume_step=start if resume else None,
                tensorboard=cfg.train.tensorboard,
            )
    except ImportError as e:
        raise ConfigError(str(e)) from None
    stats = IntervalStats(parts.device)
    parts.monitor.ckpt_dir = run_dir / "checkpoints"  # named if it stops on a non-finite loss
    end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
    bar = tqdm(
        total=cfg.train.steps,
        initial=start,
        desc="training",
        unit="step",
        disable=not progress or not world.is_main,
    )
    last, row, eval_row = None, None, None
    parts.net.train()
    began, limit_s = time.perf_counter(), cfg.train.time_limit_minutes * 60
    for step in range(start, end):  # 3. loop
        train_step(cfg, parts, stats, step)
        done = step + 1
        distributed.fault_hook(world, done)  # a test hook, off unless DIFFLAB_FAULT_* are set
        if faults.stop_requested(world, done):  # SIGINT / SIGTERM: a checkpoint here, then stop
            end = done
        if limit_s and world.any(time.perf_counter() - began > limit_s) and done < end:
            warnings.warn(
                f"train.time_limit_minutes reached after step {done}; stopping there "
                "(continue with --resume)",
                stacklevel=2,
            )
            end = done
        parts.monitor.check(world, done, end)  # train.nonfinite=stop: before anything is written
        if done % cfg.train.log_every == 0 or done == end:
            row = log_interval(cfg, parts, stats, log, step, smoothed)
            smoothed = row["loss_smoothed"]
            bar.set_postfix(loss=f"{smoothed:.4f}")
        sample = cfg.train.sample_every and (done % cfg.train.sample_every == 0 or done == end)
        if sample and world.is_main:
            snapshot(cfg, parts, run_dir, done)
        if parts.evaluator and (done % cfg.train.eval_every == 0 or done == end):
            eval_row = evaluate_step(parts, log, done)
            result = eval_row["eval"]
            bar.set_postfix({result["label"]: f"{result[result['metric']]:.4g}"})
        if done % cfg.train.checkpoint_every == 0 or done == end:
            by_eval = cfg.train.best_metric == "eval"
            improved = note_best(cfg, parts, eval_row if by_eval else row, done)
            parts.monitor.check_weights(world, done, parts.net, parts.ema.model)
            if world.is_main:
                last = save_checkpoint(
                    run_dir / "checkpoints",
                    done,
                    parts.net,
                    parts.ema.model,
                    _state(parts, done, smoothed),
                    cfg.to_dict(),
                    parts.data_info(),
                    cfg.train.keep_checkpoints,
                )
                if improved:
                    publish_best(run_dir / "checkpoints", last, parts.best)
            world.barrier()  # the others wait while rank 0 writes: none runs ahead
        bar.update(1)
        if done == end:
            break
    bar.close()
    log.close()
    distributed.shutdown(world)
    return last if last is not None else latest_good_checkpoint(run_dir / "checkpoints")
