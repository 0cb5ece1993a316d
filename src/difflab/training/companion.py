"""Autoguidance's weak model, trained beside the main one (`train.guide_model`, `guide_steps`).

Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 1 guides the
main denoiser D_1 by a weaker one D_0,

    D_w(x; sigma, c) = w D_1(x; sigma, c) + (1 - w) D_0(x; sigma, c),

and Sec. 3 and 5 say what D_0 should be: the same task, conditioning and data distribution,
degraded the way D_1 is, i.e. a smaller network trained for less time (their EDM2-XS guides
EDM2-S, trained for a fraction of its images). This module trains such a companion inside the
run: every micro-batch of the main net (its data, noise, t and dropped labels) also goes
through the companion, which has its own AdamW (the main lr recipe over guide_steps), EMA and
gradient scaler, and stops updating after train.guide_steps. Its widths are the main net's
times train.guide_model, rounded to what the net accepts (GroupNorm groups, attention heads).

Where it lives:
- its full state (weights, EMA, optimizer, scaler, updates taken) rides in each main
  checkpoint's state.pt under "guide", so a resume continues it bit for bit;
- its sampling weights are a run directory of their own, RUN/guide/ (config.json with the
  smaller widths, checkpoints/step-K written by `save_checkpoint`, atomically), which
  `--guidance-method auto` uses when no `--guide-with` is given (runs.attach_guide).

It never touches the main run's random streams: its weights are drawn from a forked RNG, so
the main net trains to the same numbers with the companion on or off (with nets that use no
dropout; dropout draws from the one global RNG).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist

from difflab import build, devices
from difflab.config import ConfigError, RunConfig
from difflab.training.checkpoint import (
    COMPANION_FOLDER,
    list_checkpoints,
    save_checkpoint,
)
from difflab.training.ema import EMA

FAMILIES = ("diffusion", "flow")  # losses of (x0, noise) alone: no teacher, target or state


def check_config(train) -> list[str]:
    """Problems of train.guide_model and train.guide_steps (for check_train_config)."""
    scale, steps = train.guide_model, train.guide_steps
    if not (math.isfinite(scale) and 0 <= scale < 1):
        return [
            f"train.guide_model must be a width scale in (0, 1) of the main net (0 = no "
            f"companion; Karras et al. 2024 guide with a smaller net), got {scale}"
        ]
    if scale == 0:
        if steps:
            return ["train.guide_steps needs train.guide_model > 0 (the companion's width)"]
        return []
    if not 1 <= steps <= train.steps:
        return [
            f"train.guide_steps must be in [1, train.steps={train.steps}] with train.guide_model "
            f"(the companion trains shorter than the main net), got {steps}"
        ]
    return []


def _scaled(width: int, scale: float, multiple: int) -> int:
    """width * scale, rounded to a multiple of `multiple`, at least `multiple`."""
    return max(multiple, round(width * scale / multiple) * multiple)


def companion_config(cfg: RunConfig) -> RunConfig:
    """The companion's own config: the main one with every width scaled by train.guide_model,
    trained for train.guide_steps, and none of the main run's extras (no companion of its own,
    no snapshots, grids or evaluations)."""
    scale, m = cfg.train.guide_model, cfg.model
    unet, dit = m.unet, m.dit
    model = dataclasses.replace(
        m,
        mlp=dataclasses.replace(m.mlp, width=_scaled(m.mlp.width, scale, 1)),
        unet=dataclasses.replace(
            unet,
            base_channels=_scaled(
                unet.base_channels, scale, math.lcm(unet.norm_groups, unet.num_heads)
            ),
        ),
        dit=dataclasses.replace(dit, width=_scaled(dit.width, scale, math.lcm(4, dit.heads))),
    )
    train = dataclasses.replace(
        cfg.train,
        steps=cfg.train.guide_steps,
        guide_model=0.0,
        guide_steps=0,
        phema_sigma_rels=(),
        phema_every=0,
        eval_every=0,
        sample_every=0,
        best_metric="loss_smoothed",
    )
    return dataclasses.replace(cfg, model=model, train=train)


class Companion:
    """A smaller net trained on the main net's micro-batches for train.guide_steps updates.

    Args:
        cfg: the main run's config (train.guide_model > 0).
        model: the main run's Model (its conditioner and codec are shared).
        autocast_dtype: the main run's training precision (None = float32).
    """

    def __init__(self, cfg: RunConfig, model, autocast_dtype: torch.dtype | None):
        if model.kind.family not in FAMILIES:
            raise ConfigError(
                f"train.guide_model trains a companion with the plain diffusion or flow loss; "
                f"this run is a {model.kind.family} run (set train.guide_model=0, and guide "
                "with an earlier checkpoint: --guide-with RUN:step-N)"
            )
        self.cfg = companion_config(cfg)
        device = model.device
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):  # the main run's RNG stays untouched
            torch.manual_seed(cfg.train.seed + 2)
            built = build.build_model(self.cfg, model.kind.data, device)
        self.model = dataclasses.replace(built, conditioner=model.conditioner, codec=model.codec)
        t = self.cfg.train
        self.ema = EMA(self.net, t.ema_decay, t.ema_warmup)
        self.optimizer = devices.adamw(self.net, t.lr, t.betas, t.weight_decay)
        self.autocast_dtype = autocast_dtype
        enabled = autocast_dtype is torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)
        self.updates = 0  # optimizer steps taken (the companion's own step count)

    @property
    def net(self) -> torch.nn.Module:
        return self.model.net

    def learning(self, step: int) -> bool:
        """Whether main step `step` (from 0) also trains the companion."""
        return step < self.cfg.train.steps

    def accumulate(self, loss_fn, z, cond, noise, step: int, grad_accum: int) -> None:
        """Backward of the companion's loss on one micro-batch of the main step: the same
        data (already encoded), conditions and noise."""
        dtype = self.autocast_dtype
        with torch.autocast(z.device.type, dtype or torch.float32, enabled=dtype is not None):
            loss, _ = loss_fn(self.model, z, cond, noise=noise, step=step, target=None)
        self.scaler.scale(loss.mean() / grad_accum).backward()

    def update(self, step: int, lr: float, world) -> None:
        """AdamW at `lr` (the main recipe's over guide_steps), clipped as the main net is, then
        its EMA; an update with a non-finite gradient is dropped (the companion only guides)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.net.parameters() if p.grad is not None]
        if world.size > 1:  # average over the ranks' shares, as DDP does for the main net
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world.size
        self.scaler.unscale_(self.optimizer)  # after the average: every rank sees the same inf
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        finite = bool(torch.isfinite(grad_norm.detach()))
        if finite or self.scaler.is_enabled():  # fp16: the scaler skips a non-finite step itself
            self.scaler.step(self.optimizer)
        self.scaler.update()  # fp16: a smaller scale after a non-finite step
        if finite:
            self.ema.update(self.net)
        self.optimizer.zero_grad(set_to_none=True)
        self.updates = step + 1

    def publish(self, run_dir: Path, data_info: dict) -> Path | None:
        """RUN/guide/checkpoints/step-K (K = updates taken) and RUN/guide/config.json, written
        atomically, unless step-K is there already; the newest alone is kept."""
        if self.updates == 0:
            return None
        folder = Path(run_dir) / COMPANION_FOLDER
        ckpt_dir = folder / "checkpoints"
        if ckpt_dir / f"step-{self.updates}" in list_checkpoints(ckpt_dir):
            return None
        folder.mkdir(parents=True, exist_ok=True)
        self.cfg.save(folder / "config.json")
        config = self.cfg.to_dict()
        state = {"step": self.updates}
        return save_checkpoint(
            ckpt_dir, self.updates, self.net, self.ema.model, state, config, data_info, keep=1
        )

    def state_dict(self) -> dict:
        weights = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
        return {
            "net": weights(self.net),
            "ema_net": weights(self.ema.model),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.model.load_state_dict(state["ema_net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.updates = int(state["updates"])
