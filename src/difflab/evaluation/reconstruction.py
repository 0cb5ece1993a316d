"""First-stage metrics of latent diffusion: how much an autoencoder run loses on its own.

Reconstructions x_hat = D(mean of q(z | x)) of the test split (EMA weights) are measured by
    psnr          10 log10(range^2 / MSE) per image, range 2 for images in [-1, 1], averaged
    ssim          Wang et al. 2004, eq. 13: 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
                  per channel, averaged over pixels and images
and by the metrics of generated images (protocol.py: fd_judge, accuracy; fid, kid, pr for
Inception users, i.e. rFID), each row beside the same metric of the original images, so the
loss of the autoencoder alone reads off one table. Rows carry the provenance of today's rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from difflab.config import ConfigError
from difflab.evaluation import protocol
from difflab.evaluation.classifier import load_judge
from difflab.evaluation.references import dataset_images
from difflab.evaluation.sampled import default_judge_path

SSIM_WINDOW, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)
DATA_RANGE = 2.0  # images in [-1, 1]


def psnr(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-image PSNR in dB (N,) of x_hat against x, both (N, C, H, W) in [-1, 1]."""
    mse = (x - x_hat).square().flatten(1).mean(1).clamp_min(1e-12)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def ssim(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-image SSIM (N,) of x_hat against x, both (N, C, H, W) in [-1, 1] (Wang et al. 2004,
    eq. 13, with Gaussian-weighted local statistics over 'valid' windows)."""
    c, dtype = x.shape[1], x.dtype
    x, x_hat = x.double(), x_hat.double()  # local variances are differences of squares
    k = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(k**2) / (2 * SSIM_SIGMA**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    window = g.expand(c, 1, SSIM_WINDOW, SSIM_WINDOW).to(x)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=c)

    c1, c2 = (SSIM_K[0] * DATA_RANGE) ** 2, (SSIM_K[1] * DATA_RANGE) ** 2
    mu_x, mu_y = blur(x), blur(x_hat)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(x_hat * x_hat) - mu_y**2
    cov = blur(x * x_hat) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1).to(dtype)


@torch.no_grad()
def reconstruct(ae, images: Tensor, batch_size: int = 500) -> Tensor:
    """D(mean of q(z | x)) for images (N, C, H, W) in [-1, 1], clamped to [-1, 1], on the CPU."""
    device = next(ae.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        out.append(ae.decode(ae.moments(x)[0]).clamp(-1.0, 1.0).float().cpu())
    return torch.cat(out)


def held_out_images(run, n: int, root: str | None = None) -> tuple[Tensor, Tensor | None]:
    """The first n images of the run's data set's test split (all of it for n >= its size)."""
    from difflab.data.images import load_image_dataset

    d = run.cfg.data
    try:
        dataset, _ = load_image_dataset(
            d.name, root or d.root, "test", image_size=d.image_size or None, channels=d.channels
        )
    except ConfigError as e:
        raise ConfigError(f"reconstruction metrics need the test split of {d.name}: {e}") from None
    idx = torch.arange(min(n, len(dataset)))
    labels = getattr(dataset, "labels", None)
    return dataset_images(dataset, idx), None if labels is None else labels[idx]


def evaluate_reconstructions(
    run,
    images: Tensor,
    labels: Tensor | None,
    metrics: list[str],
    reference,
    extractors: dict,
    cache: bool = True,
) -> list[dict]:
    """Rows for psnr, ssim and `metrics` of the reconstructions of `images`, and `metrics` of
    the images themselves ("of": "reconstructions" | "originals")."""
    start = time.perf_counter()
    x_hat = reconstruct(run.model.net, images)
    seconds = time.perf_counter() - start
    provenance = {
        "source": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "ema": run.ema,
        "images": "test split (first n)",
        "ms_per_image": 1000 * seconds / len(images),
    }
    rows = []
    for name, values in (("psnr", psnr(images, x_hat)), ("ssim", ssim(images, x_hat))):
        rows.append(
            {
                "metric": name,
                "label": protocol.label(name, len(images)),
                "value": float(values.mean()),
                "std": float(values.std()),
                "n_generated": len(images),
                "extractor": "pixels",
                "reference": None,
                "of": "reconstructions",
                **provenance,
            }
        )
    for of, x in (("reconstructions", x_hat), ("originals", images)):
        rows += protocol.evaluate_images(
            x, labels, metrics, reference, extractors, {**provenance, "of": of}, cache=cache
        )
    for row in rows:  # the table says which set a value is of: fd_judge10k/recon, .../orig
        row["label"] += "/recon" if row["of"] == "reconstructions" else "/orig"
    return rows


def feature_judge(cfg):
    """The judge an autoencoder's feature loss compares features in (training.hooks.Hooks)."""
    path = cfg.train.autoencoder.feature_judge or default_judge_path(cfg.data.name)
    try:
        return load_judge(path)
    except ConfigError as e:
        raise ConfigError(
            f"train.autoencoder.feature_weight > 0 needs a judge for {cfg.data.name}: {e}; "
            "train one with `difflab eval train-classifier` or set feature_judge=FILE"
        ) from None


def evaluate_autoencoder_run(args, source: Path, use_ema: bool | None = None) -> list[dict]:
    """`difflab eval RUN` of an autoencoder run: reconstructions of the first --n test images
    (default: all) against --reference (default: the training split), with --metric (default
    fd_judge, accuracy; fid, kid, pr for rFID and friends), --judge, --checkpoint; `use_ema`:
    the weights (--raw: False; None: the run's sample.use_ema)."""
    from difflab.evaluation.references import open_reference
    from difflab.evaluation.sampled import extractors_for
    from difflab.runs import load_run

    run = load_run(source, checkpoint=args.checkpoint, use_ema=use_ema, device=args.device)
    images, labels = held_out_images(run, args.n or 10**9, args.root)
    metrics = (args.metric or "fd_judge,accuracy").split(",")
    metrics = [m.strip() for m in metrics if m.strip() and (labels is not None or m != "accuracy")]
    reference = open_reference(
        args.reference or f"{run.cfg.data.name}:train",
        tuple(run.shape),
        root=args.root or run.cfg.data.root,
        n=args.n_reference,
    )
    extractors = extractors_for(
        metrics,
        dataset=run.cfg.data.name,
        judge=args.judge,
        inception_weights=args.inception_weights,
        inception_sha256=args.inception_sha256,
        device=run.device,
    )
    return evaluate_reconstructions(
        run, images, labels, metrics, reference, extractors, cache=not args.no_cache
    )
