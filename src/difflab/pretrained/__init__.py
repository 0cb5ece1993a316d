"""Pretrained runs shipped inside the package: `pretrained:NAME` wherever a run is read.

    difflab sample pretrained:mnist --per-class --n 100 --out d.npz
    run = difflab.load("pretrained:toy2d")

Each is an fp16 EMA weights file, `NAME.safetensors` in this folder, as `difflab export --format
ema` writes one (`training.checkpoint.WEIGHTS_META`: the run's config, data.json and step),
whose config's `sample` section holds fast sampling defaults, and whose `difflab_pretrained`
metadata key says how it was made and judged (`record`). `difflab pretrained build NAME` makes
them from the presets (cli/pretrained.py); `runs` resolves the names here, so every command and
the Python API read them as they read any weights file.
"""

from __future__ import annotations

import json
from pathlib import Path

from difflab.errors import ConfigError

PREFIX = "pretrained:"
FOLDER = Path(__file__).resolve().parent
META_KEY = "difflab_pretrained"  # JSON: preset, training, sampling defaults, judged metrics

# name -> the preset it is trained from
PRESETS = {"toy2d": "toy2d", "mnist": "mnist", "mnist-flow": "mnist-flow", "mnist-ect": "mnist-ect"}

# name -> the sample.* fields its file samples with by default, over its preset's own; chosen
# for a fast first command (cli/pretrained.py measures the metrics at exactly these). mnist:
# the preset's ancestral DDPM and guidance at 20 steps instead of 50. On that model ancestral
# sampling halves deterministic DDIM's FD at 50 steps, and at 10 steps it judged 0.992 / FD 11.4
# against 0.986 / 6.8 at 50 (bench/RESULTS.md); 20 steps of 100 guided digits are 4,000 network
# rows at 3.6 ms each on 2 cores (RESULTS.md, sampler overhead): about 15 s. mnist-flow keeps its
# preset's dpmpp_2m-10 (0.983 / FD 5.8 as shipped) and mnist-ect its two consistency steps.
SAMPLING = {
    "toy2d": dict(sampler="dpmpp_2m", steps=20, spacing="quadratic", n=2000, batch_size=2000),
    "mnist": dict(sampler="ddpm", steps=20, spacing="quadratic", guidance=1.25),
    "mnist-flow": {},
    "mnist-ect": {},
}


def is_pretrained(source) -> bool:
    """Whether `source` (a path or a string) names a shipped run: pretrained:NAME."""
    return isinstance(source, str | Path) and str(source).startswith(PREFIX)


def file_of(name: str) -> Path:
    """Where the file of `name` lives (it may not be shipped)."""
    return FOLDER / f"{name}.safetensors"


def available() -> list[str]:
    """The names whose files this install ships."""
    return [name for name in PRESETS if file_of(name).is_file()]


def resolve(source) -> Path:
    """The shipped file `pretrained:NAME` names; one line listing those shipped otherwise."""
    name = str(source)[len(PREFIX) :]
    if name in PRESETS and file_of(name).is_file():
        return file_of(name)
    shipped = ", ".join(PREFIX + n for n in available()) or "none"
    problem = (
        f"{source} is not shipped in this install"
        if name in PRESETS
        else f"unknown pretrained run {str(source)!r}"
    )
    raise ConfigError(
        f"{problem}; available: {shipped} (`difflab pretrained list`; "
        "`difflab pretrained build NAME` makes one)"
    )


def record(path: str | Path) -> dict:
    """The `difflab_pretrained` record of a weights file ({} for a plain export)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}
