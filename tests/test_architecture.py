"""The import direction of docs/architecture.md, checked by reading every module's imports."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"

# module (or package) -> the difflab modules it may import
ALLOWED = {
    "schedules": set(),
    "prediction": {"schedules"},
    "objectives": {"schedules", "prediction"},
    "guidance": {"prediction"},
    "adapters": {"prediction", "schedules"},
    "samplers": {"schedules", "prediction", "samplers"},
    "nets": {"nets"},
    "data": {"data"},
    "ema": set(),
    "metrics": {"metrics", "data", "files"},
    "files": set(),
    "logging": {"faults"},
    "config": set(),
    "faults": {"config"},
    "checkpoint": {"config", "faults", "files"},
    "nonfinite": {"checkpoint", "faults"},
    "distributed": {"checkpoint", "config"},
    "build": {"schedules", "prediction", "objectives", "samplers", "nets", "data", "config"},
    "evaluation": {"build", "config", "data", "guidance", "metrics", "runs", "samplers"},
    "train": {
        "distributed",
        "faults",
        "nonfinite",
        "evaluation",
        "metrics",
        "build",
        "checkpoint",
        "config",
        "ema",
        "logging",
        "objectives",
        "guidance",
        "prediction",
        "samplers",
        "viz",
        "viz_images",
    },
    "runs": {"build", "checkpoint", "config", "files", "guidance", "prediction", "samplers"},
    "viz": {"logging", "metrics"},
    "viz_images": {"viz"},
    "viz_gifs": {"viz", "viz_images"},
    "report_images": {"build", "config", "runs", "samplers", "viz_gifs", "viz_images"},
    "report_toy": {
        "build",
        "config",
        "data",
        "metrics",
        "report_images",
        "runs",
        "samplers",
        "viz",
        "viz_gifs",
    },
    "report": {
        "evaluation",
        "report_images",
        "report_toy",
        "build",
        "viz",
        "viz_images",
        "viz_gifs",
        "config",
        "data",
        "files",
        "logging",
        "metrics",
        "runs",
        "samplers",
    },
    "benchmark": {"build", "config", "objectives", "samplers"},
    "cli": {
        "benchmark",
        "build",
        "config",
        "data",
        "distributed",
        "evaluation",
        "faults",
        "files",
        "metrics",
        "samplers",
        "train",
        "report",
        "runs",
        "viz_images",
    },
    "__init__": {"ema", "objectives", "prediction"},
    "__main__": {"cli"},
}


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difflab"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("difflab.")}
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    module = _module_of(path)
    assert module in ALLOWED, f"{module} is new: add it to docs/architecture.md and this table"
    extra = _imports(path) - ALLOWED[module] - {module}
    assert not extra, f"{path.name} imports {extra}, against the layering"
    assert "torch.nn" not in path.read_text() or module not in {"samplers"}, (
        "samplers never import networks"
    )
