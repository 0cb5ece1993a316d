"""Where and how a model runs: the device, precision, memory layout, optimizer kernel and
compilation choices that training, sampling and the benchmark share. Each falls back with a
warning (or refuses with a ConfigError naming the fix) rather than silently doing otherwise."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import warnings

import torch
from torch import nn

from difflab.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={name} but no CUDA GPU is visible; use train.device=cpu or auto"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory allocated since the last reset; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit: 4 MiB * sizeof(long)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the most free heap it can be told to keep
_KEPT: str | None = None  # what keep_freed_memory did, once per process


def keep_freed_memory() -> str:
    """Make glibc keep the memory a training step frees for the next step, instead of handing
    it back to the kernel and faulting it in again, zeroed, page by page (issue 18).

    A CPU training step allocates and frees its activations: 0.4-0.7 GB a step for the
    cifar10-ddpm U-Net at batch 16. By default glibc serves blocks above its (adaptive) mmap
    threshold with mmap and trims the heap's free top back to the kernel, so every step took
    ~110,000 (bf16) to ~180,000 (fp32) minor page faults, which cost bf16 about 17% of its step
    and fp32 about 4% (bench/RESULTS.md). Here blocks up to glibc's 32 MiB ceiling come from
    the heap and up to 2 GiB of free top is kept; the process's peak memory is unchanged, its
    resident memory stays near that peak. Same effect as MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ in the environment, which a user's own values override:
    DIFFLAB_KEEP_FREED_MEMORY=0 turns it off. Returns what was done (also where nothing was:
    off Linux/glibc).
    """
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    if os.environ.get("DIFFLAB_KEEP_FREED_MEMORY", "1") == "0":
        _KEPT = "off (DIFFLAB_KEEP_FREED_MEMORY=0)"
    elif "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        _KEPT = "left to the MALLOC_*_THRESHOLD_ environment variables"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is None:
            _KEPT = "not available (no glibc mallopt)"
        elif mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(
            M_TRIM_THRESHOLD, TRIM_THRESHOLD
        ):
            _KEPT = "on: blocks up to 32 MiB from the heap, up to 2 GiB of free heap kept"
        else:
            _KEPT = "not available (mallopt refused)"
    return _KEPT


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": None}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it torch emulates
    bf16, correctly but slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def native_bf16(device: torch.device) -> str | None:
    """Why `device` runs bf16 faster than fp32 (its bf16 units), or None where it has none."""
    if device.type == "cuda":
        return "this GPU has bf16 tensor cores" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_bf16():
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return f"this CPU has {'AMX' if amx else 'AVX512-BF16'} bf16 units"
    return None


def resolve_precision(name: str, device: torch.device, key: str, say=None) -> torch.dtype | None:
    """The autocast dtype for a precision setting (`key` names it in messages), falling back
    with a warning where the device cannot do it: never silently in another precision.

    "auto" is bf16 where the device has bf16 units (CUDA with bf16, a CPU with AVX512-BF16 or
    AMX: 2-3x the fp32 step for our U-Nets on such a CPU, issue 18) and fp32 elsewhere; the
    choice and its reason go to `say` (one line), if given. It is decided from the hardware,
    never from a timing, so a run resumes in the precision it started in on the same machine.
    """
    if name not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        reason = native_bf16(device)
        dtype = torch.bfloat16 if reason else None
        if say is not None:
            why = reason or f"no bf16 units on this {device.type.upper()}"
            say(f"{key}=auto: {'bf16' if dtype else 'fp32'} ({why})")
        return dtype
    dtype = PRECISIONS[name]
    if dtype is torch.float16 and device.type != "cuda":
        warnings.warn(f"{key}=fp16 needs a CUDA GPU; running in fp32 instead", stacklevel=2)
        return None
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn(f"{key}=bf16: this GPU has no bf16; using fp16 instead", stacklevel=2)
        return torch.float16
    if dtype is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(
            f"{key}=bf16: this CPU has no bf16 units (AVX512-BF16 or AMX), where bf16 is "
            "emulated and slower than fp32; running in fp32 instead",
            stacklevel=2,
        )
        return None
    return dtype


def memory_format(setting: str, data_shape: tuple[int, ...]) -> torch.memory_format:
    """channels_last for image nets unless turned off: NHWC convolutions are faster on GPUs
    (tensor cores) and, for our U-Nets, on CPUs too (oneDNN; 15-30% per training step here)."""
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"train.channels_last must be auto, on or off, got {setting!r}")
    images = len(data_shape) == 3
    if setting == "on" and not images:
        raise ConfigError("train.channels_last=on needs image data (C, H, W); use auto or off")
    return torch.channels_last if images and setting != "off" else torch.contiguous_format


def adamw(net: nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for the device (CUDA, CPU):
    4-6x less optimizer time than the multi-tensor version on this CPU."""
    params = list(net.parameters())
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def place_data(data, device: torch.device):
    """Keep an in-memory image set on the training device (MNIST is 60 MB, CIFAR-10 150 MB), so
    a batch is one gather there and the loader is never the bottleneck."""
    if device.type != "cpu" and hasattr(data, "to_device"):
        data.to_device(device)
    return data


class _CompiledOrEager(nn.Module):
    """torch.compile'd `net`, falling back (with a warning) to the eager net if compiling fails
    at the first call, which is when torch.compile compiles."""

    def __init__(self, net: nn.Module, key: str):
        super().__init__()
        self.net, self.key = net, key
        self.compiled = torch.compile(net)
        self.state = "untried"  # -> "compiled" or "eager" after the first call

    def forward(self, *args, **kwargs):
        if self.state == "compiled":
            return self.compiled(*args, **kwargs)
        if self.state == "untried":
            try:
                out = self.compiled(*args, **kwargs)
                self.state = "compiled"
                return out
            except Exception as e:  # no C compiler, unsupported op...: eager is still right
                self.state = "eager"
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                warnings.warn(f"{self.key}=true failed ({first}); running uncompiled", stacklevel=2)
        return self.net(*args, **kwargs)  # a genuine error in the net raises here, as eager


def maybe_compile(net: nn.Module, enabled: bool, key: str) -> nn.Module:
    """`net` compiled with torch.compile when `enabled` and supported here, else `net`."""
    if not enabled:
        return net
    if not torch._dynamo.is_dynamo_supported():
        message = f"{key}=true: torch.compile is not supported here; running uncompiled"
        warnings.warn(message, stacklevel=2)
        return net
    return _CompiledOrEager(net, key)
