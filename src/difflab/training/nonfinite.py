"""Non-finite losses and gradients (train.nonfinite): found at the step they happen, never saved.

Reading a GPU value on the host waits for the device, so in `stop` mode the monitor keeps a
device-side record, the first step whose loss or gradient norm was not finite, and reads it only
at log and checkpoint boundaries (on the CPU, where reading costs nothing, after every step).
`skip` must decide before the optimizer step, so it reads its flag every step: one sync per step,
as fp16's GradScaler already makes. Under fp16 the GradScaler skips non-finite steps itself
(lowering its scale); those are counted (metrics.jsonl "scaler_skips"), not a failure. Whatever
the mode, weights that are not finite are never written: `check_weights` runs before each save.
With several processes every decision is all-reduced, so all ranks stop or skip alike.

Test hook: DIFFLAB_FAULT_NAN_STEP=s (also "s1,s2" or "a-b") makes the loss NaN at those steps
(numbered from 1, as in metrics.jsonl and checkpoint names), on every rank or only on rank
DIFFLAB_FAULT_NAN_RANK.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from difflab.training.checkpoint import list_checkpoints, verify_checkpoint
from difflab.training.faults import TrainingFault

NAN_ENV = "DIFFLAB_FAULT_NAN_STEP"
MODES = ("stop", "skip")


def check_config(t) -> list[str]:
    """Problems with train.nonfinite and train.nonfinite_max_skips (TrainConfig `t`)."""
    problems = []
    if t.nonfinite not in MODES:
        problems.append(f"train.nonfinite must be stop or skip, got {t.nonfinite!r}")
    if t.nonfinite_max_skips < 1:
        problems.append(f"train.nonfinite_max_skips must be >= 1, got {t.nonfinite_max_skips}")
    return problems


def _steps(text: str) -> set[int]:
    steps = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


class NonFiniteMonitor:
    """Watches each step's losses and gradient norm; see the module docstring.

    Args:
        cfg: the run config (train.nonfinite, nonfinite_max_skips; lr and precision for messages).
        device: the training device (where the flags live).
        lr_of: lr_of(step) -> the learning rate of 0-based `step`.
        fp16: the GradScaler is on.
        rank: this process's rank (for the test hook).
    """

    def __init__(self, cfg, device: torch.device, lr_of, fp16: bool, rank: int = 0):
        self.cfg, self.lr_of, self.fp16 = cfg, lr_of, fp16
        self.mode, self.max_skips = cfg.train.nonfinite, cfg.train.nonfinite_max_skips
        self.every_step = device.type == "cpu"  # reading a CPU flag costs no sync
        only = os.environ.get("DIFFLAB_FAULT_NAN_RANK")
        hooked = only is None or int(only) == rank
        self.poisoned = _steps(os.environ.get(NAN_ENV, "")) if hooked else set()
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet
        self.scaler_skips = torch.zeros((), dtype=torch.long, device=device)  # this interval
        self.skips, self.in_a_row = 0, 0  # skipped updates: this interval, consecutive
        self.ckpt_dir: Path | None = None  # named in the stop message (set by train)

    def poison(self, loss: Tensor, step: int) -> Tensor:
        """The test hook: NaN losses at the DIFFLAB_FAULT_NAN_STEP steps (0-based `step`)."""
        return loss * float("nan") if step + 1 in self.poisoned else loss

    def observe(self, world, step: int, losses: list[Tensor], grad_norm: Tensor) -> bool:
        """After backward and clipping, before the optimizer step of 0-based `step`: whether to
        apply the update (False: skip mode drops it). Raises TrainingFault past the skip limit."""
        if self.fp16:
            return True  # GradScaler.step skips it itself; counted by scaler_step
        finite = torch.isfinite(grad_norm)
        for loss in losses:
            finite = finite & torch.isfinite(loss).all()
        if self.mode == "stop":  # recorded on the device, read at the next boundary
            self.first_bad = torch.where(finite | (self.first_bad >= 0), self.first_bad, step + 1)
            return True
        if not world.any(not bool(finite)):
            self.in_a_row = 0
            return True
        self.skips, self.in_a_row = self.skips + 1, self.in_a_row + 1
        if self.in_a_row >= self.max_skips:
            raise self._fault(
                step + 1,
                f"{self.in_a_row} updates in a row had a non-finite loss or gradient and were "
                f"skipped (train.nonfinite_max_skips={self.max_skips})",
            )
        return False

    def scaler_step(self, scaler: torch.amp.GradScaler, optimizer) -> None:
        """scaler.step and update, counting the steps fp16's scaler skipped (its scale fell)."""
        before = (
            scaler._scale.clone() if scaler.is_enabled() and scaler._scale is not None else None
        )
        scaler.step(optimizer)
        scaler.update()
        if before is not None:
            self.scaler_skips += (scaler._scale < before).long()

    def check(self, world, step: int, end: int) -> None:
        """Stop mode, after 1-based `step` of a loop ending at `end`: raise TrainingFault if any
        step so far had a non-finite loss or gradient. Reads the flag only where something is
        written or drawn next (log, sample, evaluation, checkpoint, end; every step on the CPU)."""
        t = self.cfg.train
        every = (t.log_every, t.checkpoint_every, t.sample_every, t.eval_every)
        boundary = step == end or any(k and step % k == 0 for k in every)
        if self.mode != "stop" or self.fp16 or not (boundary or self.every_step):
            return
        first = int(self.first_bad)  # the one host read
        if world.any(first >= 0):
            raise self._fault(first if first > 0 else step, "the loss or gradient is not finite")

    def check_weights(self, world, step: int, *modules: torch.nn.Module) -> None:
        """Before a checkpoint is written or published: refuse weights that are not finite."""
        flags = [torch.isfinite(p).all() for m in modules for p in m.parameters()]
        finite = bool(torch.stack(flags).all()) if flags else True
        if world.any(not finite):
            raise self._fault(step, "the weights are not finite (not saved)")

    def row(self) -> dict:
        """This interval's counts for metrics.jsonl; starts the next interval."""
        out = {"nonfinite_skips": self.skips}
        if self.fp16:
            out["scaler_skips"] = int(self.scaler_skips)
            self.scaler_skips.zero_()
        self.skips = 0
        return out

    def _fault(self, step: int, what: str) -> TrainingFault:
        t = self.cfg.train
        last = self._last_good()
        if last is None:
            where = "no checkpoint was written before it"
        else:
            skip = " --set train.nonfinite=skip" if self.mode == "stop" else ""
            where = (
                f"the last good checkpoint is {last} (resume it with `difflab train --resume "
                f"{last.parent.parent}{skip}`)"
            )
        tips = ["a lower train.lr"]
        if t.grad_clip == 0:
            tips.append("train.grad_clip=1")
        if t.precision == "fp16":
            tips.append("train.precision=bf16 instead of fp16")
        if t.warmup_steps == 0:
            tips.append("train.warmup_steps=200")
        if self.mode == "stop":
            tips.append("train.nonfinite=skip to drop such updates")
        fault = TrainingFault(
            f"training stopped at step {step}: {what} (lr {self.lr_of(step - 1):.3g}, "
            f"precision {t.precision}); {where}; try {', '.join(tips)}"
        )
        fault.everywhere = True  # every rank decided alike
        return fault

    def _last_good(self) -> Path | None:
        if self.ckpt_dir is None:
            return None
        for path in reversed(list_checkpoints(self.ckpt_dir)):
            if verify_checkpoint(path) is None:
                return path
        return None
