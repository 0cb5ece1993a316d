"""Benchmark: CPU float32 training throughput of difflab's DDPM CIFAR-10 U-Net against diffusers'.

One training step is forward + MSE loss + backward + AdamW step on random 32x32 RGB images, t
drawn uniformly from [0, 1) (diffusers' UNet2DModel gets t * 1000). After warm-up steps, the two
nets take turns in rounds (ours, diffusers, ours, ...) so that background load hits both alike;
each figure is the median over rounds. Needs diffusers: pip install -e '.[bench]'.

    python bench/unet_throughput.py [--batch 16] [--rounds 5] [--iters 3] [--warmup 2]
                                    [--threads N] [--out bench/results/unet_throughput.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from difflab.nets.unet import ddpm_cifar10

try:
    import diffusers
except ImportError:
    sys.exit("bench/unet_throughput.py needs diffusers: pip install -e '.[bench]'")

aten = torch.ops.aten
# FlopCounterMode knows the CUDA attention kernels but not the CPU one (it would count attention
# as 0 FLOPs); these use its own formulas. Elementwise ops and norms are never counted. Our
# q, k, v are strided views, so SDPA takes its math path (counted as bmm); diffusers' are
# contiguous and take the CPU flash kernel, whose backward formula includes recomputing the
# scores: that is why its count is ~0.5% higher for the same arithmetic.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(
        q, k, v
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)
    ),
}


@dataclass
class Contender:
    """A net under test and how to call it as net(x (B, 3, 32, 32), t (B,) in [0, 1))."""

    name: str
    net: nn.Module
    forward: Callable[[Tensor, Tensor], Tensor]
    opt: torch.optim.Optimizer = field(init=False)
    rounds: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=2e-4)  # DDPM's learning rate

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def contenders() -> list[Contender]:
    """difflab's ddpm_cifar10() and diffusers' UNet2DModel configured as the same DDPM net.

    Both have 35,746,307 parameters: the layouts match block for block (diffusers' separate
    to_q/to_k/to_v/to_out Linears hold exactly the weights of our 1x1 qkv and proj convs). The
    math differs only in initialisation (ours zero-initialises each block's last layer): with
    our weights copied into it, diffusers' output matched ours to 1.4e-5 (output scale 4.7;
    checked once by hand, 2026-11-22).
    diffusers lists up blocks from the lowest resolution, so its AttnUpBlock2D is third (16x16).
    """
    torch.manual_seed(0)
    ours = ddpm_cifar10()
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, norm_num_groups=32, attention_head_dim=256,  # one head of 256 channels
        flip_sin_to_cos=True, freq_shift=0,  # [cos, sin] of t * 1000 * 10000^(-i / 64), as ours
    )  # fmt: skip
    return [
        Contender("difflab", ours, lambda x, t: ours(x, t)),
        Contender("diffusers", theirs, lambda x, t: theirs(x, t * 1000).sample),
    ]


def train_step(c: Contender, x: Tensor, t: Tensor, eps: Tensor) -> None:
    """forward + MSE + backward + AdamW step (a target of the input's shape stands in for eps)."""
    c.opt.zero_grad(set_to_none=True)
    F.mse_loss(c.forward(x, t), eps).backward()
    c.opt.step()


def warm_up(c: Contender, batch: tuple[Tensor, ...], steps: int) -> None:
    for _ in range(steps):
        train_step(c, *batch)


def step_flops(c: Contender, batch: tuple[Tensor, ...]) -> int:
    """FLOPs of one forward + backward (matmuls, convolutions, attention)."""
    c.opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        F.mse_loss(c.forward(*batch[:2]), batch[2]).backward()
    return counter.get_total_flops()


def _kib(field_name: str) -> int | None:
    """A VmHWM / VmRSS line of /proc/self/status in KiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _kib("VmHWM") is not None


def _ru_maxrss_kib() -> float:
    """The process's lifetime peak RSS in KiB (macOS reports bytes)."""
    kib_per_unit = 1 / 1024 if sys.platform == "darwin" else 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib_per_unit


def peak_rss_growth_mb(fn: Callable[[], None]) -> tuple[float, str]:
    """Run fn; return how far the resident set's peak rose above the RSS before it, in MB.

    glibc's cached free memory is handed back first (malloc_trim), else the second net would
    reuse the first one's freed pages and look smaller. On Linux the peak (VmHWM) is then reset
    (clear_refs 5), so the figure is fn's own peak; elsewhere it falls back to ru_maxrss, the
    process-lifetime peak, and a second net's figure only counts what it used beyond the first's.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if _reset_peak_rss():
        before = _kib("VmRSS") or 0
        fn()
        return ((_kib("VmHWM") or 0) - before) / 1024, "VmHWM after clear_refs"
    before = _ru_maxrss_kib()
    fn()
    return (_ru_maxrss_kib() - before) / 1024, "ru_maxrss (process peak)"


def timed_round(c: Contender, batch: tuple[Tensor, ...], iters: int) -> dict:
    """iters training steps; images/s and ms per step for this round."""
    start = time.perf_counter()
    for _ in range(iters):
        train_step(c, *batch)
    seconds = time.perf_counter() - start
    return {"images_per_s": iters * batch[0].shape[0] / seconds, "step_ms": 1e3 * seconds / iters}


def summarise(c: Contender) -> dict:
    """Medians over rounds, and achieved GFLOP/s at the median step time."""
    ips = statistics.median(r["images_per_s"] for r in c.rounds)
    step_ms = statistics.median(r["step_ms"] for r in c.rounds)
    gflops = c.extra["flops_per_step"] / (step_ms / 1e3) / 1e9
    return {"params": c.params, "images_per_s": ips, "step_ms": step_ms, "gflop_per_s": gflops,
            **c.extra, "rounds": c.rounds}  # fmt: skip


def markdown(results: dict[str, dict], ratio: float) -> str:
    rows = [
        "| net | parameters | images/s (median) | step ms | GFLOP/step | GFLOP/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['params']:,} | {r['images_per_s']:.2f} | {r['step_ms']:.0f} | "
            f"{r['flops_per_step'] / 1e9:.1f} | {r['gflop_per_s']:.1f} | "
            f"{r['peak_rss_growth_mb']:.0f} |"
        )
    return "\n".join([*rows, "", f"ratio difflab / diffusers (images/s): {ratio:.3f}"])


def measure(nets: list[Contender], batch: tuple[Tensor, ...], args: argparse.Namespace) -> None:
    """Warm up each net (measuring memory and FLOPs), then time them in alternating rounds."""
    for c in nets:  # warm-up: allocator, AdamW state, oneDNN kernel choice
        growth, how = peak_rss_growth_mb(lambda c=c: warm_up(c, batch, args.warmup))
        c.extra["peak_rss_growth_mb"], c.extra["rss_method"] = growth, how
        c.extra["flops_per_step"] = step_flops(c, batch)
    for r in range(args.rounds):
        for c in nets:
            c.rounds.append(timed_round(c, batch, args.iters))
            print(f"round {r + 1}/{args.rounds} {c.name}: {c.rounds[-1]['images_per_s']:.2f} img/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3, help="training steps per net per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per net first")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default="bench/results/unet_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()  # 1, 5, 15 min: the machine may be shared

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, 32, 32)
    # x (B, 3, 32, 32), t (B,) in [0, 1), target (B, 3, 32, 32); one batch for every step
    batch = (torch.randn(shape, generator=gen), torch.rand(args.batch, generator=gen),
             torch.randn(shape, generator=gen))  # fmt: skip
    nets = contenders()
    measure(nets, batch, args)

    results = {c.name: summarise(c) for c in nets}
    ratio = results["difflab"]["images_per_s"] / results["diffusers"]["images_per_s"]
    # each round's pair ran back to back, so its ratio sees nearly the same background load
    pairs = zip(nets[0].rounds, nets[1].rounds, strict=True)
    round_ratio = statistics.median(a["images_per_s"] / b["images_per_s"] for a, b in pairs)
    print(markdown(results, ratio))
    print(f"median of per-round ratios: {round_ratio:.3f}; load average {os.getloadavg()}")
    report = {
        "benchmark": "unet_throughput", "device": "cpu", "dtype": "float32",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "machine": platform.machine(), "processor": platform.processor(),
        "threads": torch.get_num_threads(), "batch": args.batch, "rounds": args.rounds,
        "iters": args.iters, "warmup": args.warmup, "ratio_difflab_over_diffusers": ratio,
        "median_round_ratio": round_ratio, "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(), "results": results,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
