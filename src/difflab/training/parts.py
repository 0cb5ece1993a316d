"""Stages 1 and 2 of training: every object a run needs, built from its config (`Parts`),
and the run directory opened fresh or resumed from its newest good checkpoint."""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflab import build, devices
from difflab.config import ConfigError, RunConfig
from difflab.model import Model
from difflab.training import companion, distributed, phema, teacher
from difflab.training.checkpoint import (
    CheckpointError,
    is_weights_file,
    latest_good_checkpoint,
    list_checkpoints,
    load_config,
    load_state,
    load_weights,
    load_weights_file_into,
    remove_leftovers,
)
from difflab.training.ema import EMA
from difflab.training.hooks import NO_HOOKS, Hooks, check_hooks, judge_for
from difflab.training.nonfinite import NonFiniteMonitor, check_config

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
    evaluator: object | None = None  # train.eval_metric every train.eval_every steps (Hooks)
    world: distributed.World = field(default_factory=distributed.World)  # this process's rank
    monitor: NonFiniteMonitor | None = None  # non-finite losses and gradients (train.nonfinite)
    power_ema: phema.PowerEMA | None = None  # train.phema_sigma_rels' profiles (post-hoc EMA)
    companion: companion.Companion | None = None  # train.guide_model: autoguidance's weak net

    @property
    def net(self) -> torch.nn.Module:
        return self.model.net

    def data_info(self) -> dict:
        return self.model.kind.info()


def check_train_config(cfg: RunConfig, hooks: Hooks | None = None) -> None:
    """Every problem of cfg.train in one ConfigError; with `hooks`, also what they must supply."""
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
    problems += phema.check_config(t)
    problems += companion.check_config(t)
    if hooks is not None:
        problems += check_hooks(cfg, hooks)
    if problems:
        raise ConfigError("; ".join(problems))


def build_parts(
    cfg: RunConfig, world: distributed.World | None = None, hooks: Hooks = NO_HOOKS
) -> Parts:
    """Stage 1: every object of the run, seeded from train.seed; `world`: this process's rank
    when several train together (default: alone)."""
    world = world or distributed.World()
    check_train_config(cfg, hooks)
    device = devices.resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)  # weight init, dropout
    data = build.build_data(cfg, seed=cfg.train.seed)
    model = build.build_model(cfg, build.data_kind(cfg, data), device)
    model.check_sample(cfg.sample, dry_run=True)  # a sample.* typo fails before step 1
    if model.kind.text:  # the captions' conditions, computed once (cached)
        model.conditioner.fit(data.captions)
    data = devices.place_data(model.codec.training_data(data, cfg), device)  # latents, cached
    if cfg.train.init_from:  # reflow: start from a trained model's EMA weights
        _init_weights(Path(cfg.train.init_from), model.net)
    loss = build.build_loss(cfg, model.schedule)
    if loss.needs_teacher:  # ECT / CD: start from (and distil) a trained run
        teacher.attach(loss, cfg, model)
    loss.attach(model, device, judge_for(loss, cfg, hooks))
    ema = EMA(model.net, cfg.train.ema_decay, cfg.train.ema_warmup)
    optimizer = devices.adamw(model.net, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    loss_generator = torch.Generator().manual_seed(cfg.train.seed + 1)  # t, eps, label dropout
    say = (lambda message: print(f"difflab: {message}")) if world.is_main else None
    dtype = devices.resolve_precision(cfg.train.precision, device, "train.precision", say)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    forward = model.with_net(devices.maybe_compile(model.net, cfg.train.compile, "train.compile"))
    target = None
    if loss.target_decay(0) is not None:  # a stop-gradient copy or an EMA of the online net
        target = copy.deepcopy(model.net).requires_grad_(False)
    power_ema = None  # post-hoc EMA's profiles, off by default (phema.py)
    if cfg.train.phema_sigma_rels:
        power_ema = phema.PowerEMA(model.net, cfg.train.phema_sigma_rels)
    weak = None  # autoguidance's companion, off by default (companion.py)
    if cfg.train.guide_model:
        weak = companion.Companion(cfg, model, dtype)
    evaluator = None
    if cfg.train.eval_every and world.is_main:  # now: a missing judge fails before step 1
        evaluator = hooks.evaluator(cfg, model)
    return Parts(
        model,
        loss,
        ema,
        optimizer,
        data,
        loss_generator,
        device,
        scaler,
        dtype,
        forward,
        target,
        evaluator=evaluator,
        world=world,
        monitor=NonFiniteMonitor(
            cfg, device, lambda s: lr_at(cfg, s), dtype is torch.float16, world.rank
        ),
        power_ema=power_ema,
        companion=weak,
    )


def _init_weights(path: Path, net: torch.nn.Module) -> None:
    """train.init_from: a checkpoint folder's EMA weights, or a weights file's (its fp16 EMA
    weights upcast to float32: `difflab reflow pretrained:NAME`)."""
    if is_weights_file(path):
        load_weights_file_into(path, net)
    else:
        load_weights(path, net, "ema")


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at train.steps."""
    t = cfg.train
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    if t.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step / t.steps, 1.0)))
    return lr


def state_of(parts: Parts, step: int, smoothed: float | None) -> dict:
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
        **({"loss": parts.loss.state_dict()} if parts.loss.has_state else {}),
        **({"phema": parts.power_ema.state_dict()} if parts.power_ema is not None else {}),
        **({"guide": parts.companion.state_dict()} if parts.companion is not None else {}),
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


def check_resumable(saved: dict, cfg: RunConfig, run_dir: Path, source: str) -> None:
    """Refuse to resume with a config that differs from the saved one (`source` says which:
    the checkpoint's, or the run's config.json) outside RESUMABLE_CHANGES and sample.*."""
    changed = [
        k
        # through RunConfig, so keys added since the config was written take their defaults
        for k in config_differences(RunConfig.from_dict(saved).to_dict(), cfg.to_dict())
        if k not in RESUMABLE_CHANGES and not k.startswith("sample.")
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume {run_dir}: the config differs from {source} in "
            f"{', '.join(changed)}; "
            f"only {', '.join(RESUMABLE_CHANGES)} and sample.* may change on resume"
        )


def resume_parts(parts: Parts, cfg: RunConfig, run_dir: Path) -> tuple[int, float | None]:
    """Stage 2 (resume): load the newest good checkpoint; returns (step, smoothed loss). A run
    killed before its first checkpoint was complete (its config.json, no step-N) starts from
    step 0: `parts` are exactly what a fresh run builds, so it ends as a straight run would."""
    ckpt_dir = run_dir / "checkpoints"
    if not list_checkpoints(ckpt_dir) and (run_dir / "config.json").is_file():
        check_resumable(load_config(run_dir), cfg, run_dir, "its config.json")
        if parts.world.is_main:
            print(
                f"difflab: no complete checkpoint in {ckpt_dir} (the run stopped before its "
                "first); starting from step 0"
            )
            _make_folders(run_dir)  # e.g. checkpoints/, removed to start over
        return 0, None
    ckpt = latest_good_checkpoint(ckpt_dir)
    check_resumable(load_config(ckpt), cfg, run_dir, "the checkpoint's")
    load_weights(ckpt, parts.net, "model")
    load_weights(ckpt, parts.ema.model, "ema")
    state = load_state(ckpt)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.ema.load_state_dict(state["ema"])
    if state["data"] is not None:  # None: an imported run, whose stream starts fresh
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
    if parts.loss.has_state:
        parts.loss.load_state_dict(state["loss"])
    if parts.power_ema is not None:
        parts.power_ema.load_state_dict(state["phema"])
    if parts.companion is not None:
        parts.companion.load_state_dict(state["guide"])
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
    # a run is its config.json (written before step 1) or a checkpoint; empty folders alone
    # are what a process killed before writing the config left, and are trained over
    if (run_dir / "config.json").exists() or list_checkpoints(run_dir / "checkpoints"):
        raise ConfigError(
            f"{run_dir} already holds a run; resume it with --resume {run_dir} (from its newest "
            "checkpoint, or from step 0 if none is complete) or choose another --name"
        )
    _make_folders(run_dir)
    cfg.save(run_dir / "config.json")  # atomically: resume reads it
    return 0, None


def _make_folders(run_dir: Path) -> None:
    for sub in ("checkpoints", "samples", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
