"""Every notebook in notebooks/ runs top to bottom (nbclient, a Python kernel), at its small
sizes, so a notebook that breaks fails the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="pip install difflab[dev] runs notebooks")
    nbformat = pytest.importorskip("nbformat", reason="pip install difflab[dev] runs notebooks")
    pytest.importorskip("ipykernel", reason="pip install difflab[dev]: a kernel for notebooks")
    src = str(Path(__file__).resolve().parents[1] / "src")  # this tree's difflab in the kernel
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("DIFFLAB_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "agg")  # the kernel's inline backend still draws
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError with the cell and its traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figures were shown
