"""Every notebook in notebooks/ runs top to bottom (nbclient, a Python kernel), at its small
sizes, so a notebook that breaks fails the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# 01 checkerboard, 02 conditional MNIST (pretrained:mnist), 03 samplers, 04 few-step (flow,
# reflow, ECT), 05 editing (pretrained:mnist)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="pip install difflab[dev] runs notebooks")
    nbformat = pytest.importorskip("nbformat", reason="pip install difflab[dev] runs notebooks")
    pytest.importorskip("ipykernel", reason="pip install difflab[dev]: a kernel for notebooks")
    src = str(ROOT / "src")  # this tree's difflab in the kernel
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("DIFFLAB_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "agg")  # the kernel's inline backend still draws
    # one intra-op thread: the notebooks' small MLPs gain nothing from a second, and on a busy
    # 2-core machine two threads made training 5x slower (tests/conftest.py `one_thread`)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError with the cell and its traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figures were shown


def test_the_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    assert NOTEBOOKS and all(f"](notebooks/{path.name})" in readme for path in NOTEBOOKS)
