"""Training batches as a resumable stream: `next_batch(n) -> (x0, y)`, with a state to checkpoint."""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.data.toy2d import sample_toy2d


class ToyStream:
    """Fresh 2-D points every batch, from one seeded generator (so resuming continues exactly)."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = (2,)
        self.num_classes = 0

    def next_batch(self, n: int) -> tuple[Tensor, Tensor | None]:
        return sample_toy2d(self.name, n, self.generator), None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
