"""Sampling noise that depends on (seed, sample index, step), never on the batch it is drawn in.

`torch.randn(B, ...)` from one generator hands sample i different numbers when B changes, so a
sample drawn in a batch of 64 would differ from the same sample drawn in a batch of 1000. Here each
normal number is a hash of (seed, global sample index, stream, element index) turned into a
Gaussian by Box-Muller: any chunking, any device, the same numbers. Stream 0 is x_T; sampler step
k draws from stream k + 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """Chris Wellons' "lowbias32" integer hash on int64 tensors holding 32-bit values.

    int64 products wrap modulo 2^64, so their low 32 bits are exact.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


class SampleNoise:
    """Reproducible per-sample Gaussian noise.

    Args:
        seed: any integer.
        start: global index of the first sample in the batches this object will be asked for;
            sampling sample 1000..1999 of a run uses start=1000.
    """

    def __init__(self, seed: int = 0, start: int = 0):
        self.seed = int(seed) & _MASK32
        self.start = int(start)

    def fork(self, k: int) -> SampleNoise:
        """Independent noise for the same samples: the k-th (k >= 1) further pass over a grid
        (RePaint's resampling), its seed a hash of (seed, k)."""
        key = torch.tensor([self.seed ^ (int(k) * 0x9E3779B1 & _MASK32)], dtype=torch.int64)
        return SampleNoise(int(_hash32(_hash32(key) + 0x632BE5AB)), self.start)

    def randn(
        self, shape: tuple[int, ...], stream: int, device=None, dtype=torch.float32
    ) -> Tensor:
        """Standard normal numbers of `shape` (B, ...) for `stream`, sample i of the batch being
        global sample start + i."""
        batch, per_sample = shape[0], math.prod(shape[1:])
        sample = torch.arange(batch, device=device, dtype=torch.int64) + self.start
        elem = torch.arange(per_sample, device=device, dtype=torch.int64)
        key = _hash32(_hash32(sample * 0x9E3779B1 + self.seed) + int(stream) * 0x85EBCA77)
        base = _hash32(key[:, None] ^ (elem[None, :] * 2))
        other = _hash32(base ^ 0x27D4EB2F)
        # 24-bit uniforms in (0, 1]; u1 > 0 keeps the log finite.
        u1 = ((base >> 8) + 1).to(torch.float64) / 2**24
        u2 = (other >> 8).to(torch.float64) / 2**24
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.to(dtype).reshape(shape)


def as_noise(generator: SampleNoise | int | None) -> SampleNoise:
    """Accept a SampleNoise, a seed, or None (seed 0)."""
    if isinstance(generator, SampleNoise):
        return generator
    if generator is None:
        return SampleNoise(0)
    if isinstance(generator, int):
        return SampleNoise(generator)
    raise TypeError(
        f"generator must be a difflab SampleNoise or an int seed, got {type(generator).__name__}; "
        "use difflab.samplers.SampleNoise(seed, start) so samples do not depend on batch size"
    )
