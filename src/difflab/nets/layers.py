"""Building blocks shared by the networks: sinusoidal embeddings of time and of coordinates."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0
) -> Tensor:
    """Transformer-style embedding of t (B,) in [0, 1] -> (B, dim) (Vaswani et al. 2017, Sec. 3.5).

    t is multiplied by `scale` first so that t in [0, 1] spans the range DDPM's integer steps did.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (t.float() * scale)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a 2-layer MLP (DDPM's time embedding): (B,) -> (B, dim)."""

    def __init__(self, dim: int, sinusoid_dim: int | None = None):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim or dim
        self.mlp = nn.Sequential(nn.Linear(self.sinusoid_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.sinusoid_dim))


class FourierFeatures(nn.Module):
    """Coordinates x (B, D) -> [x, sin(2^k pi x), cos(2^k pi x)] for k = 0..K-1 (B, D (1 + 2K)).

    Plain MLPs are biased towards smooth functions (spectral bias); these features let them draw
    sharp edges such as a checkerboard's (Tancik et al. 2020, "Fourier features let networks learn
    high frequency functions").
    """

    def __init__(self, num_frequencies: int):
        super().__init__()
        self.register_buffer(
            "freqs", math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
        )

    def out_dim(self, in_dim: int) -> int:
        return in_dim * (1 + 2 * len(self.freqs))

    def forward(self, x: Tensor) -> Tensor:
        args = (x[..., None] * self.freqs).flatten(1)  # (B, D K)
        return torch.cat([x, torch.sin(args), torch.cos(args)], dim=1)
