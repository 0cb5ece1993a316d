"""Stage 3 of training, one step at a time: micro-batches -> loss -> clip -> AdamW -> EMA (and
the loss's target network), the logged interval, and the choice of the best checkpoint."""

from __future__ import annotations

import math
import time

import torch

from difflab import devices
from difflab.config import RunConfig
from difflab.training.logging import MetricsLog
from difflab.training.parts import Parts, lr_at

NUM_BUCKETS = 10  # loss is also logged per tenth of t in [0, 1]


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
    weak = parts.companion if parts.companion and parts.companion.learning(step) else None
    pending = []  # (loss, t) of each micro-batch: counted once the update is taken
    for _ in range(cfg.train.grad_accum):
        x0, y = parts.data.next_batch(micro)
        cond = model.conditioner.train_condition(y, parts.loss_generator, parts.device)
        shape = (len(x0), *model.codec.latent_shape(tuple(x0.shape[1:])))
        noise = parts.loss.draw(shape, parts.loss_generator)
        noise = parts.loss.couple(x0, noise, parts.data)  # OT or reflow pairing, global batch
        posterior = model.codec.draw(len(x0), parts.loss_generator)  # () unless z is sampled
        # Every rank draws the global micro-batch and its noise and keeps its slice, so N ranks
        # equal one process and the stream state stays global (distributed.py says more).
        x0, cond, *noise = parts.world.shard(x0, cond, *noise, *posterior)
        k = len(noise) - len(posterior)
        noise, posterior = noise[:k], noise[k:]
        x0 = x0.to(parts.device, memory_format=model.memory_format)
        z = model.codec.encode(x0, *(e.to(parts.device) for e in posterior))
        with torch.autocast(
            parts.device.type,
            parts.autocast_dtype or torch.float32,
            enabled=parts.autocast_dtype is not None,
        ):
            loss, t = parts.loss(model, z, cond, noise=noise, step=step, target=parts.target)
        loss = parts.monitor.poison(loss, step)  # a test hook, off unless DIFFLAB_FAULT_NAN_STEP
        parts.scaler.scale(loss.mean() / cfg.train.grad_accum).backward()
        pending.append((loss.detach(), t))
        if weak is not None:  # the companion learns from the same micro-batch (companion.py)
            weak.accumulate(parts.loss, z, cond, noise, step, cfg.train.grad_accum)
    if weak is not None:
        weak.update(step, lr_at(weak.cfg, step), parts.world)
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
    if parts.power_ema is not None:  # post-hoc EMA's profiles (phema.py), t counted from 1
        parts.power_ema.update(parts.net, step + 1)
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
        peak_memory_mb=devices.peak_memory_mb(parts.device),
        **parts.monitor.row(),
        **parts.loss.log_row(step),  # e.g. a curriculum's N(k)
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
        value, higher = float(row["eval"][metric]), parts.evaluator.higher_is_better
    else:
        value = float(row[metric])
    if not math.isfinite(value):  # never a non-finite best
        return False
    if parts.best and not (value > parts.best["value"] if higher else value < parts.best["value"]):
        return False
    parts.best = {"metric": metric, "value": value, "step": step}
    return True
