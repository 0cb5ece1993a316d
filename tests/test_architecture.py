"""The layout and import direction of docs/architecture.md, checked by reading every import.

Every `from difflab.a.b import c` and `from difflab.a import b` names modules; a module's rule
says which it may import. Imports run one way, as docs/architecture.md draws them: config ->
samplers -> model -> build -> training -> runs -> evaluation -> report -> cli.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"

# module or package -> the difflab modules or packages it may import. A rule for "a.b" covers
# a/b.py; a rule for "a" covers everything under a/ (which may import a/ freely). Inside
# diffusion/ each module has its own rule: schedules <- prediction <- objectives <- losses.
ALLOWED = {
    "errors": set(),  # ConfigError, the project's error type: every module may import it
    "files": set(),
    "config": {"files"},
    "conditioners": {"data", "files"},
    "codecs": {"config", "data", "files", "nets"},
    "nets": set(),
    "data": set(),
    "devices": {"config"},
    "diffusion": set(),  # diffusion/__init__.py; every other module of diffusion/ has its own
    "diffusion.schedules_base": set(),
    "diffusion.schedules": {"diffusion.paths", "diffusion.schedules_base"},
    "diffusion.paths": {"diffusion.schedules_base"},
    "diffusion.couplings": set(),
    "diffusion.prediction": {"diffusion.schedules"},
    "diffusion.objectives": {"diffusion.schedules", "diffusion.prediction"},
    "diffusion.loss_base": set(),
    "diffusion.losses": {"diffusion.couplings", "diffusion.loss_base", "diffusion.objectives"},
    "diffusion.autoencoder_loss": {"diffusion.loss_base"},
    "diffusion.few_step_losses": {"diffusion.loss_base"},
    "diffusion.guidance": {"diffusion.guidance_methods", "diffusion.prediction"},
    "diffusion.guidance_methods": {"diffusion.prediction"},
    "diffusion.consistency": {"diffusion.prediction", "diffusion.schedules"},
    "diffusion.curriculum": set(),
    "diffusion.consistency_losses": {
        "diffusion.consistency",
        "diffusion.curriculum",
        "diffusion.loss_base",
    },
    "diffusion.adapters": {"diffusion.prediction", "diffusion.schedules"},
    "samplers": {"diffusion.schedules"},
    "model": {"config", "devices", "diffusion.guidance", "diffusion.prediction", "samplers"},
    "build": {
        "codecs",
        "conditioners",
        "config",
        "data",
        "devices",
        "diffusion",
        "model",
        "nets",
        "samplers",
    },
    "training": {
        "build",
        "config",
        "devices",
        "diffusion.guidance",
        "files",
        "model",
        "pretrained",  # checkpoint.py reads weights files, a pretrained:NAME among them
        "samplers",
    },
    "runs": {
        "build",
        "config",
        "devices",
        "diffusion.prediction",
        "files",
        "model",
        "samplers",
        "training.checkpoint",
    },
    "evaluation": {
        "config",
        "data",
        "devices",
        "files",
        "model",
        "runs",
        "samplers",
        "training.distributed",
    },
    "report": {
        "build",
        "codecs",
        "config",
        "data",
        "evaluation",
        "files",
        "model",
        "runs",
        "samplers",
        "training.hooks",
        "training.logging",
    },
    "benchmark": {
        "build",
        "config",
        "devices",
        "files",
        "model",
        "samplers",
        "share.dit_keys",
        "share.mapping",
    },
    "share": {
        "build",
        "config",
        "devices",
        "diffusion.adapters",
        "evaluation.history",
        "files",
        "model",
        "runs",
        "training.checkpoint",
    },
    "cli": {
        "benchmark",
        "build",
        "config",
        "devices",
        "evaluation",
        "files",
        "flow",
        "pretrained",
        "report",
        "runs",
        "samplers",
        "share",
        "training",
    },
    "flow": {"config", "data.pairs", "files", "samplers"},
    "pretrained": set(),  # the shipped files and their names; runs resolves pretrained:NAME
    "api": {
        "cli",
        "config",
        "files",
        "model",
        "report",
        "runs",
        "samplers",
        "training.distributed",
    },
    "__init__": {
        "api",
        "diffusion.objectives",
        "diffusion.prediction",
        "diffusion.schedules",
        "training.ema",
    },
    "__main__": {"cli"},
}
TOP_LEVEL_LIMIT = 8  # .py files directly under src/difflab besides __init__ and __main__


EXACT = {"diffusion"}  # packages whose every module needs a rule of its own


def _rule(module: str) -> str:
    parts = module.split(".")
    if parts[0] in EXACT and module not in ALLOWED:
        raise AssertionError(f"{module} is new: add it to docs/architecture.md and this table")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in ALLOWED:
            return ".".join(parts[:k])
    raise AssertionError(f"{module} is new: add it to docs/architecture.md and this table")


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def _known(dotted: str) -> str | None:
    """The module or package `dotted` (under difflab) names, as far as a rule knows it."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if (SRC.joinpath(*parts[:k]).with_suffix(".py")).exists() or SRC.joinpath(
            *parts[:k]
        ).is_dir():
            return head
    return None


def _imports(path: Path) -> set[str]:
    """Every difflab module a file imports, by each imported name (not just the first)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difflab"):
            base = node.module[len("difflab") :].lstrip(".")
            for alias in node.names:
                target = f"{base}.{alias.name}" if base else alias.name
                known = _known(target) or _known(base)
                if known:
                    found.add(known)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("difflab."):
                    found.add(_known(alias.name[len("difflab.") :]))
    return found


EVERYWHERE = {"errors"}  # leaves every module may import


def _allowed(importer: str, imported: str) -> bool:
    rule = ALLOWED[_rule(importer)]
    if imported in EVERYWHERE:
        return True
    return any(imported == a or imported.startswith(a + ".") for a in rule) or (
        imported.split(".")[0] == importer.split(".")[0]
        and _rule(importer) == importer.split(".")[0]
    )


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    module = _module_of(path)
    _rule(module)
    extra = {m for m in _imports(path) if m != module and not _allowed(module, m)}
    assert not extra, f"{module} imports {sorted(extra)}, against the layering"
    if module.startswith("samplers"):
        assert "torch.nn" not in path.read_text(), "samplers never import networks"


def test_every_allowance_is_used():
    used = {rule: set() for rule in ALLOWED}
    for path in FILES:
        module = _module_of(path)
        rule = _rule(module)
        for m in _imports(path):
            for a in ALLOWED[rule]:
                if m == a or m.startswith(a + "."):
                    used[rule].add(a)
    stale = {rule: sorted(ALLOWED[rule] - used[rule]) for rule in ALLOWED}
    stale = {k: v for k, v in stale.items() if v}
    assert not stale, f"allowances no code uses: {stale}"


def test_the_top_level_stays_small():
    """Few modules stand directly in src/difflab; everything else lives in a package named
    for its concept. Module length is a guideline (docs/architecture.md), never a test: a
    line count must not make code denser."""
    top = [p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= TOP_LEVEL_LIMIT, f"{len(top)} top-level modules: {sorted(top)}"


def test_every_imported_name_counts(tmp_path):
    code = tmp_path / "m.py"
    code.write_text(
        "from difflab import build, report\n"
        "from difflab.training import distributed, loop\n"
        "from difflab.evaluation.protocol import METRICS\n"
        "import difflab.runs\n"
        "def f():\n    from difflab.cli import main\n"
    )
    assert _imports(code) == {
        "build",
        "report",
        "training.distributed",
        "training.loop",
        "evaluation.protocol",
        "runs",
        "cli",
    }
    assert not _allowed("training.loop", "report.run") and _allowed("report.run", "report.grids")
    assert _allowed("diffusion.losses", "diffusion.objectives")
    assert not _allowed("diffusion.prediction", "diffusion.losses")  # schedules <- ... <- losses


IMPORT_ALL = """
import importlib, pkgutil, sys, tempfile
from pathlib import Path
import matplotlib, numpy as np, torch
torch.set_num_threads(1)
import difflab
from difflab import devices
for module in pkgutil.walk_packages(difflab.__path__, "difflab."):
    if module.name != "difflab.__main__":
        importlib.import_module(module.name)
from difflab import build
from difflab.config import preset
from difflab.model import DataKind
from difflab.report import charts
build.build_model(preset("toy2d"), DataKind((2,)))  # the Python API's first steps
points = np.random.default_rng(0).normal(size=(100, 2))
charts.real_vs_generated(points, points, Path(tempfile.mkdtemp()) / "a.png", ("a", "b"))
print(matplotlib.get_backend(), torch.get_num_threads(), devices._KEPT)
"""


def test_importing_difflab_changes_no_process_wide_state():
    """Importing every module, building a model and drawing a figure leave matplotlib's
    backend, torch's thread count and glibc's malloc settings as the user had them: those
    belong to the CLI and the trainer, not to a library a notebook imports."""
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["svg", "1", "None"]


def test_the_documented_import_chain_is_these_rules():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    chain = doc.split("Imports run one way:\n```\n")[1].split("\n")[0].split(" -> ")
    assert set(chain) <= {key.split(".")[0] for key in ALLOWED}, chain
    assembled = {"files", "data", "nets", "diffusion", "conditioners", "codecs", "devices"}
    for key, allowed in ALLOWED.items():
        top = key.split(".")[0]
        # a package of the chain imports only what stands left of it; what build assembles
        # imports nothing from build onwards; the rest (flow, share, ...) stands beside it
        if top in chain:
            right = set(chain[chain.index(top) + 1 :])
        else:
            right = set(chain[chain.index("build") :]) if top in assembled else set()
        assert not {a.split(".")[0] for a in allowed} & right, (key, allowed)
