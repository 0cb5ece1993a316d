"""Benchmark: `difflab sample` in 1 process vs N processes (issue 20), each with one thread.

A tiny class-conditional U-Net run (the test suite's stripes folder at 32 x 32, trained one step:
timing does not depend on quality) samples a fixed set with guidance, once with one process and
once with `--nproc N` (OMP_NUM_THREADS=1 in both), as a user would start them: the wall time of
the whole command (process start included) and the sampling time it reports, their ratios, and
whether the two samples.npz are bit-identical. `--inception` also times the Inception-v3
feature extraction (random weights of the real architecture: the same cost) per 1,000 images on
one thread, the other half of an FID-50k evaluation.

    python bench/scale.py [--n 256] [--steps 20] [--nproc 2] [--inception]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TINY = [
    "data.name=imagefolder",
    "data.image_size=32",
    "data.channels=1",
    "data.class_conditional=true",
    "model.unet.base_channels=16",
    "model.unet.channel_mults=1,2",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_levels=1",
    "model.unet.norm_groups=8",
    "train.batch_size=8",
    "train.steps=1",
    "train.checkpoint_every=1",
]


def _difflab(*argv: str) -> tuple[float, str]:
    """(wall seconds, stdout) of `python -m difflab argv` with one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "difflab", *argv], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"difflab {' '.join(argv)} failed:\n{done.stderr}")
    return seconds, done.stdout


def _stripes(root: Path) -> None:
    for name, axis in (("h", 0), ("v", 1)):
        (root / name).mkdir(parents=True)
        for k in range(6):
            stripes = ((np.arange(32) // (2 + k % 3)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 32, 1 - axis)
            Image.fromarray(img).save(root / name / f"{k}.png")


def _inception_ms_per_image(n: int = 32) -> float:
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, Path(tmp) / "empty.pth")
        load = FeatureExtractorInceptionV3.load_state_dict
        FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None  # random weights
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=f"{tmp}/empty.pth"
            ).eval()
        finally:
            FeatureExtractorInceptionV3.load_state_dict = load
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        net(images[:4])  # warm-up
        start = time.perf_counter()
        for batch in images.split(16):
            net(batch)
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--inception", action="store_true")
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="difflab-scale-") as tmp:
        root = Path(tmp)
        _stripes(root / "data")
        sets = [f"data.root={root / 'data'}", *TINY]
        _difflab(
            "train",
            "--preset",
            "imagefolder",
            "--runs",
            str(root),
            "--name",
            "run",
            "--no-finish",
            "--quiet",
            "--set",
            *sets,
        )
        flags = ["--n", str(args.n), "--steps", str(args.steps), "--guidance", "2.0", "--quiet"]
        figures = {}
        for nproc in (1, args.nproc):
            out = root / f"s{nproc}.npz"
            wall, said = _difflab(
                "sample", str(root / "run"), "--out", str(out), "--nproc", str(nproc), *flags
            )
            sampling = float(re.search(r" in ([0-9.]+) s ->", said).group(1))
            figures[nproc] = {"wall_s": round(wall, 2), "sampling_s": sampling}
        with np.load(root / "s1.npz") as a, np.load(root / f"s{args.nproc}.npz") as b:
            identical = a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    one, many = figures[1], figures[args.nproc]
    result = {
        "what": f"difflab sample: {args.n} guided 32x32 samples, ddpm {args.steps} steps, "
        "tiny U-Net, OMP_NUM_THREADS=1 per process",
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processes": {str(k): v for k, v in figures.items()},
        "wall_ratio": round(one["wall_s"] / many["wall_s"], 2),  # speed-up, start included
        "sampling_ratio": round(one["sampling_s"] / max(many["sampling_s"], 1e-9), 2),
        "bit_identical": identical,
    }
    if args.inception:
        ms = _inception_ms_per_image()
        result["inception_s_per_1000_images_1_thread"] = round(ms, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
