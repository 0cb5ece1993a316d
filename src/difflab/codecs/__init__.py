"""Codecs: how data reach the model. A codec encodes a training batch into the space the model
diffuses in and decodes samples back into data, for sampling, figures and evaluation.

`Identity` is pixel (or point) space. `latent.LatentCodec` is a trained autoencoder's encoder
and decoder (`model.codec=RUN`, latent diffusion); `build_codec` chooses between them.
"""

from __future__ import annotations

from torch import Tensor


class Identity:
    """Data space itself: encode and decode return their input."""

    def draw(self, n: int, generator) -> tuple:
        """The encoder's noise for a global batch of n: none (encoding is deterministic)."""
        return ()

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the model works in for one example of data `shape`."""
        return tuple(shape)

    def training_data(self, data, cfg):
        """The stream training reads: the data stream itself."""
        return data


def build_codec(cfg, kind, device):
    """Identity, or for a latent run (`kind`: model.RunKind) the autoencoder run
    `cfg.model.codec` names (checked against its pin)."""
    if not kind.latent:
        return Identity()
    from difflab.codecs.latent import load_codec

    return load_codec(cfg, kind, device)


def pin_codec(cfg):
    """cfg with model.codec_sha256 set to its codec file's hash when it is still empty (so a
    run records which autoencoder it diffuses through); cfg itself for pixel runs."""
    if not cfg.model.codec or cfg.model.codec_sha256:
        return cfg
    from difflab.codecs.latent import codec_file, pinned

    return pinned(cfg, codec_file(cfg.model.codec))
