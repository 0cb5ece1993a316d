"""What training calls out to, supplied by the layers above it, so that training imports neither
evaluation nor report (the data flow reads one way: ... -> training -> ... -> evaluation ->
report). `difflab.report.run.training_hooks()` gives difflab's own; the CLI passes it, and so
does any caller that sets train.sample_every or train.eval_every.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflab.errors import ConfigError


@dataclass(frozen=True)
class Hooks:
    """Args:
    evaluator: (cfg, model) -> the training-time evaluator, built before step 1 (so a missing
        judge stops the run then): a callable model -> {"metric", "label", <metric>: value, ...}
        with an attribute `higher_is_better`.
    grid: (samples (N, ...), path, model) -> path: draws samples/grid-step-N.png.
    judge: cfg -> the judge network whose features an autoencoder's feature loss compares.
    """

    evaluator: Callable | None = None
    grid: Callable[[np.ndarray, Path, object], Path] | None = None
    judge: Callable | None = None


NO_HOOKS = Hooks()  # a bare train(): no grids, no training-time evaluation


def check_hooks(cfg, hooks: Hooks) -> list[str]:
    """Problems (for train.check_train_config's one message) with what cfg asks of the hooks."""
    problems = []
    for key, hook in (("sample_every", hooks.grid), ("eval_every", hooks.evaluator)):
        if getattr(cfg.train, key) and hook is None:
            problems.append(
                f"train.{key}={getattr(cfg.train, key)} needs the report's hooks: call "
                "train(..., hooks=difflab.report.run.training_hooks()) as `difflab train` does, "
                f"or set train.{key}=0"
            )
    return problems


def judge_for(loss, cfg, hooks: Hooks):
    """The judge network a loss asks for (its `wants_judge` declaration, loss_base.py), or None;
    a ConfigError where it asks and the hooks have none (a bare train())."""
    if not loss.wants_judge:
        return None
    if hooks.judge is None:
        raise ConfigError(
            f"train.loss={cfg.train.loss} with these settings compares judge features (e.g. "
            "train.autoencoder.feature_weight > 0) and needs the report's hooks: "
            "train(..., hooks=difflab.report.run.training_hooks()), or turn the features off"
        )
    return hooks.judge(cfg)
