"""Codecs: how data reach the model. A codec encodes a training batch into the space the model
diffuses in and decodes samples back into data, for sampling, figures and evaluation.

`Identity` is pixel (or point) space. A latent codec (an autoencoder's encoder and decoder)
keeps the same three methods; register it in `build.CODECS`.
"""

from __future__ import annotations

from torch import Tensor


class Identity:
    """Data space itself: encode and decode return their input."""

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the model works in for one example of data `shape`."""
        return tuple(shape)
