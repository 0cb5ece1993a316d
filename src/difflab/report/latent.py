"""The report of an autoencoder run (the first stage of latent diffusion): its codec file with
the latent scale, reconstruction metrics, and figures of reconstructions and latents.

    RUN/codec.safetensors          EMA weights + config, image shape, latent shift and scale
    RUN/samples/reconstructions.npz  originals, reconstructions and latents of test images
    RUN/plots/reconstructions.png  originals (odd rows) above their reconstructions (even rows)
    RUN/plots/latents.png          the c latent channels of a few images, one row per image
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from difflab import build
from difflab.codecs.latent import CODEC_FILE, measure_scale, save_codec
from difflab.evaluation import references
from difflab.evaluation.reconstruction import evaluate_reconstructions, held_out_images, reconstruct
from difflab.evaluation.sampled import default_judge_path, extractors_for
from difflab.files import savez_atomically, write_text_atomically
from difflab.report import grids
from difflab.runs import load_run

SCALE_IMAGES = 10_000  # training images the latent scale is measured on
FIGURE_IMAGES = 32  # test images in the reconstruction figure
LATENT_IMAGES = 6  # rows of the latent-channel figure
EVAL_N = 10_000  # test images reconstructed for the metrics


def write_codec(run_dir: Path, n: int = SCALE_IMAGES) -> dict:
    """Measure the latent shift and scale of the run's EMA autoencoder on n training images
    and write RUN/codec.safetensors (atomically); returns its metadata."""
    run = load_run(run_dir, use_ema=True)  # the codec is the EMA autoencoder, whatever sample.*
    cfg = run.cfg
    stream = build.build_data(cfg, seed=cfg.train.seed)
    batches = (stream.next_batch(min(500, n - k))[0] for k in range(0, n, 500))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    stats = measure_scale(run.model.net, batches, generator)
    info = {
        "autoencoder": dataclasses.asdict(cfg.model.autoencoder),
        "image_shape": list(run.shape),
        "data": cfg.data.name,
        "step": run.step,
        "checkpoint": str(run.checkpoint),
        "measured_on": f"{n} training images, posterior samples",
        **stats,
    }
    info["sha256"] = save_codec(run_dir / CODEC_FILE, run.model.net, info)
    return info


def make_autoencoder_artefacts(
    run_dir: Path, progress: bool = True, judge: str | None = None, n: int = EVAL_N
) -> dict:
    """After training: the codec file, reconstructions of test images and their metrics."""
    info = write_codec(run_dir)
    run = load_run(run_dir)
    images, labels = held_out_images(run, n)
    few = images[:FIGURE_IMAGES]
    mean, _ = run.model.net.moments(few.to(run.device))
    savez_atomically(
        run_dir / "samples" / "reconstructions.npz",
        originals=few.numpy(),
        reconstructions=reconstruct(run.model.net, few).numpy(),
        latents=mean.cpu().numpy(),
        shift=info["shift"],
        scale=info["scale"],
    )
    metrics = ["fd_judge", "accuracy"] if labels is not None else ["fd_judge"]
    judge_path = Path(judge) if judge else default_judge_path(run.cfg.data.name)
    extractors = {}
    if judge_path.is_file():
        extractors = extractors_for(metrics, dataset=run.cfg.data.name, judge=judge_path)
    else:
        metrics = []  # PSNR and SSIM need no judge
    reference = references.open_reference(
        f"{run.cfg.data.name}:train", tuple(run.shape), root=run.cfg.data.root
    )
    rows = evaluate_reconstructions(run, images, labels, metrics, reference, extractors)
    (run_dir / "evals").mkdir(exist_ok=True)
    out = run_dir / "evals" / "reconstruction.json"
    write_text_atomically(out, json.dumps({"rows": rows}, indent=2) + "\n")
    result = {r["label"]: r["value"] for r in rows}
    return {**result, "latent_scale": info["scale"], "latent_shift": info["shift"]}


def plot_autoencoder_run(run_dir: Path) -> list[Path]:
    """The reconstruction and latent-channel figures from samples/reconstructions.npz."""
    with np.load(run_dir / "samples" / "reconstructions.npz") as f:
        originals, recon, latents = f["originals"], f["reconstructions"], f["latents"]
    plots = run_dir / "plots"
    cols = 8
    rows = []
    for start in range(0, len(originals), cols):
        rows += [originals[start : start + cols], recon[start : start + cols]]
    paths = [grids.save_grid(np.concatenate(rows), plots / "reconstructions.png", nrow=cols)]
    z = latents[:LATENT_IMAGES]  # (K, c, h, w): each channel as a grey image in its own range
    lo = z.min(axis=(2, 3), keepdims=True)
    hi = z.max(axis=(2, 3), keepdims=True)
    channels = (2 * (z - lo) / np.maximum(hi - lo, 1e-8) - 1).reshape(-1, 1, *z.shape[2:])
    paths.append(grids.save_grid(channels, plots / "latents.png", nrow=z.shape[1]))
    return paths


def latent_tiles(z: np.ndarray) -> np.ndarray:
    """Latents (..., c, h, w) of unit variance as grey images (..., 1, h, c w) in [-1, 1]: the
    c channels side by side, +-3 standard deviations mapped to black and white."""
    tiles = np.concatenate([z[..., k : k + 1, :, :] for k in range(z.shape[-3])], axis=-1)
    return np.clip(tiles / 3.0, -1.0, 1.0)


@torch.no_grad()
def decoded_states(codec, states: dict) -> dict:
    """A latent run's recorded states: xs and x0_hats decoded into images (every image figure
    then works as for pixel runs), the latents kept as channel tiles (latent_xs, latent_x0_hats)
    for the latent denoising GIF."""

    def decode(a: np.ndarray) -> np.ndarray:
        flat = torch.from_numpy(a.reshape(-1, *a.shape[2:]))
        return codec.decode(flat).numpy().reshape(*a.shape[:2], *codec.image_shape)

    return {
        **states,
        "xs": decode(states["xs"]),
        "x0_hats": decode(states["x0_hats"]),
        "latent_xs": latent_tiles(states["xs"]),
        "latent_x0_hats": latent_tiles(states["x0_hats"]),
    }


def latent_gif(traj: dict, plots: Path, names, lams) -> list[Path]:
    """plots/latent_denoising.gif (x_t over x0_hat in the latent space, channels side by side)
    of a latent run, beside denoising.gif of the same states decoded; [] for pixel runs."""
    from difflab.report import gifs

    if "latent_xs" not in traj:
        return []
    labels = traj["labels"] if len(traj["labels"]) else None
    return [
        gifs.denoising_gif(
            traj["ts"],
            traj["latent_xs"],
            traj["latent_x0_hats"],
            plots / "latent_denoising.gif",
            labels,
            names,
            lams=lams,
            steps=traj.get("steps"),
        )
    ]
