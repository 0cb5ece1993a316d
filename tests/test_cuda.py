"""What only a GPU can show: training and sampling on CUDA agree with the CPU, bf16 autocast and
torch.compile train, data live on the device, and peak memory is measured.

Marked `cuda`; `bench/gpu_check.sh` runs them with `pytest -m cuda` when a GPU is lent. Without
one they skip (CI never has a GPU), so nothing here may be needed for a CPU-only machine.
"""

import pytest
import torch

from difflab.build import build_model
from difflab.data.stream import ImageStream
from difflab.devices import peak_memory_mb, place_data
from difflab.training.parts import build_parts
from difflab.training.step import IntervalStats, train_step
from test_speed import _image_cfg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _cfg(tmp_path, device: str, *extra):
    """test_speed's tiny image run, on `device`."""
    return _image_cfg(tmp_path, f"train.device={device}", "train.batch_size=8", *extra)


def _train(cfg, steps=3):
    parts = build_parts(cfg)
    stats = IntervalStats(parts.device)
    for step in range(steps):
        train_step(cfg, parts, stats, step)
    weights = torch.cat([p.detach().float().flatten().cpu() for p in parts.net.parameters()])
    return weights, parts, stats


def test_cuda_training_matches_the_cpu(tmp_path):
    """Same seed, same batches: the weights after 3 steps agree to float32 rounding (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cpu, _, _ = _train(_cfg(tmp_path, "cpu"))
    gpu, parts, _ = _train(_cfg(tmp_path, "cuda"))
    assert parts.device.type == "cuda"
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_bf16_and_compiled_training_stay_close_to_fp32(tmp_path):
    fp32, _, _ = _train(_cfg(tmp_path, "cuda"))
    bf16, _, _ = _train(_cfg(tmp_path, "cuda", "train.precision=bf16"))
    compiled, _, _ = _train(_cfg(tmp_path, "cuda", "train.compile=true"))
    start, _, _ = _train(_cfg(tmp_path, "cuda"), steps=0)
    moved = (fp32 - start).norm()
    assert (bf16 - fp32).norm() < 0.1 * moved  # bf16 moves the weights as fp32 does
    assert (compiled - fp32).norm() < 0.01 * moved


def test_in_memory_data_stay_on_the_device_and_peak_memory_is_measured(tmp_path):
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(32) % 4
    stream = ImageStream((images, labels), seed=0, flip=False)
    place_data(stream, torch.device("cuda"))
    x, y = stream.next_batch(8)
    assert x.device.type == "cuda" and y.device.type == "cuda"  # a gather there, no host copy
    torch.cuda.reset_peak_memory_stats()
    _train(_cfg(tmp_path, "cuda"))
    assert peak_memory_mb(torch.device("cuda")) > 0


def test_cuda_sampling_matches_the_cpu(tmp_path):
    cfg = _cfg(tmp_path, "cpu")
    parts = build_parts(cfg)
    state = parts.net.state_dict()
    draws = {}
    for device in ("cpu", "cuda"):
        model = build_model(cfg, parts.model.kind.data, device)
        model.net.load_state_dict(state)
        scfg = cfg.sample.__class__(**{**vars(cfg.sample), "n": 8, "sampler": "ddim", "steps": 10})
        draws[device] = model.sample(scfg).cpu()
    torch.testing.assert_close(draws["cuda"], draws["cpu"], rtol=1e-3, atol=2e-3)
