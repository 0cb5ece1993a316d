"""The latent codec of latent diffusion (Rombach et al. 2022, Sec. 3): a trained autoencoder
run's encoder and decoder, with the latent scale measured after its training.

    encode: x (B, C, H, W) -> z = (mean [+ exp(logvar / 2) eps] - shift) * scale (B, c, h, w)
    decode: z -> D(z / scale + shift), clamped to [-1, 1]

An autoencoder run keeps its codec in RUN/codec.safetensors: the EMA weights and, in its
metadata, the network's config, the image shape it was trained on and the latent shift and
scale (as Stable Diffusion's 0.18215), measured on the training set so that latents reach the
diffusion model with zero mean and unit variance. A diffusion run names the run directory
(`model.codec=runs/mnist-ae`) and pins the file's SHA-256 (`model.codec_sha256`) when it
starts training; every later load checks it, so a changed autoencoder is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from difflab.config import AutoencoderConfig, ConfigError
from difflab.files import replace_atomically, sha256_file
from difflab.nets.autoencoder import AutoencoderKL

CODEC_FILE = "codec.safetensors"
META_KEY = "difflab_codec"
ENCODE_MODES = ("mean", "sample")


class CodecError(ConfigError):
    """A codec path, file or pin that cannot be used; the message says the fix."""


def codec_file(source: str | Path) -> Path:
    """The codec file of an autoencoder run directory (or the file itself)."""
    path = Path(source)
    if path.is_dir():
        if not (path / CODEC_FILE).is_file():
            if (path / "config.json").is_file():
                name = json.loads((path / "config.json").read_text())["model"]["name"]
                if name != "autoencoder":
                    raise CodecError(
                        f"model.codec={source} is a {name} run, not an autoencoder run; train "
                        "one with `difflab train --preset mnist-ae` and name that"
                    ) from None
            raise CodecError(
                f"model.codec={source} has no {CODEC_FILE}: an autoencoder run writes it when "
                f"`difflab train` finishes; finish it with `difflab plot {source}`"
            ) from None
        path = path / CODEC_FILE
    if not path.is_file():
        raise CodecError(
            f"model.codec={source} does not exist; train an autoencoder with "
            "`difflab train --preset mnist-ae --name mnist-ae` and set model.codec=runs/mnist-ae"
        ) from None
    return path


def read_meta(path: Path) -> dict:
    """The codec metadata of a codec file; CodecError for a corrupt file or a foreign one."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CodecError(
            f"codec file {path} is unreadable ({e}); retrain or re-finish its run"
        ) from None
    if META_KEY not in meta:
        raise CodecError(f"{path} is not an autoencoder codec (no {META_KEY} metadata)") from None
    return json.loads(meta[META_KEY])


def save_codec(path: Path, ae: AutoencoderKL, info: dict) -> str:
    """Write the codec file atomically; returns its SHA-256."""
    weights = {k: v.detach().float().cpu().contiguous() for k, v in ae.state_dict().items()}
    replace_atomically(path, lambda tmp: save_file(weights, str(tmp), {META_KEY: json.dumps(info)}))
    return sha256_file(path)


def pinned(cfg, path: Path):
    """cfg with model.codec_sha256 = the codec file's hash."""
    read_meta(path)  # refuse a foreign file now, not at the first batch
    model = dataclasses.replace(cfg.model, codec_sha256=sha256_file(path))
    return dataclasses.replace(cfg, model=model)


@torch.no_grad()
def measure_scale(ae: AutoencoderKL, batches, generator: torch.Generator) -> dict:
    """Shift (mean) and scale (1 / std) of posterior samples z ~ q(z | x) over `batches` of
    images (LDM's recipe for its scale factor), and how many latents they came from."""
    total, total_sq, count = 0.0, 0.0, 0
    device = next(ae.parameters()).device
    for x in batches:
        mean, logvar = ae.moments(x.to(device))
        eps = torch.randn(mean.shape, generator=generator).to(device)
        z = (mean + torch.exp(0.5 * logvar) * eps).double()
        total, total_sq, count = total + z.sum(), total_sq + z.square().sum(), count + z.numel()
    shift = float(total / count)
    std = float((total_sq / count - shift**2).clamp_min(1e-12).sqrt())
    return {"shift": shift, "scale": 1.0 / std, "n_latents": count}


class LatentCodec:
    """An autoencoder as the codec: `encode` (training) and `decode` (every sampling path).

    Args:
        ae: the autoencoder (frozen, in eval mode).
        info: the codec file's metadata (image_shape, shift, scale).
        mode: "mean" encodes to the posterior mean, "sample" to a posterior draw.
        sha256: the codec file's hash (recorded with every run that uses it).
    """

    def __init__(self, ae: AutoencoderKL, info: dict, mode: str, sha256: str, source: Path):
        self.ae = ae.eval().requires_grad_(False)
        self.info, self.mode, self.sha256, self.source = info, mode, sha256, source
        self.image_shape = tuple(info["image_shape"])
        self.shape = ae.latent_shape(self.image_shape)
        self.moments_shape = (2 * self.shape[0], *self.shape[1:])  # cached encodings
        self.shift, self.scale = float(info["shift"]), float(info["scale"])

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (
            self.shape
            if tuple(shape) in (self.image_shape, self.moments_shape)
            else (self.ae.latent_shape(tuple(shape)))
        )

    def draw(self, n: int, generator) -> tuple:
        """Posterior noise for a global batch of n (mode "sample"), drawn before sharding."""
        return (
            (torch.randn((n, *self.shape), generator=generator),) if self.mode == "sample" else ()
        )

    @torch.no_grad()
    def encode(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1], or cached moments (B, 2c, h, w) -> z (B, c, h, w)."""
        if tuple(x.shape[1:]) == self.moments_shape:
            mean, logvar = x.float().chunk(2, dim=1)
        else:
            mean, logvar = self.ae.moments(x.float())
        z = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
        return ((z - self.shift) * self.scale).to(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """z (B, c, h, w) -> images (B, C, H, W) in [-1, 1], on z's device, float32."""
        device = next(self.ae.parameters()).device
        x = self.ae.decode(z.float().to(device) / self.scale + self.shift)
        return x.clamp(-1.0, 1.0).to(z.device)

    def training_data(self, data, cfg):
        """The data stream, or with model.codec_cache a stream over the cached posterior
        moments of the whole training set (codecs/cache.py)."""
        if not cfg.model.codec_cache:
            return data
        from difflab.codecs.cache import cached_stream

        return cached_stream(self, data, cfg)


def load_codec(cfg, kind, device) -> LatentCodec:
    """The codec cfg.model.codec names, checked against its pin, the data and the U-Net."""
    m = cfg.model
    if m.codec_encode not in ENCODE_MODES:
        raise CodecError(
            f"model.codec_encode must be mean or sample, got {m.codec_encode!r}"
        ) from None
    path = codec_file(m.codec)
    info = read_meta(path)
    digest = sha256_file(path)
    if m.codec_sha256 and digest != m.codec_sha256:
        raise CodecError(
            f"the autoencoder {path} changed since this run pinned it (SHA-256 "
            f"{m.codec_sha256[:12]}..., now {digest[:12]}...): a latent model only decodes "
            "through the autoencoder it was trained with; restore that file, or train a new run"
        ) from None
    if tuple(kind.shape) != tuple(info["image_shape"]):
        raise CodecError(
            f"the autoencoder {m.codec} was trained on images of shape "
            f"{tuple(info['image_shape'])} ({info['data']}), but this run's data are "
            f"{tuple(kind.shape)}: use an autoencoder trained on this data set, or set "
            "data.image_size (and, for an image folder, data.channels) to match"
        ) from None
    ae = AutoencoderKL(kind.shape[0], **_ae_config(info))
    try:
        ae.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as e:
        raise CodecError(
            f"codec file {path} does not hold its autoencoder's weights: {e}"
        ) from None
    codec = LatentCodec(ae.to(device), info, m.codec_encode, digest, path)
    _check_latent_size(cfg, codec.shape)
    return codec


def _ae_config(info: dict) -> dict:
    cfg = AutoencoderConfig(**info["autoencoder"])
    return {**dataclasses.asdict(cfg), "channel_mults": tuple(cfg.channel_mults)}


def _check_latent_size(cfg, shape: tuple[int, ...]) -> None:
    if cfg.model.name != "unet":
        return
    downs = len(cfg.model.unet.channel_mults) - 1
    if shape[1] % 2**downs or shape[2] % 2**downs:
        raise CodecError(
            f"the autoencoder's latents are {shape[1]}x{shape[2]}, which a U-Net with {downs} "
            f"downsamplings cannot halve {downs} times; use fewer model.unet.channel_mults, or "
            "an autoencoder with a smaller f"
        ) from None
