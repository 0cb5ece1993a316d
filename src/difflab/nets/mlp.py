"""A residual MLP for low-dimensional data: net(x_t (B, D), t (B,), y (B,) | None) -> (B, D)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.nets.layers import FourierFeatures, SecondTime, TimeEmbedding, add_second_time


def _shared(t: Tensor) -> bool:
    """One time for the whole batch (B > 1)."""
    return t.dim() == 1 and t.shape[0] > 1 and bool((t == t[0]).all())


class ResidualMLPBlock(nn.Module):
    """LayerNorm -> scale/shift by the embedding (FiLM) -> Linear -> SiLU -> Linear, plus the input.

    The last linear starts at zero so every block starts as the identity.
    """

    def __init__(self, width: int, emb_dim: int, expansion: int = 2, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.dropout(torch.nn.functional.silu(self.fc1(z))))


class MLP(nn.Module):
    """Residual MLP with time (and optional class) conditioning.

    Args:
        dim: data dimension D.
        width: hidden width.
        depth: number of residual blocks.
        emb_dim: time-embedding width.
        fourier_frequencies: K octaves of input Fourier features (0 = raw coordinates).
        num_classes: > 0 adds a label embedding with one extra "null" label (index num_classes)
            that stands for "no label", so one network also learns the unconditional model.
        expansion: hidden expansion inside each block.
        dropout: dropout inside each block.
        second_time: a second time input t2 beside t (MeanFlow, shortcut models), embedded the
            same way and added to t's embedding; False builds exactly the net of before.
    """

    def __init__(
        self,
        dim: int = 2,
        width: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        fourier_frequencies: int = 0,
        num_classes: int = 0,
        expansion: int = 2,
        dropout: float = 0.0,
        second_time: bool = False,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        self.dim, self.num_classes, self.second_time = dim, num_classes, second_time
        self.features = FourierFeatures(fourier_frequencies) if fourier_frequencies > 0 else None
        in_dim = self.features.out_dim(dim) if self.features is not None else dim
        self.time_emb = TimeEmbedding(emb_dim, scale=time_scale)
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(
            ResidualMLPBlock(width, emb_dim, expansion, dropout) for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        # last: the other weights draw the same numbers as a net without it
        self.time2_emb = SecondTime(emb_dim, scale=time_scale) if second_time else None

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, *, t2: Tensor | None = None
    ) -> Tensor:
        # Samplers call with one t for the whole batch: embed it once and broadcast (the embedding
        # MLP and the FiLM layers are about a third of the work per sample).
        shared_t = _shared(t) and (t2 is None or _shared(t2))
        one = slice(None, 1) if shared_t else slice(None)
        emb = self.time_emb(t[one])  # (B or 1, emb_dim)
        emb = add_second_time(emb, self.time2_emb, t[one], None if t2 is None else t2[one])
        if self.label_emb is not None:
            if y is None:  # unconditional: the null label
                y = torch.full(
                    (x_t.shape[0],), self.num_classes, device=x_t.device, dtype=torch.long
                )
            emb = emb + self.label_emb(y)
        emb = torch.nn.functional.silu(emb)
        h = self.inp(self.features(x_t) if self.features is not None else x_t)  # (B, width)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h)))
