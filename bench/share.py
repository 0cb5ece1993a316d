"""Benchmark: sharing a model (issue 16).

1. Speed: export and import of the CIFAR-10 DDPM preset network (35.7M parameters; untrained:
   timing does not depend on the weights), as `difflab export --format diffusers` and
   `difflab import` run them; target under 30 s each. Also the fp16 / bf16 EMA file's size
   against the fp32 EMA weights and the full checkpoint.
2. Quality (--mnist RUN): the run's diffusers export and difflab draw the same class-balanced
   samples (DDIM, 50 trailing steps, guidance 1 = conditional) from the same x_T: diffusers
   through a plain loop over DDIMScheduler and the exported UNet2DModel, difflab through its
   DDIM, and the fp16 EMA file through difflab. The MNIST judge scores each (accuracy: the
   share the judge classifies as the class asked for); target: diffusers within 0.5 points.

    python bench/share.py [--mnist RUN] [--n 1000] [--out bench/results/share.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from difflab import build
from difflab.config import preset
from difflab.files import write_text_atomically
from difflab.model import DataKind
from difflab.share.diffusers_io import export_diffusers, fresh_state, import_diffusers
from difflab.share.half import export_ema
from difflab.training.checkpoint import save_checkpoint

STEPS, SPACING = 50, "trailing"


def untrained_run(root: Path, name: str = "cifar10") -> Path:
    """An untrained CIFAR-10 preset run directory (checkpoint step-0)."""
    cfg = preset(name)
    kind = DataKind((3, 32, 32), 0)
    model = build.build_model(cfg, kind, torch.device("cpu"))
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg.save(run_dir / "config.json")
    ckpt = save_checkpoint(
        run_dir / "checkpoints",
        0,
        model.net,
        model.net,
        fresh_state(cfg, model),
        cfg.to_dict(),
        kind.info(),
        keep=1,
    )
    params = sum(p.numel() for p in model.net.parameters())
    return run_dir, ckpt, params


def speed(root: Path) -> dict:
    run_dir, ckpt, params = untrained_run(root)
    start = time.perf_counter()
    out = export_diffusers(run_dir, root / "export")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    import_diffusers(out, "imported", root / "runs")
    import_s = time.perf_counter() - start
    sizes = {
        "ema_fp32_bytes": (ckpt / "ema.safetensors").stat().st_size,
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
    }
    for dtype in ("fp16", "bf16"):
        sizes[f"ema_{dtype}_bytes"] = (
            export_ema(run_dir, root / f"{dtype}.safetensors", dtype).stat().st_size
        )
        sizes[f"{dtype}_over_fp32_ema"] = sizes[f"ema_{dtype}_bytes"] / sizes["ema_fp32_bytes"]
        sizes[f"{dtype}_over_checkpoint"] = sizes[f"ema_{dtype}_bytes"] / sizes["checkpoint_bytes"]
    return {"params": params, "export_s": export_s, "import_s": import_s, **sizes}


def difflab_samples(source, x_T, labels, batch: int = 250) -> torch.Tensor:
    from difflab.diffusion.guidance import guided
    from difflab.runs import load_run
    from difflab.samplers import sample_ddim, timesteps

    run = load_run(source, device="cpu")
    den = guided(run.model.denoiser, 1.0, run.model.conditioner)
    ts = timesteps(run.model.schedule, STEPS, SPACING)
    return torch.cat(
        [
            sample_ddim(den, x_T[i : i + batch], ts, y=labels[i : i + batch])
            for i in range(0, len(x_T), batch)
        ]
    )


@torch.no_grad()
def diffusers_samples(folder: Path, x_T, labels, batch: int = 250) -> torch.Tensor:
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    out = []
    for i in range(0, len(x_T), batch):
        x, y = x_T[i : i + batch].clone(), labels[i : i + batch]
        scheduler.set_timesteps(STEPS)
        for timestep in scheduler.timesteps:
            eps = unet(x, timestep, class_labels=y).sample
            x = scheduler.step(eps, timestep, x, use_clipped_model_output=True).prev_sample
        out.append(x)
    return torch.cat(out)


def quality(run_dir: Path, root: Path, n: int) -> dict:
    from difflab.evaluation.sampled import extractors_for
    from difflab.runs import load_run

    run = load_run(run_dir, device="cpu")
    folder = export_diffusers(run_dir, root / "mnist-export")
    half = export_ema(run_dir, root / "mnist-fp16.safetensors", "fp16")
    labels = run.model.conditioner.balanced(n)
    x_T = torch.randn(n, *run.shape, generator=torch.Generator().manual_seed(0))
    judge = extractors_for(["accuracy"], dataset="mnist")["judge"]
    result = {
        "run": str(run_dir),
        "step": run.step,
        "n": n,
        "sampler": "ddim",
        "steps": STEPS,
        "spacing": SPACING,
        "guidance": 1.0,
    }
    samples = {}
    draws = {
        "difflab": lambda: difflab_samples(run_dir, x_T, labels),
        "diffusers": lambda: diffusers_samples(folder, x_T, labels),
        "difflab_fp16_file": lambda: difflab_samples(half, x_T, labels),
    }
    for name, draw in draws.items():
        start = time.perf_counter()
        samples[name] = draw().clamp(-1, 1)
        hits = (judge.predict(samples[name]) == labels).double().mean()
        result[f"{name}_accuracy"] = float(hits)
        result[f"{name}_seconds"] = time.perf_counter() - start
        print(f"{name}: judge accuracy {float(hits):.4f}", file=sys.stderr)
    for name in ("diffusers", "difflab_fp16_file"):
        result[f"{name}_max_abs_diff"] = float((samples[name] - samples["difflab"]).abs().max())
        gap = 100 * abs(result[f"{name}_accuracy"] - result["difflab_accuracy"])
        result[f"{name}_accuracy_gap_points"] = gap
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", help="a trained mnist-preset run directory")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default="bench/results/share.json")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            result["speed"] = speed(Path(tmp))
            print(json.dumps(result["speed"], indent=2))
        if args.mnist:
            result["mnist"] = quality(Path(args.mnist), Path(tmp), args.n)
            print(json.dumps(result["mnist"], indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
