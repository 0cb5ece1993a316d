"""The single-device speed options change speed and memory, never results: channels_last, fused
AdamW, activation checkpointing, threaded file decoding, sampling autocast, and the torch.compile
fallback."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab import devices
from difflab.config import ConfigError, apply_overrides, preset
from difflab.data.folders import image_folder
from difflab.data.stream import ImageStream
from difflab.nets.unet import UNet
from difflab.training.parts import build_parts
from difflab.training.step import IntervalStats, train_step

SMALL_UNET = dict(
    in_channels=1,
    base_channels=16,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=2,
    norm_groups=8,
    num_classes=3,
)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while running fn()."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_activation_checkpointing_keeps_results_and_saves_memory():
    torch.manual_seed(0)
    plain = UNet(**SMALL_UNET)
    ckpt = UNet(**SMALL_UNET, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.tensor([0, 1, 2, 3])
    grads = []
    sizes = []
    for net in (plain, ckpt):
        size, out = _saved_bytes(lambda net=net: net(x, t, y))
        out.square().mean().backward()
        sizes.append(size)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert sizes[1] < sizes[0] / 2, sizes  # activations are recomputed, not stored
    with torch.no_grad():  # evaluation does not checkpoint (nothing to save)
        torch.testing.assert_close(plain.eval()(x, t, y), ckpt.eval()(x, t, y))


def _image_cfg(tmp_path, *extra):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    g = np.random.default_rng(0)
    for k in range(12):
        Image.fromarray(g.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{k}.png")
    sets = [
        "data.name=imagefolder",
        f"data.root={folder}",
        "data.image_size=16",
        "data.channels=1",
        "model.unet.base_channels=16",
        "model.unet.channel_mults=1,2",
        "model.unet.num_res_blocks=1",
        "model.unet.attention_levels=1",
        "model.unet.norm_groups=8",
        "model.unet.dropout=0.0",
        "train.batch_size=4",
        "train.threads=1",
        *extra,
    ]
    return apply_overrides(preset("imagefolder"), sets)


def _weights_after(cfg, steps=3):
    parts = build_parts(cfg)
    stats = IntervalStats(parts.device)
    for step in range(steps):
        train_step(cfg, parts, stats, step)
    return torch.cat([p.detach().flatten() for p in parts.net.parameters()]), parts


def test_channels_last_and_fused_adamw_train_to_the_same_weights(tmp_path):
    on, parts = _weights_after(_image_cfg(tmp_path, "train.channels_last=on"))
    assert parts.model.memory_format is torch.channels_last
    assert parts.optimizer.defaults["fused"] is True  # the fused kernel exists on this CPU
    off, parts = _weights_after(_image_cfg(tmp_path, "train.channels_last=off"))
    assert parts.model.memory_format is torch.contiguous_format
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5)


def test_fused_adamw_matches_the_reference_optimizer():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused = devices.adamw(a, 1e-2, (0.9, 0.99), 0.01)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    for _ in range(5):
        for net, opt in ((a, fused), (b, plain)):
            net(torch.ones(2, 8)).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_channels_last_setting_is_checked():
    with pytest.raises(ConfigError, match="needs image data"):
        devices.memory_format("on", (2,))
    with pytest.raises(ConfigError, match="auto, on or off"):
        devices.memory_format("yes", (1, 8, 8))
    assert devices.memory_format("auto", (2,)) is torch.contiguous_format


def test_threaded_decoding_gives_the_same_batches(tmp_path):
    cfg = _image_cfg(tmp_path)
    folder = image_folder(cfg.data.root, 16, 1)
    one, many = ImageStream(folder, 0, True, workers=1), ImageStream(folder, 0, True, workers=4)
    for n in (5, 7, 9):  # crosses epoch ends
        (x1, _), (x2, _) = one.next_batch(n), many.next_batch(n)
        assert torch.equal(x1, x2)
    assert one.state_dict()["position"] == many.state_dict()["position"]


def test_compile_falls_back_with_a_warning_and_the_same_result(monkeypatch):
    net = torch.nn.Linear(3, 2)

    def broken(module):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    wrapped = devices.maybe_compile(net, True, "train.compile")
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match=r"train.compile=true failed \(no C\+\+ compiler found\)"):
        out = wrapped(x)
    torch.testing.assert_close(out, net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then quietly eager
        torch.testing.assert_close(wrapped(x), net(x))
    with pytest.raises(RuntimeError, match="mat1 and mat2"):  # a real error is not swallowed
        wrapped(torch.randn(4, 5))
    assert devices.maybe_compile(net, False, "train.compile") is net


def test_sampling_precision_falls_back_or_stays_close():
    from difflab.diffusion.prediction import Denoiser
    from difflab.diffusion.schedules import linear
    from difflab.samplers import generate, sample_ddim, timesteps

    torch.manual_seed(0)
    net = UNet(**{**SMALL_UNET, "num_classes": 0}).eval()
    torch.nn.init.normal_(net.out[-1].weight, std=0.02)  # a net that does something
    den = Denoiser(net, linear(), "eps")
    ts = timesteps(den.schedule, 5, "trailing")
    full = generate(sample_ddim, den, 4, (1, 16, 16), ts, seed=0)
    with pytest.warns(UserWarning, match="fp16 needs a CUDA GPU"):
        dtype = devices.resolve_precision("fp16", torch.device("cpu"), "sample.precision")
    assert dtype is None  # never silently another precision
    bf16 = generate(sample_ddim, den, 4, (1, 16, 16), ts, seed=0, autocast=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    relative = (bf16 - full).abs().max() / full.abs().max()
    assert relative < 0.01 and not torch.equal(bf16, full)  # bf16 ran, and stayed close
    with pytest.raises(ConfigError, match=r"sample\.precision must be one of"):
        devices.resolve_precision("fp8", torch.device("cpu"), "sample.precision")


CHURN = """
import resource, sys, torch
from difflab import devices
if sys.argv[1] == "keep":
    print(devices.keep_freed_memory(), file=sys.stderr)
else:  # glibc's documented starting thresholds, fixed: every block is mmapped, unmapped when freed
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
def step():  # a training step's pattern: activations of a few MiB each, all freed at the end
    kept = [torch.ones(1 << 20) for _ in range(48)]  # 48 x 4 MiB
    del kept
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not devices.keep_freed_memory().startswith("on"), reason="needs glibc's mallopt (Linux)"
)
def test_keeping_freed_memory_stops_the_per_step_page_faults():
    """Five repeats of an allocate-and-free-192-MiB step: with glibc's fixed starting thresholds
    each repeat faults its pages in again (mmapped blocks, unmapped on free); with
    keep_freed_memory they are reused, as a training step's activations are (issue 18).

    The control pins the thresholds rather than leaving glibc's dynamic ones: those move with the
    heap's layout, and a CI run once saw them trim only one step in five."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("DIFFLAB_KEEP_FREED_MEMORY", None)

    def faults(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, env=env, check=True
        )
        return int(run.stdout.split()[-1])

    pages = 5 * 48 * 4 * 2**20 // 4096  # what five steps touch
    thp_setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp_setting.read_text() if thp_setting.exists() else ""
    per_fault = 512 if "[always]" in thp else 1  # 2 MiB huge pages fault in 512 pages at once
    assert faults("fixed") > pages // 2 // per_fault  # the control: unmapped blocks fault again
    assert faults("keep") < pages // 100


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(devices, "_KEPT", None)
    monkeypatch.setenv("DIFFLAB_KEEP_FREED_MEMORY", "0")
    assert devices.keep_freed_memory().startswith("off")
    assert devices.keep_freed_memory().startswith("off")  # decided once per process
