"""What `difflab bench` measures: the named configurations, the options, and their checks.

`resolve` turns user options into a `Setup`: every number checked (ConfigError, one line), the
device, precision, channels_last and batch sizes decided, and every fallback said out loud
(a warning, also kept in `Setup.notes` so the JSON records it).
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

from difflab.build import check_image_size
from difflab.config import ConfigError, RunConfig, preset
from difflab.devices import native_bf16
from difflab.samplers import SAMPLERS

# name -> (preset, shape of one example, classes the network is conditioned on)
CONFIGS = {
    "toy2d": ("toy2d", (2,), 0),  # the checkerboard MLP
    "mnist": ("mnist", (1, 32, 32), 10),  # class-conditional small U-Net
    "mnist-dit": ("mnist-dit", (1, 32, 32), 10),  # its DiT; diffusers' DiTTransformer2DModel
    "cifar10-ddpm": ("cifar10", (3, 32, 32), 0),  # DDPM's 35.7M CIFAR-10 U-Net
    "celeba64": ("celeba64", (3, 64, 64), 0),
}
PRECISIONS = ("fp32", "bf16")
CPU_IMAGE_BATCH = 16  # default batch for U-Nets on a CPU: the presets' 64-128 take minutes a step


@dataclass
class BenchOptions:
    """`difflab bench` options; 0 means "the default" where a field says so."""

    name: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast, both libraries)
    compile: bool = False  # torch.compile both networks (falls back to eager on failure)
    channels_last: bool | None = None  # None = on for U-Nets, as the trainer does
    batch_size: int = 0  # 0 = the preset's on CUDA; 16 for images on a CPU
    steps: int = 10  # timed training steps per library
    warmup: int = 3  # untimed training steps per library first
    samplers: tuple[str, ...] = ("ddim", "dpmpp_2m", "heun")
    nfe: tuple[int, ...] = (10, 50)  # model-evaluation budgets (samplers.steps_for_nfe)
    sample_batch: int = 0  # images per sampling call; 0 = batch_size
    sample_rounds: int = 1  # timed sampling calls per (sampler, NFE, library)
    diffusers: bool = True  # also measure diffusers' UNet2DModel
    matmul_size: int = 0  # n of the n x n matmul peak; 0 = 2048 (CPU) or 8192 (CUDA)
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    seed: int = 0


@dataclass
class Setup:
    """Options resolved against the machine; what the run actually does."""

    opts: BenchOptions
    cfg: RunConfig
    shape: tuple[int, ...]  # one example, e.g. (3, 32, 32)
    classes: int
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = float32 without autocast
    channels_last: bool
    batch_size: int
    sample_batch: int
    matmul_size: int
    notes: list[str] = field(default_factory=list)  # warnings given and caveats, for the JSON

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"

    def autocast(self):
        return torch.autocast(
            self.device.type, self.dtype or torch.float32, enabled=self.dtype is not None
        )

    def warn(self, message: str) -> None:
        self.notes.append(message)
        warnings.warn(message, stacklevel=3)


def _check_numbers(o: BenchOptions) -> None:
    for key, low in (
        ("batch_size", 0),
        ("steps", 1),
        ("warmup", 0),
        ("sample_batch", 0),
        ("sample_rounds", 1),
        ("matmul_size", 0),
        ("threads", 0),
    ):
        value = getattr(o, key)
        if not isinstance(value, int) or value < low:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")
    if not o.nfe or any(not isinstance(n, int) or n < 1 for n in o.nfe):
        raise ConfigError(f"--nfe needs model-evaluation budgets >= 1, got {list(o.nfe)}")
    unknown = [s for s in o.samplers if s not in SAMPLERS]
    if unknown or not o.samplers:
        raise ConfigError(
            f"--samplers: unknown sampler(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SAMPLERS)}"
        )
    if o.precision not in PRECISIONS:
        raise ConfigError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {o.precision!r}"
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def _dtype(setup_notes: list[str], precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (devices.native_bf16); otherwise a warning and
    float32."""
    if precision == "fp32":
        return None
    if native_bf16(device):
        return torch.bfloat16
    what = "this GPU" if device.type == "cuda" else "this CPU (no AVX512-BF16 or AMX)"
    setup_notes.append(f"--precision bf16: {what} has no native bf16; measuring fp32 instead")
    return None


def resolve(o: BenchOptions) -> Setup:
    """Check the options and decide what the run does on this machine."""
    if o.name not in CONFIGS:
        raise ConfigError(
            f"unknown benchmark configuration {o.name!r}; choose one of {', '.join(CONFIGS)}"
        )
    _check_numbers(o)
    preset_name, shape, classes = CONFIGS[o.name]
    cfg = preset(preset_name)
    check_image_size(cfg, shape)
    device = _device(o.device)
    notes: list[str] = []
    dtype = _dtype(notes, o.precision, device)
    image = len(shape) == 3
    unet = image and cfg.model.name == "unet"  # a DiT's patches gain nothing from it
    channels_last = unet if o.channels_last is None else o.channels_last  # the trainer's auto
    if channels_last and not image:
        notes.append("--channels-last applies to images only; the toy2d MLP ignores it")
        channels_last = False
    batch = o.batch_size or (
        CPU_IMAGE_BATCH if image and device.type == "cpu" else cfg.train.batch_size
    )
    setup = Setup(
        o,
        cfg,
        shape,
        classes,
        device,
        dtype,
        channels_last,
        batch,
        o.sample_batch or batch,
        o.matmul_size or (8192 if device.type == "cuda" else 2048),
    )
    for message in notes:
        setup.warn(message)
    if device.type == "cuda" and dtype is None and torch.backends.cudnn.allow_tf32:
        setup.notes.append(  # information, not a fallback: no warning
            "fp32 on CUDA: cuDNN convolutions may use TF32 tensor cores (torch's default), the "
            "matmul peak does not; shares of the fp32 peak can therefore pass 100%"
        )
    return setup


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _names(text))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `difflab bench` flags (shared with bench/bench.py)."""
    p.add_argument("name", help=f"configuration: {', '.join(CONFIGS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.add_argument(
        "--precision",
        default="auto",
        help="fp32, bf16 (autocast, both libraries) or fp32,bf16 side by side; auto (default): "
        "fp32,bf16 where the device has bf16 units, else fp32",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format for both U-Nets (default: on, as difflab trains)",
    )
    p.add_argument("--batch-size", type=int, default=0, help="training batch (default: see docs)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per library")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps per library")
    p.add_argument("--samplers", default="ddim,dpmpp_2m,heun", help="comma-separated samplers")
    p.add_argument("--nfe", default="10,50", help="comma-separated model-evaluation budgets")
    p.add_argument("--sample-batch", type=int, default=0, help="images per sampling call")
    p.add_argument("--sample-rounds", type=int, default=1, help="timed calls per sampler")
    p.add_argument("--no-diffusers", action="store_true", help="measure difflab only")
    p.add_argument("--matmul-size", type=int, default=0, help="n of the matmul peak (n x n)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="folder for the JSON and Markdown")


def precisions_of(text: str, device_name: str) -> tuple[str, ...]:
    """The precisions `--precision` asks for, in order: "auto" is fp32 and bf16 where the
    device has bf16 units (native_bf16), else fp32 alone."""
    if text == "auto":
        return ("fp32", "bf16") if native_bf16(_device(device_name)) else ("fp32",)
    asked = _names(text)
    bad = [p for p in asked if p not in PRECISIONS]
    if bad or not asked or len(set(asked)) != len(asked):
        raise ConfigError(
            f"--precision takes auto or distinct names from {', '.join(PRECISIONS)} "
            f"(e.g. fp32,bf16), got {text!r}"
        )
    return asked


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The options of one run; its precision is the first of --precision's (precisions_of)."""
    fields = {f.name for f in dataclasses.fields(BenchOptions)}
    fields -= {"samplers", "nfe", "diffusers", "precision"}
    return BenchOptions(
        precision=precisions_of(args.precision, args.device)[0],
        samplers=_names(args.samplers),
        nfe=_ints(args.nfe, "--nfe"),
        diffusers=not args.no_diffusers,
        **{k: getattr(args, k) for k in fields},
    )
