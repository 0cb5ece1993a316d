"""A run's recorded evaluation results as rows with provenance: `difflab eval RUN` files
(evals/*.json), the final evaluation (eval.json) and training-time rows (metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

# what a 2-D run's eval.json says about how its samples were drawn (not metric values)
PROVENANCE = ("source", "checkpoint", "step", "sampler", "steps", "nfe", "spacing", "guidance")
PROVENANCE += ("ema", "seed", "ms_per_sample", "peak_memory_mb", "processes")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metric_rows(run_dir: str | Path) -> list[dict]:
    """Every metric row a run holds, oldest file first, each with "file": where it is recorded.

    Image evaluations are lists of rows ({"metric", "label", "value", "n_generated",
    "reference", "sampler", "nfe", ...}); a 2-D run's eval.json is one dict of values, given as
    one row per value.
    """
    run_dir = Path(run_dir)
    rows = []
    for path in sorted((run_dir / "evals").glob("*.json")):
        data = _load(path)
        for row in (data or {}).get("rows", []) if isinstance(data, dict) else []:
            rows.append({**row, "file": f"evals/{path.name}"})
    final = _load(run_dir / "eval.json")
    if isinstance(final, dict):
        if isinstance(final.get("rows"), list):
            rows += [{**r, "file": "eval.json"} for r in final["rows"]]
        else:
            drawn = {k: final.get(k) for k in PROVENANCE if k in final}
            for k, v in final.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in drawn:
                    rows.append({"metric": k, "label": k, "value": v, **drawn, "file": "eval.json"})
    return rows


def training_eval_rows(run_dir: str | Path) -> list[dict]:
    """The {"step", "eval": {...}} rows training logged in metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row.get("eval"), dict):
                rows.append(row)
    return rows
