"""Same config and seed, same numbers: train and sample with the difflab on PYTHONPATH and write
the samples and the EMA weights' SHA-256, so two trees (before and after a refactor) can be
compared bit for bit.

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before/src python bench/same_numbers.py bench/results/before.npz
    PYTHONPATH=src python bench/same_numbers.py bench/results/after.npz
    python bench/same_numbers.py --compare bench/results/before.npz bench/results/after.npz

What is drawn: the toy2d preset at 400 steps sampled with DDIM-20 (1,000 points), and the mnist
preset (class-conditional) at 30 steps sampled with DDPM-50 at guidance 1.25 (20 images, two of
each class). Needs the MNIST files (../shared/data or --root).
"""

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def draw(out: Path, root: Path) -> None:
    from difflab.config import SampleConfig, apply_overrides, preset
    from difflab.runs import draw_samples, load_run

    try:  # the layout before the one-model redesign
        from difflab.train import train
    except ImportError:
        from difflab.training.loop import train
    torch.set_num_threads(2)
    runs, arrays = Path(tempfile.mkdtemp()), {}
    toy = apply_overrides(preset("toy2d"), ["train.steps=400"])
    mnist = apply_overrides(
        preset("mnist"),
        [
            f"data.root={root}",
            "train.steps=30",
            "train.warmup_steps=10",
            "train.checkpoint_every=30",
        ],
    )
    ddim = SampleConfig(sampler="ddim", steps=20, n=1000, seed=0, batch_size=1000)
    ddpm = SampleConfig(
        sampler="ddpm", steps=50, n=20, seed=0, batch_size=20, guidance=1.25, spacing="trailing"
    )
    for name, cfg, scfg, labels in (
        ("toy", toy, ddim, None),
        ("mnist", mnist, ddpm, torch.arange(20) % 10),
    ):
        train(cfg, runs / name, progress=False)
        run = load_run(runs / name)
        arrays[name] = draw_samples(run, scfg, labels=labels, progress=False).numpy()
        ema = (run.checkpoint / "ema.safetensors").read_bytes()
        arrays[f"{name}_ema_sha256"] = np.array(hashlib.sha256(ema).hexdigest())
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {out}")


def compare(a: Path, b: Path) -> None:
    with np.load(a) as fa, np.load(b) as fb:
        result = {k: bool(np.array_equal(fa[k], fb[k])) for k in fa.files}
    print(json.dumps({"bitwise_equal": result}, indent=2))
    path = b.with_name(b.stem + "-compare.json")
    path.write_text(json.dumps({"a": str(a), "b": str(b), "bitwise_equal": result}, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", type=Path)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    p.add_argument("--root", type=Path, default=ROOT)
    args = p.parse_args()
    compare(*args.compare) if args.compare else draw(args.out, args.root)
