"""An offline "judge" for MNIST-like data: a small CNN classifier and its feature embedding.

Inception-v3 (the network behind FID) needs downloaded weights and sees 299x299 RGB natural
images; for 32x32 digits a classifier trained here, on the same data, is offline, fast and
sensitive to what matters for digits. Its penultimate layer gives the features for
`frechet.frechet_distance`, `frechet.kernel_inception_distance` and precision/recall; its
predictions give class-conditional accuracy. Numbers are comparable only between runs that use the
same judge file, so the file records its SHA-256 and `load_judge` checks it.

Files: `<name>.safetensors` (weights; loading runs no code) and `<name>.json` (data set, test
accuracy, architecture, training settings, SHA-256 of the weights), each written atomically.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difflab.data.folders import check_signed_images, to_signed
from difflab.data.images import load_image_dataset
from difflab.data.readers import TensorImages
from difflab.errors import ConfigError
from difflab.files import replace_atomically, sha256_file

__all__ = ["Judge", "JudgeExtractor", "JudgeFileError", "fit_judge", "judge_features"]
__all__ += ["judge_predict", "load_judge", "save_judge", "train_judge"]

IMAGE_SIZE = 32


class JudgeFileError(ConfigError):
    """A judge file is missing, incomplete or does not match its recorded checksum."""


class Judge(nn.Module):
    """Small CNN classifier for (B, C, 32, 32) images in [-1, 1].

    Three conv blocks (conv 3x3, BatchNorm, ReLU, max-pool: 32 -> 16 -> 8 -> 4 pixels), then a
    fully connected layer to `feature_dim` (the embedding), dropout and the class logits. Kept
    small so that it trains to >= 99% MNIST test accuracy in a few CPU minutes.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, feature_dim: int = 128
    ):
        super().__init__()
        self.arch = dict(
            in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim
        )
        channels = [in_channels, width, 2 * width, 4 * width]
        blocks = []
        for c_in, c_out in itertools.pairwise(channels):
            # no conv bias: BatchNorm's shift replaces it
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            blocks += [nn.ReLU(), nn.MaxPool2d(2)]
        self.blocks = nn.Sequential(*blocks)
        self.embed = nn.Linear(4 * width * (IMAGE_SIZE // 8) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer embedding: x (B, C, 32, 32) in [-1, 1] -> (B, feature_dim) >= 0."""
        return F.relu(self.embed(self.blocks(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: x (B, C, 32, 32) in [-1, 1] -> (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))


def _random_shift(x: Tensor, generator: torch.Generator, pad: int = 2) -> Tensor:
    """Translate each image of x (B, C, H, W) by up to `pad` pixels each way: pad with the
    background (-1) and crop at a random offset. Digits are not centred exactly, so this helps
    the judge generalise (and costs almost nothing)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)  # (B, C, H + 2 pad, W + 2 pad)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def _train_epoch(model, optimizer, schedule, data: TensorImages, batch_size, generator) -> float:
    """One pass over `data` in a seeded random order; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(data), generator=generator)
    total = 0.0
    for idx in order.split(batch_size):
        x = _random_shift(to_signed(data.images[idx]), generator)
        loss = F.cross_entropy(model(x), data.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += float(loss.detach()) * len(idx)
    return total / len(data)


def fit_judge(
    train: TensorImages,
    test: TensorImages,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[Judge, float]:
    """Train a Judge on in-memory images and measure its accuracy on `test`.

    Adam with a one-cycle learning rate (warm-up to `lr`, then cosine decay to ~0; Smith &
    Topin 2019), which reaches MNIST >= 99% in a few epochs. Seeded: torch.manual_seed for the
    initial weights and dropout, a torch.Generator for batch order and shifts.

    Args:
        train, test: images uint8 (N, C, 32, 32) with labels (N,).
        progress: called with one line per epoch, e.g. `print`.
    Returns:
        (model in eval mode, test accuracy in [0, 1]).
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if tuple(train.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ConfigError(f"the judge sees 32x32 images, got (C, H, W) = {train.shape}")
    torch.manual_seed(seed)
    model = Judge(in_channels=train.shape[0], num_classes=max(train.num_classes, test.num_classes))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        start = time.perf_counter()
        loss = _train_epoch(model, optimizer, schedule, train, batch_size, generator)
        if progress:
            accuracy = _accuracy(model, test)
            progress(
                f"judge epoch {epoch + 1}/{epochs}: loss {loss:.4f}, test accuracy "
                f"{accuracy:.4f}, {time.perf_counter() - start:.0f} s"
            )
    return model.eval(), _accuracy(model, test)


def _accuracy(model: Judge, data: TensorImages) -> float:
    labels = judge_predict(model, to_signed(data.images))
    return float((labels == data.labels).double().mean())


def train_judge(
    dataset_name: str,
    root: str | Path,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    out_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    download: bool = False,
) -> tuple[Judge, float]:
    """Train the judge on the train split of a data set and test it on the test split.

    Args:
        dataset_name, root: as for `data.images.load_image_dataset` (mnist, fashion, ...).
        out_path: where to save `<name>.safetensors` and its `<name>.json` sidecar; None: don't.
        progress: called with one line per epoch, e.g. `print`.
        download: fetch missing standard data sets (needs a network).
    Returns:
        (model in eval mode, test accuracy in [0, 1]).
    """
    train, _ = load_image_dataset(dataset_name, root, "train", download, image_size=IMAGE_SIZE)
    test, _ = load_image_dataset(dataset_name, root, "test", download, image_size=IMAGE_SIZE)
    start = time.perf_counter()
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    model, accuracy = fit_judge(train, test, progress=progress, **settings)
    if out_path is not None:
        info = dict(dataset=dataset_name, test_accuracy=accuracy, training=settings)
        info["train_seconds"] = round(time.perf_counter() - start, 1)
        save_judge(model, out_path, info)
    return model, accuracy


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_judge(model: Judge, path: str | Path, info: dict | None = None) -> Path:
    """Save the weights to `path` (safetensors) and `info` plus the architecture and SHA-256 of
    the weights to the JSON sidecar beside it (`path` with suffix .json). Returns `path`."""
    path = Path(path)
    if path.suffix == ".json":
        raise ConfigError(f"{path}: the weights need a name not ending in .json (their sidecar's)")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    replace_atomically(path, lambda tmp: save_file(weights, tmp))
    meta = {**(info or {}), "arch": model.arch, "sha256": sha256_file(path)}
    text = json.dumps(meta, indent=2) + "\n"
    replace_atomically(_sidecar(path), lambda tmp: tmp.write_text(text))  # last: it vouches
    return path


def load_judge(path: str | Path) -> Judge:
    """Load a judge saved by `save_judge`/`train_judge`, in eval mode, after checking that the
    weights match the SHA-256 recorded in the sidecar."""
    path = Path(path).expanduser().absolute()
    sidecar = _sidecar(path)
    retrain = f"retrain with difflab.evaluation.classifier.train_judge(..., out_path='{path}')"
    if not path.is_file() or not sidecar.is_file():
        raise JudgeFileError(f"judge files {path} and {sidecar} are not both there; {retrain}")
    meta = json.loads(sidecar.read_text())
    if sha256_file(path) != meta.get("sha256"):
        raise JudgeFileError(
            f"the judge weights at {path} do not match their recorded SHA-256; {retrain} "
            f"(dataset {meta.get('dataset', '?')!r})"
        )
    model = Judge(**meta["arch"])
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.inference_mode()
def _batched(model: Judge, images: Tensor, batch_size: int, fn: Callable) -> Tensor:
    """fn(model, batch) over images (N, C, 32, 32) in batches, on the model's device, in eval
    mode (BatchNorm's running statistics, no dropout); the model's mode is restored after."""
    check_signed_images(images, (model.arch["in_channels"],), IMAGE_SIZE)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        outputs = [fn(model, batch.to(device)).cpu() for batch in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def judge_features(model: Judge, images: Tensor, batch_size: int = 500) -> Tensor:
    """Judge embeddings: images (N, C, 32, 32) float in [-1, 1] -> features (N, D) float32."""
    return _batched(model, images, batch_size, lambda m, x: m.features(x))


def judge_predict(model: Judge, images: Tensor, batch_size: int = 500) -> Tensor:
    """Predicted classes: images (N, C, 32, 32) float in [-1, 1] -> labels (N,) long."""
    return _batched(model, images, batch_size, lambda m, x: m(x).argmax(dim=1))


class JudgeExtractor:
    """A saved judge as a feature extractor, with the interface of `inception.InceptionExtractor`
    (name, weights_sha256, feature_dim, features, logits), plus `predict` for class accuracy."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 500):
        self.path = Path(path).expanduser().absolute()
        self.model = load_judge(self.path).to(device)
        meta = json.loads(_sidecar(self.path).read_text())
        self.dataset = meta.get("dataset", "?")
        self.name = f"judge-{self.dataset}"
        self.weights_sha256 = meta["sha256"]
        self.feature_dim = int(meta["arch"]["feature_dim"])
        self.in_channels = int(meta["arch"]["in_channels"])
        self.test_accuracy = meta.get("test_accuracy")
        self.batch_size = batch_size
        self.standard = False  # numbers compare only between runs that share this file

    def features(self, images: Tensor) -> Tensor:
        return judge_features(self.model, images, self.batch_size)

    def logits(self, images: Tensor) -> Tensor:
        return _batched(self.model, images, self.batch_size, lambda m, x: m(x))

    def predict(self, images: Tensor) -> Tensor:
        return judge_predict(self.model, images, self.batch_size)
