"""RUN/report.html: one self-contained page of a run, readable on a phone as on a desktop.

Everything is inlined: figures and GIFs as base64 data URIs, the metric curves (lr, gradient
and parameter norms, throughput, memory) as SVG drawn here from metrics.jsonl, so the page needs
no network and no files beside it. A small script marks the page once every image has decoded
(`data-images-ok`), which is how the headless-browser test knows nothing is missing.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from difflab.evaluation.history import metric_rows, training_eval_rows
from difflab.files import write_text_atomically
from difflab.training.logging import read_metrics

MIME = {".png": "image/png", ".gif": "image/gif"}
CURVES = (
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("param_norm", "parameter norm"),
    ("examples_per_s", "throughput (examples/s)"),
    ("peak_memory_mb", "peak memory (MB)"),
)
COLUMNS = (
    "label",
    "value",
    "n_generated",
    "reference",
    "extractor",
    "sampler",
    "steps",
    "nfe",
    "guidance",
    "ema",
    "step",
    "file",
)
STYLE = """body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:12px;
color:#222}h1{font-size:1.4em;word-break:break-all}h2{font-size:1.15em;margin-top:1.6em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:12px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
figure img,figure svg{width:100%;height:auto;image-rendering:pixelated}
figcaption{font-size:.85em;color:#555;word-break:break-all}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 6px;
text-align:left;white-space:nowrap}pre{font-size:.8em;overflow-x:auto;background:#f4f4f4;
padding:8px}"""
SCRIPT = """<script>
window.onerror=function(){document.body.setAttribute('data-script-error','1')};
window.addEventListener('load',function(){var bad=[].filter.call(document.images,
function(i){return !(i.complete&&i.naturalWidth>0)});
document.body.setAttribute('data-images-ok',bad.length?'0':'1');});
</script>"""


def _data_uri(path: Path) -> str:
    return f"data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _figure(path: Path, run_dir: Path) -> str:
    rel = html.escape(str(path.relative_to(run_dir)))
    return (
        f'<figure><img src="{_data_uri(path)}" alt="{rel}" data-file="{rel}">'
        f"<figcaption>{rel}</figcaption></figure>"
    )


def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else -1


def figures(run_dir: Path) -> dict[str, list[Path]]:
    """The run's images by section: plots, the latest sample grid, the grid history, GIFs."""
    plots = sorted(p for p in (run_dir / "plots").glob("*") if p.suffix in MIME)
    grids = sorted((run_dir / "samples").glob("grid-step-*.png"), key=_step_of)
    others = sorted(p for p in (run_dir / "samples").glob("*.png") if p not in grids)
    return {
        "figures": [p for p in plots if p.suffix == ".png"] + others,
        "latest sample grid": grids[-1:],
        "grid history": grids[:-1],
        "animations": [p for p in plots if p.suffix == ".gif"],
    }


def svg_curve(steps: list[float], values: list[float], title: str) -> str:
    """A small line chart (SVG) of values against steps, with its range written on it."""
    w, h, pad = 320, 160, 28
    lo, hi = min(values), max(values)
    s0, s1 = min(steps), max(steps)
    span, sspan = (hi - lo) or 1.0, (s1 - s0) or 1.0
    xs = [pad + (s - s0) / sspan * (w - 2 * pad) for s in steps]
    ys = [h - pad - (v - lo) / span * (h - 2 * pad) for v in values]
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    t = html.escape(title)
    return (
        f'<figure><svg viewBox="0 0 {w} {h}" role="img" aria-label="{t}">'
        f'<rect width="{w}" height="{h}" fill="white"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>'
        f'<text x="{pad}" y="14" font-size="11">{t}: {values[-1]:.4g} at step {steps[-1]:g}'
        f'</text><text x="{pad}" y="{h - 8}" font-size="9">step {s0:g}..{s1:g}; range '
        f"{lo:.3g}..{hi:.3g}</text></svg><figcaption>{t}</figcaption></figure>"
    )


def _table(rows: list[dict], columns) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(v) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _curves(logged: list[dict]) -> list[str]:
    out = []
    for key, title in CURVES:
        pairs = [(r["step"], r[key]) for r in logged if isinstance(r.get(key), int | float)]
        if len(pairs) >= 1:
            out.append(svg_curve([p[0] for p in pairs], [float(p[1]) for p in pairs], title))
    return out


def report_html(run_dir: Path) -> str:
    """The page's HTML for the run in `run_dir`."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    logged = [r for r in read_metrics(metrics) if "loss" in r] if metrics.is_file() else []
    config = (run_dir / "config.json").read_text() if (run_dir / "config.json").exists() else ""
    sections = [
        f"<h1>{html.escape(run_dir.name)}</h1>",
        f"<p>{len(logged)} logged training rows; last step "
        f"{logged[-1]['step'] if logged else '-'}.</p>",
    ]
    for title, paths in figures(run_dir).items():
        if paths:
            body = "".join(_figure(p, run_dir) for p in paths)
            sections.append(f'<h2>{title}</h2><div class="grid">{body}</div>')
    curves = _curves(logged)
    if curves:
        sections.append(f'<h2>training curves</h2><div class="grid">{"".join(curves)}</div>')
    if logged:
        keys = ("step", "examples_per_s", "s_per_step", "peak_memory_mb")
        sections.append("<h2>throughput and memory</h2>" + _table(logged[-1:], keys))
    history = [{"step": r.get("step"), **r["eval"]} for r in training_eval_rows(run_dir)]
    if history:
        keys = list(dict.fromkeys(k for r in history for k in r))
        sections.append("<h2>evaluation history</h2>" + _table(history, keys))
    rows = metric_rows(run_dir)
    if rows:
        sections.append("<h2>evaluations (with provenance)</h2>" + _table(rows, COLUMNS))
    sections.append(f"<h2>config</h2><pre>{html.escape(config)}</pre>")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width,initial-scale=1"><title>{html.escape(run_dir.name)}'
        f"</title><style>{STYLE}</style></head><body>{''.join(sections)}{SCRIPT}"
        "</body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write RUN/report.html atomically; returns its path."""
    path = Path(run_dir) / "report.html"
    write_text_atomically(path, report_html(Path(run_dir)))
    return path


def referenced_files(page: str) -> list[str]:
    """The run files a page's images came from (their data-file attributes)."""
    return [html.unescape(m) for m in re.findall(r'data-file="([^"]+)"', page)]
