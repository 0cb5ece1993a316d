"""The k+1-rectified flow's run: the k-rectified flow's config, trained on its pairs (Liu et al.
2023, Algorithm 1: minimise E || (X_1 - X_0) - v(X_t, t) ||^2 over the coupling (X_0, X_1) the
previous flow's ODE made), optionally starting from its weights.

The data set's name stays (so evaluation, figures and references are those of the data set the
pairs came from); data.pairs names the folder and diffusion.coupling=reflow hands the loss the
stored noise of each pair instead of fresh noise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from difflab.config import RunConfig, apply_overrides


def reflow_config(
    cfg: RunConfig, pairs: Path, init_from: Path | None, overrides: list[str] = ()
) -> RunConfig:
    """The reflow run's config from the source run's `cfg` and its pairs folder."""
    data = dataclasses.replace(cfg.data, pairs=str(Path(pairs).resolve()))
    diffusion = dataclasses.replace(cfg.diffusion, coupling="reflow")
    train = dataclasses.replace(
        cfg.train, init_from=str(Path(init_from).resolve()) if init_from else ""
    )
    out = dataclasses.replace(cfg, data=data, diffusion=diffusion, train=train)
    return apply_overrides(out, list(overrides))
