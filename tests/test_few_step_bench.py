"""bench/few_step.py's bookkeeping: training minutes from a run's metrics.jsonl (a resumed run
counts its repeated interval once more, because that time was spent), a shipped run's from
its record, and the table's cells."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def few_step():
    path = Path(__file__).resolve().parents[1] / "bench" / "few_step.py"
    spec = importlib.util.spec_from_file_location("bench_few_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _metrics(run: Path, records: list[dict]) -> None:
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_minutes_are_the_sum_of_logged_intervals(few_step, tmp_path):
    records = [{"step": s, "s_per_step": 0.5} for s in (100, 200, 300)]
    records.insert(1, {"step": 150, "eval": 1.0})  # no s_per_step: not a training interval
    _metrics(tmp_path / "a", records)
    assert few_step.logged_minutes(tmp_path / "a") == (300 * 0.5 / 60, 300)
    # killed after step 300, resumed from the checkpoint at 200: 200 -> 300 ran twice
    resumed = [*records, {"step": 300, "s_per_step": 1.0}, {"step": 400, "s_per_step": 1.0}]
    _metrics(tmp_path / "b", resumed)
    assert few_step.logged_minutes(tmp_path / "b") == ((150 + 100 + 100) / 60, 400)


def test_the_table_has_a_line_per_row_with_its_figures(few_step):
    measured = [
        {"nfe": n, "in_square": q, "sliced_w2": w, "ms_per_sample": m}
        for n, q, w, m in ((1, 0.9, 0.05, 0.01), (2, 0.95, 0.03, 0.02), (4, 0.97, 0.02, 0.04))
    ]
    rows = [
        {"name": "MeanFlow", "teacher": "", "teacher_min": 0.0, "train_min": 4.5, "own_nfe": 0},
        {"name": "ECT", "teacher": "toy2d", "teacher_min": 4.0, "train_min": 2.96, "own_nfe": 50},
    ]
    for row in rows:
        row["measured"] = measured
    rows[1]["measured"] = [*measured, {**measured[2], "nfe": 50, "in_square": 0.976}]
    lines = few_step.table({"data": "checkerboard", "rows": rows}).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| method | teacher (min) | train min")
    assert "| MeanFlow | none | 4.5 | 0.9 / 0.05 | 0.95 / 0.03 | 0.97 / 0.02 | - |" in lines[2]
    assert "| ECT | toy2d (4.0) | 3.0 |" in lines[3] and "| 50: 0.976 / 0.02 |" in lines[3]
    assert lines[3].endswith("| 0.01, 0.02, 0.04 |")


def test_a_shipped_run_is_reused_with_its_records_minutes(few_step, tmp_path):
    from difflab import pretrained

    runs: dict[str, Path] = {}
    info = few_step.reused_row("mnist-flow", "pretrained:mnist-flow", runs)
    record = pretrained.record(pretrained.resolve("pretrained:mnist-flow"))
    assert runs["mnist-flow"] == pretrained.resolve("pretrained:mnist-flow")
    assert info["train_min"] == record["train_minutes"] > 0
    assert info["steps"] == record["train_steps"] > 0 and info["reused"]
    _metrics(tmp_path / "run", [{"step": 100, "s_per_step": 0.6}])  # a run folder: its log
    info = few_step.reused_row("mnist", str(tmp_path / "run"), runs)
    assert (info["train_min"], info["steps"]) == (1.0, 100)
    with pytest.raises(SystemExit, match="unknown pretrained run"):
        few_step.reused_row("x", "pretrained:nope", runs)
