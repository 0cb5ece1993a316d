"""`difflab bench --precision fp32,bf16` (the default where the device has bf16 units): one
benchmark per precision in one run, and the comparison across them (issue 18).

Each precision is a complete `run_benchmark` (its own matmul peak in its own dtype, both
libraries alternating step by step), measured one after the other in the same process. The
comparison puts every library and precision side by side: training images/s with the ratios
that matter (difflab bf16 against difflab fp32 and against diffusers fp32), the measured peak of
each precision, and sampling ms per image.
"""

from __future__ import annotations

import dataclasses
import datetime

from difflab.benchmark.options import BenchOptions
from difflab.benchmark.run import run_benchmark


def run_precisions(opts: BenchOptions, precisions: tuple[str, ...]) -> dict:
    """One `run_benchmark` per precision (in the order given), and their comparison."""
    runs = {p: run_benchmark(dataclasses.replace(opts, precision=p)) for p in precisions}
    first = runs[precisions[0]]
    return {
        "benchmark": "difflab bench",
        "config": opts.name,
        "preset": first["preset"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": first["environment"],
        "precisions": list(precisions),
        "runs": runs,
        "comparison": compare(runs),
    }


def _speed(run: dict, library: str) -> float | None:
    row = run["training"].get(library, {})
    return row.get("images_per_s") if row.get("available", True) else None


def compare(runs: dict[str, dict]) -> dict:
    """Training images/s per (library, precision actually used), the measured peak per
    precision, and the ratios of every precision against fp32 for each library and against
    diffusers' fp32 for difflab."""
    training, peaks = {}, {}
    for asked, run in runs.items():
        used = run["settings"]["precision"]["used"]
        label = used if used == asked else f"{used} (asked {asked})"
        peaks[label] = run["peak"]["measured"]["flop_per_s"]
        for library in ("difflab", "diffusers"):
            training[f"{library} {label}"] = _speed(run, library)
    ratios = {}
    base = runs.get("fp32")
    for asked, run in runs.items():
        if base is None or asked == "fp32":
            continue
        for library in ("difflab", "diffusers"):
            ours, ref = _speed(run, library), _speed(base, library)
            if ours and ref:
                ratios[f"{library} {asked} / {library} fp32"] = ours / ref
        ours, theirs = _speed(run, "difflab"), _speed(base, "diffusers")
        if ours and theirs:
            ratios[f"difflab {asked} / diffusers fp32"] = ours / theirs
    sampling = []
    for i, row in enumerate(next(iter(runs.values()))["sampling"]):
        entry = {"sampler": row["sampler"], "nfe_budget": row["nfe_budget"]}
        for asked, run in runs.items():
            other = run["sampling"][i]
            for library in ("difflab", "diffusers"):
                cell = other.get(library)
                entry[f"{library} {asked}"] = cell["ms_per_image"] if cell else None
        sampling.append(entry)
    return {
        "images_per_s": training,
        "peak_flop_per_s": peaks,
        "ratios": ratios,
        "sampling_ms_per_image": sampling,
    }


def comparison_markdown(result: dict) -> list[str]:
    """The side-by-side tables for a several-precision result."""
    c = result["comparison"]
    lines = [
        f"## difflab bench {result['config']} — {result['environment']['device']}, "
        f"{' and '.join(result['precisions'])} side by side",
        "",
        "Each precision measured in full (its own matmul peak, both libraries alternating), "
        "one after the other in one run; the sections below give every figure.",
        "",
        "| training | images/s |",
        "|---|---|",
    ]
    speeds = c["images_per_s"].items()
    lines += [f"| {k} | {'n/a' if v is None else f'{v:.2f}'} |" for k, v in speeds]
    lines += ["", "| ratio | |", "|---|---|"]
    lines += [f"| {k} | **{v:.2f}** |" for k, v in c["ratios"].items()]
    lines += ["", "| precision | measured matmul peak GFLOP/s |", "|---|---|"]
    lines += [f"| {k} | {v / 1e9:,.1f} |" for k, v in c["peak_flop_per_s"].items()]
    if c["sampling_ms_per_image"]:
        keys = [k for k in c["sampling_ms_per_image"][0] if k not in ("sampler", "nfe_budget")]
        lines += [
            "",
            "| sampler | NFE | " + " | ".join(f"{k} ms/image" for k in keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for row in c["sampling_ms_per_image"]:
            cells = ["n/a" if row[k] is None else f"{row[k]:.3g}" for k in keys]
            lines.append(f"| {row['sampler']} | {row['nfe_budget']} | " + " | ".join(cells) + " |")
    return lines
