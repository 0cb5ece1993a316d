"""The base of every loss the trainer calls (EDM's `training/loss.py` shape: one small class per
formulation). What a loss needs from the trainer is declared here, so the trainer asks and
never probes:

    needs_teacher   a trained run: training.teacher.attach loads it before the EMA and the
                    target network are made (ECT and CD start from its weights)
    distils         the teacher's solver step: attach sets `teacher_step` (CD)
    target_decay    a target network: None (none), 0 (a stop-gradient copy) or an EMA rate
    has_state       trainable state of its own (a discriminator): `attach`, `state_dict` and
                    `load_state_dict`, checkpointed in state.pt under "loss"
    wants_judge     the judge network (training.hooks.Hooks.judge), given to `attach`
    couple          the noise of the global batch paired with it (OT, reflow); as drawn here
    log_row         values merged into each metrics row (a curriculum's N(k))
    second_time     a net that reads a second time t2 (model.second_time; MeanFlow, shortcut):
                    build refuses the config without it, and `attach` the net without it
"""

from __future__ import annotations

from torch import Tensor, nn


class Loss:
    """A loss: `draw` the noise of a global batch, optionally `couple` it, then `__call__` on
    this process's slice. Subclasses override what they need; the defaults are "nothing"."""

    needs_teacher = False
    distils = False
    has_state = False
    wants_judge = False
    second_time = False

    def draw(self, shape: tuple[int, ...], generator) -> tuple[Tensor, ...]:
        """The noise tensors of a global batch of `shape` (B, ...), from `generator`."""
        raise NotImplementedError

    def couple(self, x0: Tensor, noise: tuple[Tensor, ...], data) -> tuple[Tensor, ...]:
        """The noise paired with the global batch x0 (before slicing); independent: as drawn."""
        return noise

    def __call__(
        self, model, x0: Tensor, cond, *, noise, step: int, target: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """(per-example loss (B,), the t (B,) in [0, 1] it is logged at)."""
        raise NotImplementedError

    def target_decay(self, step: int) -> float | None:
        """The target network's EMA rate at `step` (0: a stop-gradient copy; None: none)."""
        return None

    def attach(self, model, device, judge: nn.Module | None = None) -> None:
        """Take the run's model and device before the first step (trainable state, judge)."""

    def state_dict(self) -> dict:
        """The loss's own trainable state (has_state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s state on resume (has_state)."""

    def log_row(self, step: int) -> dict:
        """Values merged into the metrics row of `step`."""
        return {}
