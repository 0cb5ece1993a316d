"""`difflab export --format ema`: a run's EMA weights alone in half precision, in one
safetensors file whose metadata carries the config, data.json and step
(training.checkpoint.WEIGHTS_META), so `difflab sample FILE` and `difflab eval FILE` need nothing
else. Loading runs no code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from difflab.config import ConfigError
from difflab.files import replace_atomically
from difflab.runs import load_run
from difflab.share.folders import check_target
from difflab.training.checkpoint import WEIGHTS_META

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def export_ema(run_dir, out, dtype: str = "fp16", *, force: bool = False, checkpoint=None) -> Path:
    """Write the run's EMA weights as `dtype` (fp16 or bf16) to `out` (.safetensors)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    run = load_run(run_dir, checkpoint=checkpoint, use_ema=True, device="cpu")
    check_target(out, force)
    return write_weights_file(run, out, dtype)


def write_weights_file(run, out: Path, dtype: str = "fp16", cfg=None, extra=None) -> Path:
    """Write a loaded run's weights as `dtype` to `out` atomically, with its config (`cfg`, by
    default the run's), data.json and step in the metadata, plus the `extra` string keys."""
    weights = {}
    for k, v in run.model.net.state_dict().items():
        weights[k] = v.to(DTYPES[dtype]).contiguous() if v.is_floating_point() else v
        finite = torch.isfinite(weights[k]).all() if v.is_floating_point() else True
        if not finite:
            raise ConfigError(f"{k} overflows {dtype} (|w| up to {v.abs().max():.3g}); use bf16")
    config = (cfg or run.cfg).to_dict()
    values = (json.dumps(config), json.dumps(run.model.kind.info()), str(run.step))
    meta = {**dict(zip(WEIGHTS_META, values, strict=True)), "format": "pt", "dtype": dtype}
    meta.update(extra or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, lambda tmp: save_file(weights, tmp, metadata=meta))
    return out
