"""Metrics as JSON lines: one object per logged step, read back by the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends rows to `metrics.jsonl`; non-finite floats are written as null (valid JSON).

    Args:
        path: the metrics file.
        resume_step: when resuming, rows logged after this step (by a run that crashed later
            than its last checkpoint) are dropped so the log matches the resumed weights.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            _rewrite(self.path, kept)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_clean(row)) + "\n")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics file; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
