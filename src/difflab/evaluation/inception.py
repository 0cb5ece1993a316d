"""The Inception-v3 of published FID/KID/IS numbers, with its weights pinned by SHA-256.

FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and the Inception Score (Salimans et al.
2016) are comparable between papers only when computed with one network: the TensorFlow
Inception-v3 of 2015-12-05, which torch-fidelity ports to PyTorch as
`FeatureExtractorInceptionV3`. We use that module as it is and add what it lacks: the weights
file is found (argument, environment, torch hub cache or download), verified by SHA-256 before
`torch.load` runs its pickle, and explained when missing; images in [-1, 1] are quantised as
difflab saves them, so features equal torch-fidelity's on the same images written as 8-bit files.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from difflab.data.folders import check_signed_images
from difflab.errors import ConfigError
from difflab.files import replace_atomically, sha256_file

__all__ = ["INCEPTION_FILENAME", "INCEPTION_SHA256", "INCEPTION_URL", "InceptionExtractor"]
__all__ += ["InceptionWeightsError", "inception_score", "resolve_inception_weights"]

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch hub names files <name>-<first 8 hex digits of their SHA-256>.<ext>; we check all 64
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# pytorch-fid distributes the same network under this name (same hash); accept it from the cache
_PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
ENV_VAR = "DIFFLAB_INCEPTION_WEIGHTS"
LAYERS = {"64": 64, "192": 192, "768": 768, "2048": 2048}  # torch-fidelity's names: widths
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> its SHA-256


class InceptionWeightsError(ConfigError):
    """The Inception-v3 weights are missing, cannot be downloaded or have the wrong SHA-256."""


def _key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _check_hash(path: Path, sha256: str, fix: str) -> Path:
    """Return `path` (absolute) if its SHA-256 is `sha256`, else raise naming `fix`. A file whose
    (path, size, mtime) was hashed before is not read again."""
    path = path.absolute()
    key = _key(path)
    if key not in _verified:
        _verified[key] = sha256_file(path)
    if _verified[key] != sha256.lower():
        raise InceptionWeightsError(
            f"{path} has SHA-256 {_verified[key]}, expected {sha256.lower()}: it is not the "
            f"pinned Inception-v3 (a partial download, another file or another network); {fix}"
        )
    return path


def _cache() -> Path:
    """Torch hub's checkpoint folder, where torch-fidelity's own download goes too."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_message(folder: Path, sha256: str, reason: str) -> str:
    return (
        f"the Inception-v3 weights are not on this machine and were not downloaded ({reason}). "
        f"Put {INCEPTION_FILENAME} in the folder {folder} (fetch it on a machine with network "
        f"from {INCEPTION_URL}), or point to a copy with --inception-weights PATH or "
        f"{ENV_VAR}=PATH. Its SHA-256 must be {sha256}."
    )


def _download(url: str, dst: Path) -> None:
    """Fetch `url` to `dst` (torch hub's downloader, with a progress bar on stderr)."""
    torch.hub.download_url_to_file(url, str(dst), progress=True)


def _download_verified(folder: Path, sha256: str) -> Path:
    """Download the weights into `folder` under a temporary name, check the hash, then rename:
    the final name only ever holds a complete, verified file."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / INCEPTION_FILENAME

    def fetch(tmp: Path) -> None:
        try:
            _download(INCEPTION_URL, tmp)
        except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
            message = _missing_message(folder, sha256, f"download failed: {err}")
            raise InceptionWeightsError(message) from err
        fix = f"the file at {INCEPTION_URL} changed or the download was corrupted; not saved"
        _check_hash(tmp, sha256, fix)
        _verified.pop(_key(tmp.absolute()))

    replace_atomically(final, fetch)
    final = final.absolute()
    _verified[_key(final)] = sha256.lower()  # a rename keeps size and mtime: no need to hash again
    return final


def resolve_inception_weights(
    path: str | Path | None = None, *, sha256: str = INCEPTION_SHA256, download: bool = True
) -> Path:
    """Find the Inception-v3 weights file and verify its SHA-256.

    Looks at, in order: `path`; the environment variable DIFFLAB_INCEPTION_WEIGHTS; torch hub's
    cache `<torch.hub.get_dir()>/checkpoints/` under torch-fidelity's or pytorch-fid's file name
    (torch-fidelity downloads there too, so one copy serves both); else downloads INCEPTION_URL
    into that cache. The first of these that is set or present is used, never skipped.

    Args:
        path: an explicit weights file, e.g. from --inception-weights.
        sha256: the SHA-256 the file must have (the pinned network by default).
        download: whether to fetch the file when it is nowhere on this machine.
    Returns:
        Absolute path of the verified file.
    Raises:
        InceptionWeightsError: no file and no download, or a file with another SHA-256.
    """
    if path is None and os.environ.get(ENV_VAR):
        path, source = os.environ[ENV_VAR], f"environment variable {ENV_VAR}"
    else:
        source = "path argument (--inception-weights)"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(
                f"Inception-v3 weights {path} (from the {source}) is not a file; fix the path "
                f"(the file is {INCEPTION_FILENAME} from {INCEPTION_URL}, SHA-256 {sha256}), or "
                f"unset it to use torch hub's cache {_cache()}"
            )
        return _check_hash(path, sha256, f"point the {source} at the file from {INCEPTION_URL}")
    folder = _cache()
    for name in (INCEPTION_FILENAME, _PYTORCH_FID_FILENAME):
        if (folder / name).is_file():
            return _check_hash(folder / name, sha256, "delete it and run again to download it")
    if not download:
        raise InceptionWeightsError(_missing_message(folder, sha256, "download=False"))
    return _download_verified(folder, sha256)


def _to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] (N, C, H, W) -> uint8 (N, 3, H, W): clamp, then round (x + 1) * 127.5 half up as
    `viz_images.to_uint8` does when saving images, so files and tensors give equal features."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # grey -> RGB


class InceptionExtractor:
    """Features and logits of the TF-ported Inception-v3 (torch-fidelity's module).

    The weights are resolved and verified when the extractor is made (so a missing file is
    reported before any sampling), the network is built on first use. Inputs of any size are
    resized to 299 x 299 by torch-fidelity's TF-compatible bilinear resize.

    Args:
        weights: weights file; None: see `resolve_inception_weights`.
        sha256: the SHA-256 the weights must have.
        layer: feature layer, "2048" (pool3, the FID layer) or "64", "192", "768" (earlier pools).
        device: where the network runs; outputs are returned on the CPU.
        batch_size: images per forward pass.
        download: whether a missing file may be downloaded.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        sha256: str = INCEPTION_SHA256,
        layer: str = "2048",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        download: bool = True,
    ):
        if layer not in LAYERS:
            raise ConfigError(f"layer must be one of {list(LAYERS)}, got {layer!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.weights_path = resolve_inception_weights(weights, sha256=sha256, download=download)
        self.weights_sha256 = sha256.lower()
        self.layer, self.feature_dim = layer, LAYERS[layer]
        self.name = "inception-v3-tf" + ("" if layer == "2048" else f"@{layer}")
        self.device, self.batch_size = torch.device(device), batch_size
        self._net: FeatureExtractorInceptionV3 | None = None

    @property
    def standard(self) -> bool:
        """True when the numbers are comparable with published FID (pinned weights, pool3)."""
        return self.weights_sha256 == INCEPTION_SHA256 and self.layer == "2048"

    def _network(self) -> FeatureExtractorInceptionV3:
        if self._net is None:
            # checked again (from the cache unless the file changed): torch.load runs a pickle
            path = _check_hash(self.weights_path, self.weights_sha256, "restore the file")
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", [self.layer], feature_extractor_weights_path=str(path)
            )
            self._net = net.to(self.device).eval()
        return self._net

    def _run(self, images: Tensor, output: str) -> Tensor:
        """torch-fidelity's output `output` for images (N, C, H, W) in [-1, 1], in batches."""
        check_signed_images(images)
        net = self._network()
        # its forward returns the outputs listed in features_list and stops after the last one,
        # so asking per call lets layer "64" skip most of the network
        net.features_list = [output]
        outputs = []
        with torch.inference_mode():
            for batch in images.split(self.batch_size):
                (out,) = net(_to_uint8(batch.to(self.device)))
                outputs.append(out.float().cpu())
        return torch.cat(outputs)  # outside inference mode: a normal tensor, editable in place

    def features(self, images: Tensor) -> Tensor:
        """Features: images (N, C, H, W) float in [-1, 1], C in {1, 3} -> (N, feature_dim) float32
        on the CPU (layer "2048": the pool3 features of FID and KID)."""
        return self._run(images, self.layer)

    def logits(self, images: Tensor) -> Tensor:
        """Class logits without the fc bias (torch-fidelity's "logits_unbiased", which its
        Inception Score uses): images (N, C, H, W) in [-1, 1] -> (N, 1008) float32 on the CPU."""
        return self._run(images, "logits_unbiased")


def inception_score(logits: Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016, "Improved techniques for training GANs", sec. 4):
    IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over the split.

    As torch-fidelity's `isc_features_to_metric` (equal where it is finite): rows are shuffled by
    numpy's RandomState(seed).permutation, cut into `splits` contiguous chunks (chunk i holds
    rows i N // splits to (i + 1) N // splits), one score per chunk, in float64.

    Args:
        logits: (N, K) logits, e.g. `InceptionExtractor.logits` (K = 1008).
        splits: number of chunks; N >= splits.
        seed: seeds the shuffle.
    Returns:
        (mean, std) over the chunks (std with ddof=0); 1 <= IS <= K.
    """
    if logits.dim() != 2 or splits < 1 or len(logits) < splits:
        raise ConfigError(
            f"need logits (N, K) with N >= splits = {splits} >= 1, got shape "
            f"{tuple(logits.shape)}; score more images or lower splits"
        )
    n = len(logits)
    x = logits.detach().cpu()[np.random.RandomState(seed).permutation(n)].double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)  # (N, K) p(y|x)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        log_marginal = p[rows].mean(dim=0, keepdim=True).log()  # (1, K) log p(y)
        terms = p[rows] * (log_p[rows] - log_marginal)  # (n_i, K)
        # 0 log 0 = 0: where p(y|x) underflows to 0 (logits ~750 apart), torch-fidelity gets NaN
        terms = terms.where(p[rows] > 0, 0.0)
        kl = terms.sum(dim=1)  # (n_i,) KL(p(y|x) || p(y))
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))  # numpy's summation order, as theirs
