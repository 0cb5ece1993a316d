"""`difflab.reflow`: `difflab reflow RUN` from Python (the same pairs, reflow run, reflow.json
and report), returning the next round's rectified flow."""

from __future__ import annotations

from pathlib import Path

from difflab.api.run import Run, load
from difflab.api.train import _override
from difflab.cli.reflow import reflow_dir, run_reflow


def reflow(
    run: Run | str | Path,
    pairs: int = 50_000,
    name: str | None = None,
    runs: str | Path | None = None,
    *,
    chunk: int = 5000,
    init: bool = True,
    sampler: str | None = None,
    steps: int | None = None,
    finish: bool = True,
    progress: bool = True,
    **overrides,
) -> Run:
    """One round of reflow (Liu et al. 2023, Algorithm 1) as `difflab reflow RUN --pairs N
    --name NAME --runs RUNS --set ...` does it, returning the new run loaded.

    Args:
        run: a flow run (diffusion.prediction=velocity): a `Run`, its directory or its weights
            file (`pretrained:NAME`).
        pairs: (noise, ODE endpoint) pairs to draw with the run's deterministic sampler (or
            `sampler`, `steps`), kept in RUN/reflow/ (a weights file's in RUNS/<name>-pairs/)
            and reused by a second call.
        name, runs: the new run's folder, RUNS/NAME (default: beside RUN, its name + '-reflow';
            runs/ for a weights file).
        chunk: pairs per resumable file. init: start from RUN's weights (False: --no-init).
        finish: draw the new run's figures and report. overrides: `train__steps=2000` for
            --set train.steps=2000, as in `difflab.train`.
    Returns:
        the k+1-rectified flow; its RUN/reflow.json holds both runs' straightness.
    Raises:
        ConfigError: not a flow run, a stochastic sampler, a bad override, an existing run.
    """
    source = run if isinstance(run, Run) else load(run)
    scfg = source.sample_config(source.cfg.sample.n, sampler=sampler, steps=steps)
    out_dir = reflow_dir(source.path, name, runs)
    run_reflow(
        source.loaded,
        scfg,
        out_dir,
        n_pairs=pairs,
        chunk=chunk,
        init=init,
        overrides=[_override(key, value) for key, value in overrides.items()],
        pairs_only=False,
        progress=progress,
        finish=finish,
    )
    return load(out_dir)
