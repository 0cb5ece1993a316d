"""Benchmark: what each sampler adds to the network's own cost, on the `mnist` preset's U-Net.

For every sampler at 10 steps, time one full sampling call on a batch and divide by the model
evaluations it made (counted); compare with the time of one bare network forward on the same
batch, measured in the same rounds (rounds alternate, so background load hits both alike). The
overhead is (sampler time per evaluation) / (forward time) - 1. Weights are the preset's
initialisation: timing does not depend on training.

Target (issue 5): at 10 steps, time per sample within 5% of forward time x NFE.

    python bench/sampler_overhead.py [--batch 100] [--rounds 5] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from difflab import build
from difflab.config import preset
from difflab.files import write_text_atomically

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm_2s", "dpmpp_2m", "dpmpp_3m", "unipc", "pc")


class Counted:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        return self.net(x, t, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/sampler_overhead.json")
    args = ap.parse_args()

    cfg = preset("mnist")
    torch.manual_seed(0)
    net = build.build_net(cfg.model, (1, 32, 32), 10).eval()
    schedule = build.build_schedule(cfg.diffusion)
    counted = Counted(net)
    den = build.build_denoiser(cfg, counted, schedule)
    x = torch.randn(args.batch, 1, 32, 32)
    y = torch.arange(args.batch) % 10
    t = torch.full((args.batch,), 0.5)

    def forward() -> float:
        """Seconds per call over args.steps back-to-back forwards (as a sampler makes them)."""
        t0 = time.perf_counter()
        for _ in range(args.steps):
            net(x, t, y)
        return (time.perf_counter() - t0) / args.steps

    runs = {}
    for name in SAMPLERS:
        sampler_cfg = type(cfg.sample)(sampler=name, steps=args.steps, spacing="logsnr")
        fn, options, ts = build.build_sampler(sampler_cfg, schedule)
        runs[name] = (fn, options, ts)

    per_round: dict[str, list[float]] = {name: [] for name in ("forward", *SAMPLERS)}
    nfe: dict[str, int] = {}
    with torch.inference_mode():
        forward()  # warm-up
        for _ in range(args.rounds):
            per_round["forward"].append(forward())
            for name, (fn, options, ts) in runs.items():
                counted.calls = 0
                t0 = time.perf_counter()
                fn(den, x, ts, y=y, generator=0, **options)
                per_round[name].append((time.perf_counter() - t0) / counted.calls)
                nfe[name] = counted.calls
    fwd = statistics.median(per_round["forward"])
    rows = []
    print(
        f"network forward, batch {args.batch}: {fwd * 1e3:.1f} ms ({fwd / args.batch * 1e3:.2f} "
        f"ms/sample); {args.steps} steps, logsnr grid"
    )
    print("| sampler | NFE | ms per sample | forward x NFE | overhead |")
    print("|---|---|---|---|---|")
    for name in SAMPLERS:
        per_eval = statistics.median(per_round[name])
        row = {
            "sampler": name,
            "nfe": nfe[name],
            "ms_per_sample": per_eval * nfe[name] / args.batch * 1e3,
            "forward_ms_per_sample_x_nfe": fwd * nfe[name] / args.batch * 1e3,
            "overhead": per_eval / fwd - 1,
        }
        rows.append(row)
        print(
            f"| {name} | {row['nfe']} | {row['ms_per_sample']:.2f} | "
            f"{row['forward_ms_per_sample_x_nfe']:.2f} | {row['overhead']:+.1%} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "sampler_overhead",
        "batch": args.batch,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "forward_s": fwd,
        "rows": rows,
        "per_round": per_round,
        "torch": torch.__version__,
    }
    write_text_atomically(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
