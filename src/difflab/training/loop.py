"""train(cfg): one staged loop, read top to bottom.

1. Build everything from the config before touching the disk (a bad config leaves nothing behind).
2. Open the run directory: a fresh one, or resume from its newest good checkpoint.
3. Loop: micro-batches -> loss -> clip -> AdamW step -> EMA; log every `log_every` steps,
   checkpoint every `checkpoint_every` steps and at the end.
Everything random draws from generators whose states are checkpointed, so a run stopped at step
N/2 and resumed ends with the same weights, bit for bit on the CPU, as one trained straight through.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from difflab import build, devices
from difflab.config import ConfigError, RunConfig, use_ema_of
from difflab.model import Model
from difflab.samplers.progress import progress_bar
from difflab.training import distributed, faults
from difflab.training.checkpoint import (
    latest_good_checkpoint,
    publish_best,
    save_checkpoint,
)
from difflab.training.hooks import NO_HOOKS, Hooks
from difflab.training.logging import MetricsLog, SilentLog
from difflab.training.parts import Parts, build_parts, open_run, state_of
from difflab.training.step import IntervalStats, log_interval, note_best, train_step

SNAPSHOT_N = 64  # samples in a training-time grid


@contextmanager
def sampled_model(cfg: RunConfig, parts: Parts) -> Iterator[Model]:
    """The model training-time grids and metrics sample: around the EMA copy or the raw net, as
    sample.use_ema says (`config.use_ema_of`, as for a loaded run), in eval mode meanwhile."""
    net = parts.ema.model if use_ema_of(cfg.sample) else parts.net
    was_training = net.training
    net.eval()
    try:
        yield parts.model.with_net(net)
    finally:
        net.train(was_training)


@torch.no_grad()
def snapshot(cfg: RunConfig, parts: Parts, run_dir: Path, step: int, hooks: Hooks) -> Path:
    """samples/grid-step-N.png from the sampled weights (EMA by default) and fixed noise (the
    same every time, so grids across training show progress, not noise); per class for
    conditional models."""
    with sampled_model(cfg, parts) as model:
        n = SNAPSHOT_N if model.kind.is_image else 2000
        scfg = dataclasses.replace(cfg.sample, n=n, batch_size=SNAPSHOT_N, compile=False)
        x = model.sample(scfg, cond=model.conditioner.balanced(n)).numpy()
    return hooks.grid(x, run_dir / "samples" / f"grid-step-{step}.png", model)


def evaluate_step(cfg: RunConfig, parts: Parts, log: MetricsLog, step: int) -> dict:
    """Run the training-time evaluator on the sampled weights (EMA by default); log and return
    {"step", "eval"}."""
    with sampled_model(cfg, parts) as model:
        result = parts.evaluator(model)
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
    hooks: Hooks = NO_HOOKS,
) -> Path:
    """Train the model `cfg` describes, writing everything under run_dir.

    Args:
        cfg: the resolved config.
        run_dir: the run directory (created; must not hold another run unless resume=True).
        resume: continue from the newest good checkpoint in run_dir.
        progress: show a progress bar.
        stop_after: stop (with a checkpoint) after this global step, as if interrupted; for tests.
        hooks: the training-time grids and evaluator (report.run.training_hooks()); needed
            when train.sample_every or train.eval_every is set.
    Returns:
        the path of the last checkpoint written.
    """
    run_dir = Path(run_dir)
    devices.keep_freed_memory()  # steps reuse the memory the last one freed (devices.py says why)
    cfg = build.pin_codec(cfg)  # a latent run records the SHA-256 of its autoencoder
    world = distributed.setup(cfg)  # one of several processes (torchrun, --nproc), or alone
    parts = build_parts(cfg, world, hooks)  # 1. build
    start, smoothed = open_run(cfg, run_dir, parts, resume)  # 2. open or resume
    distributed.attach(parts, cfg, world, start)  # DDP; this rank's dropout RNG
    try:
        log = SilentLog()  # ranks other than 0 write nothing
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
    bar = progress_bar(
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
            snapshot(cfg, parts, run_dir, done, hooks)
        if parts.evaluator and (done % cfg.train.eval_every == 0 or done == end):
            eval_row = evaluate_step(cfg, parts, log, done)
            result = eval_row["eval"]
            bar.set_postfix({result["label"]: f"{result[result['metric']]:.4g}"})
        if parts.power_ema is not None and done % cfg.train.phema_every == 0 and world.is_main:
            parts.power_ema.save_snapshot(run_dir, done)  # a resume rewrites later ones, the same
        if done % cfg.train.checkpoint_every == 0 or done == end:
            by_eval = cfg.train.best_metric == "eval"
            improved = note_best(cfg, parts, eval_row if by_eval else row, done)
            parts.monitor.check_weights(world, done, parts.net, parts.ema.model)
            if world.is_main and parts.companion is not None:  # before the main checkpoint
                parts.companion.publish(run_dir, parts.data_info())
            if world.is_main:
                last = save_checkpoint(
                    run_dir / "checkpoints",
                    done,
                    parts.net,
                    parts.ema.model,
                    state_of(parts, done, smoothed),
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
