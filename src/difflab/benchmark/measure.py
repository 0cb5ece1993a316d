"""The measuring instruments: timers, FLOP counts, peak memory, and the device's matmul peak.

Every figure says how it was taken: FLOPs come from torch's FlopCounterMode (matmuls,
convolutions, attention; element-wise ops and norms count 0), memory names its method, and the
device peak is measured in the same run, with a spec-sheet figure beside it only for devices
listed here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
# FlopCounterMode knows the CUDA attention kernels but not the CPU one (it would count attention
# as 0 FLOPs); these use its own formulas. (The CPU flash kernel's backward formula includes
# recomputing the scores, so contiguous q, k, v count ~0.5% more than strided views that take
# the math path: diffusers' attention against ours on a CPU.)
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(
        q, k, v
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)
    ),
}

# Dense (no sparsity) peaks from NVIDIA's data sheets, FLOP/s; float32 is the CUDA-core rate
# (TF32 tensor cores are 7.4x that). First matching name wins.
SPEC_SHEET = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51.2e12}),
    ("H100 NVL", {"bfloat16": 835e12, "float32": 60e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),  # SXM5
    ("H200 NVL", {"bfloat16": 835e12, "float32": 60e12}),
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),  # SXM5
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds fn takes, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def spread(seconds: list[float]) -> dict:
    """Mean, standard deviation, median, min and max of a list of timings (seconds)."""
    return {
        "mean_s": statistics.fmean(seconds),
        "std_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "n": len(seconds),
        "seconds": seconds,
    }


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs fn executes in matmuls, convolutions and attention (forward and backward alike)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
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
    """Reset Linux's peak-RSS mark (VmHWM) to the current RSS; False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _kib("VmHWM") is not None


def _ru_maxrss_kib() -> float:
    """The process's lifetime peak RSS in KiB (macOS reports bytes)."""
    kib_per_unit = 1 / 1024 if sys.platform == "darwin" else 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib_per_unit


def peak_memory_growth(fn: Callable[[], object], device: torch.device) -> tuple[object, float, str]:
    """Run fn; return its result, how far peak memory rose above what was held before (MB), and
    how that was measured.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory
    allocated before fn. CPU: glibc's cached free memory is handed back first (malloc_trim),
    else a second network would reuse the first one's freed pages and look smaller; then on
    Linux the peak RSS (VmHWM) is reset (clear_refs 5) and the figure is VmHWM - RSS before.
    Elsewhere it falls back to ru_maxrss, the process-lifetime peak, which only counts what fn
    used beyond any earlier peak.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        grown = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return result, grown, "torch.cuda.max_memory_allocated - allocated before (MB)"
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if _reset_peak_rss():
        before = _kib("VmRSS") or 0
        result = fn()
        return result, ((_kib("VmHWM") or 0) - before) / 1024, "peak RSS growth (VmHWM, MiB)"
    before = _ru_maxrss_kib()
    result = fn()
    return result, (_ru_maxrss_kib() - before) / 1024, "ru_maxrss growth (process peak, MiB)"


class MatmulPeak:
    """The device's achievable FLOP/s: the best timing of repeated n x n matmuls (2 n^3 FLOPs
    each) in the dtype, thread count and precision settings the benchmark runs with.

    Each trial repeats the product for about 0.2 s. Trials can be spread through a run (one
    between training steps), so that on a shared machine the best trial catches a quiet moment,
    as the best of the network's own steps may.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        gen = torch.Generator(device).manual_seed(0)
        self.a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        self.b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        self.device, self.dtype, self.n = device, dtype, n
        one = timed(lambda: self.a @ self.b, device)  # also the warm-up
        self.repeats = max(1, min(1000, int(0.2 / max(one, 1e-9))))
        self.seconds: list[float] = []  # per matmul, one entry per trial

    def trial(self) -> None:
        def repeat() -> None:
            for _ in range(self.repeats):
                self.a @ self.b

        self.seconds.append(timed(repeat, self.device) / self.repeats)

    def result(self) -> dict:
        kind = str(self.dtype).removeprefix("torch.")
        best, n = min(self.seconds), self.n
        return {
            "flop_per_s": 2 * n**3 / best,
            "median_flop_per_s": 2 * n**3 / statistics.median(self.seconds),
            "method": f"measured matmul peak: {n}x{n} @ {n}x{n} {kind}, best of "
            f"{len(self.seconds)} trials of {self.repeats}",
            "n": n,
            "dtype": kind,
        }


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, trials: int = 3) -> dict:
    """MatmulPeak's result after `trials` back-to-back trials."""
    peak = MatmulPeak(device, dtype, n)
    for _ in range(trials):
        peak.trial()
    return peak.result()


def spec_sheet_peak(device: torch.device, dtype: torch.dtype) -> dict | None:
    """The data-sheet dense peak for a listed GPU, or None (CPUs and unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in SPEC_SHEET:
        if key in name:
            kind = str(dtype).removeprefix("torch.")
            return {"flop_per_s": peaks[kind], "method": f"spec sheet: {key} dense {kind}"}
    return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What the figures were measured on."""
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["tf32"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    return env
