"""Reflow's training data: (noise, ODE endpoint) pairs drawn from a trained flow, read back as a
resumable batch stream (Liu et al. 2023, Algorithm 1: the 2-rectified flow is trained on the
coupling (Z_0, Z_1) its predecessor's ODE made).

A pairs folder holds chunk-NNNNN.npz files (noise, x, labels), each written atomically, and
pairs.json (what drew them). The stream draws batches of indices with its own generator and
keeps the noise of the last batch in `paired_noise`, which the reflow coupling hands the loss
(diffusion/couplings.py) in place of fresh noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difflab.errors import ConfigError


def chunk_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("chunk-*.npz"))


def read_pairs(folder: str | Path) -> tuple[Tensor, Tensor, Tensor | None, dict]:
    """(noise (N, ...), endpoints x (N, ...), labels (N,) or None, pairs.json) of a folder."""
    folder = Path(folder)
    meta_path = folder / "pairs.json"
    if not meta_path.is_file():
        raise ConfigError(
            f"{folder} holds no reflow pairs (no pairs.json); draw them with `difflab reflow RUN`"
        )
    meta = json.loads(meta_path.read_text())
    paths = chunk_paths(folder)
    if len(paths) < meta["chunks"]:
        raise ConfigError(
            f"{folder} has {len(paths)} of {meta['chunks']} chunks of pairs: the drawing was "
            "stopped; run the same `difflab reflow` command again to finish it"
        )
    noise, x, labels = [], [], []
    for p in paths[: meta["chunks"]]:
        with np.load(p) as z:
            noise.append(torch.from_numpy(z["noise"]))
            x.append(torch.from_numpy(z["x"]))
            if "labels" in z:
                labels.append(torch.from_numpy(z["labels"]))
    y = torch.cat(labels).long() if labels else None
    return torch.cat(noise), torch.cat(x), y, meta


class PairStream:
    """Batches of stored pairs: next_batch(n) -> (endpoints x (n, ...), labels or None), with
    the batch's noise in `paired_noise`; indices drawn uniformly from a seeded generator (its
    state is the stream's state, so resuming continues exactly)."""

    def __init__(self, folder: str | Path, seed: int):
        self.noise, self.x, self.labels, meta = read_pairs(folder)
        self.shape = tuple(self.x.shape[1:])
        self.num_classes = int(meta.get("num_classes", 0))
        self.class_names = tuple(meta.get("class_names", ()))
        self.generator = torch.Generator().manual_seed(seed)
        self.paired_noise: Tensor | None = None

    def next_batch(self, n: int) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(len(self.x), (n,), generator=self.generator)
        self.paired_noise = self.noise[idx]
        return self.x[idx], (self.labels[idx] if self.labels is not None else None)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
