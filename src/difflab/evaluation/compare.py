"""Quality against model evaluations: `difflab eval RUN --compare` sweeps samplers x NFE budgets x
grids (x guidance) from one noise and measures each configuration (2-D: sliced W2 and
in-square; images: the image metrics), with its sampling speed and peak memory."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from difflab.config import ConfigError
from difflab.evaluation.protocol import HIGHER_IS_BETTER
from difflab.evaluation.sampled import evaluate_images_of, timed_samples
from difflab.evaluation.toy2d import evaluate_toy
from difflab.runs import attach_guide, check_run_dir, is_weights_file, load_run, resolve_source
from difflab.samplers import SAMPLERS, deterministic_samplers, nfe_of, steps_for_nfe


def compare_samplers(
    run_dir: Path,
    *,
    samplers: list[str] | None = None,
    nfes: list[int] = (5, 10, 20, 50),
    grids: list[str] | None = None,
    guidances: list[float] | None = None,
    methods: list[tuple[str, list[float]]] | None = None,
    changes: dict | None = None,
    checkpoint: int | str | None = None,
    device: str = "auto",
    image_eval: dict | None = None,
    progress: bool = True,
) -> dict:
    """Quality against model evaluations for every sampler x NFE budget x grid (x guidance)
    (x guidance method: `methods` = [(method, its scales, or [] for `guidances`)]; a sampler a
    method does not define, CFG++'s stochastic ones, is left out of that method's rows).

    Every configuration starts from the same noise (the run's sample seed, or `changes`). 2-D
    runs are measured by sliced W2 (and in-square); image runs by `image_eval` = {"metrics",
    "reference", "extractors"} (see `evaluation.evaluate_images_of`). Each row also has the
    sampling speed (ms per sample) and peak memory. Returns {"rows": [...], "provenance": ...};
    `report.run.plot_compare` draws plots/compare.png from them. `run_dir` may be a weights
    file (pretrained:NAME, an `export --format ema` file).
    """
    run_dir = resolve_source(run_dir) if is_weights_file(run_dir) else check_run_dir(run_dir)
    changes = dict(changes or {})
    # --raw (changes["use_ema"] = False), else the run's sample.use_ema (config.use_ema_of)
    run = load_run(
        run_dir, checkpoint=checkpoint, use_ema=changes.pop("use_ema", None), device=device
    )
    kind = run.model.kind
    toy = not kind.is_image
    if not toy and image_eval is None:
        raise ConfigError("--compare on an image run needs image metrics (image_eval)")
    base = dataclasses.replace(run.cfg.sample, **changes, use_ema=run.ema)
    # a consistency model's own sampler: 1 and 2 steps suffice; so for a family's own (meanflow,
    # shortcut: registered with their family)
    own = [name for name, info in SAMPLERS.items() if info.family and info.family == kind.family]
    default = ["consistency"] if kind.consistency else own or deterministic_samplers()
    names = list(samplers or default)
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown:
        raise ConfigError(
            f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}"
        )
    auto = [m for m, _ in methods or []] == ["auto"] or base.guidance_method == "auto"
    if (guidances or methods) and not kind.conditional and not auto:
        raise ConfigError(
            "--guidances needs a conditional run (class labels or text), or autoguidance alone"
        )
    if any(m == "auto" for m, _ in methods or []):
        attach_guide(run, dataclasses.replace(base, guidance_method="auto"))
    rows = []
    for scfg in _configurations(run, base, names, nfes, grids, guidances, methods):
        name, grid = scfg.sampler, scfg.spacing
        row = {"sampler": name, "spacing": grid, "steps": scfg.steps}
        row["nfe"] = nfe_of(name, scfg.steps, scfg)
        if kind.conditional or auto:
            row["guidance"] = scfg.guidance
        if methods:
            row["guidance_method"] = scfg.guidance_method
        if toy:
            samples, timing = timed_samples(run, scfg, None)
            row.update(evaluate_toy(samples.numpy(), run.cfg.data.name), **timing)
        else:
            measured = evaluate_images_of(run, scfg, **image_eval)
            row.update({r["metric"]: r["value"] for r in measured})
            row["labels"] = {r["metric"]: r["label"] for r in measured}
            timing = ("ms_per_sample", "net_calls", "peak_memory_mb")
            row.update({k: measured[0][k] for k in timing})
        rows.append(row)
        if progress:
            print(format_compare({"rows": [row]}, header=False))
    provenance = {
        "run": str(run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "ema": run.ema,
        "seed": base.seed,
        "n": base.n,
    }
    return {"provenance": provenance, "rows": rows}


def _configurations(run, base, names, nfes, grids, guidances, methods):
    """Every SampleConfig of the sweep, in order; refused up front where a method refuses all
    its samplers or any other setting."""
    configs = []
    for method, scales in methods or [(base.guidance_method, [])]:
        kept = []
        for name, nfe, grid, guidance in itertools.product(
            names, nfes, grids or [base.spacing], scales or guidances or [base.guidance]
        ):
            steps = steps_for_nfe(name, nfe, base)
            scfg = dataclasses.replace(
                base,
                sampler=name,
                steps=steps,
                spacing=grid,
                guidance=guidance,
                guidance_method=method,
                guide_with=base.guide_with if method == "auto" else "",
            )
            try:
                run.model.check_sample(scfg)
            except ConfigError:
                if method != "cfg++" or name == "ddim":  # only CFG++'s samplers are left out
                    raise
                continue
            kept.append(scfg)
        if not kept:
            raise ConfigError(f"--guidance-methods {method}: no sampler of the sweep takes it")
        configs += kept
    return configs


def quality_keys(rows: list[dict]) -> list[str]:
    """The quality values of compare rows, main one first."""
    if "sliced_w2" in rows[0]:
        return ["sliced_w2"] + (["in_square"] if "in_square" in rows[0] else [])
    return list(rows[0]["labels"])


def format_compare(result: dict, header: bool = True) -> str:
    """One line per configuration, best first within each NFE budget; `calls` is network
    calls per sample, the guidance method's cost included (rows from before: the NFE)."""
    rows = result["rows"]
    keys = quality_keys(rows)
    sign = -1 if keys[0] in HIGHER_IS_BETTER else 1
    names = [rows[0].get("labels", {}).get(k, k) for k in keys]
    lines = []
    if header:
        lines.append(
            f"{'sampler':10s} {'grid':10s} {'NFE':>4s} {'guid':>5s} "
            + " ".join(f"{n:>14s}" for n in names)
            + f" {'calls':>6s} {'ms/sample':>10s} {'peak MB':>8s}"
        )
    for row in sorted(rows, key=lambda r: (r["nfe"], sign * r[keys[0]])):
        guidance = f"{row['guidance']:5.2f}" if "guidance" in row else f"{'-':>5s}"
        lines.append(
            f"{row['sampler']:10s} {row['spacing']:10s} {row['nfe']:4d} {guidance} "
            + " ".join(f"{row[k]:14.4f}" for k in keys)
            + f" {row.get('net_calls', row['nfe']):6.4g}"
            + f" {row['ms_per_sample']:10.2f} {row['peak_memory_mb']:8.0f}"
        )
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
