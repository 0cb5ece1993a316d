"""Metrics as JSON lines: one object per logged step, read back by the plots; optionally mirrored
to TensorBoard (`train.tensorboard=true`, needs `pip install tensorboard`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from difflab.files import write_text_atomically
from difflab.training.faults import write_failure


class MetricsLog:
    """Appends rows to `metrics.jsonl`; non-finite floats are written as null (valid JSON).

    Args:
        path: the metrics file.
        resume_step: when resuming, rows logged after this step (by a run that crashed later
            than its last checkpoint) are dropped so the log matches the resumed weights.
        tensorboard: also write every numeric value (lists as name/0, name/1, ...) as a
            TensorBoard scalar under `path`'s folder / tensorboard.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            _rewrite(self.path, kept)
        self.board = _tensorboard_writer(self.path.parent / "tensorboard") if tensorboard else None

    def write(self, row: dict) -> None:
        line = json.dumps(_clean(row)) + "\n"
        try:
            with self.path.open("a") as f:
                f.write(line)
        except OSError as e:  # a torn last line is skipped when read back
            raise write_failure(self.path, e, len(line.encode())) from None
        if self.board is not None and "step" in row:
            for name, value in _scalars(row):
                self.board.add_scalar(name, value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard "
            "(or set train.tensorboard=false; metrics.jsonl is written either way)"
        ) from None
    return SummaryWriter(str(folder))


def _scalars(row: dict, prefix: str = ""):
    """(name, value) for every finite number in a row, nested dicts and lists flattened."""
    for key, value in row.items():
        name = f"{prefix}{key}"
        if key == "step" and not prefix:
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            yield name, float(value)
        elif isinstance(value, dict):
            yield from _scalars(value, f"{name}/")
        elif isinstance(value, list | tuple):
            yield from _scalars({str(i): v for i, v in enumerate(value)}, f"{name}/")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _rewrite(path: Path, rows: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics file; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class SilentLog:
    """The metrics log of ranks other than 0: rows are computed everywhere, written once."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
