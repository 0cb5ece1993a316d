"""Mixed precision that pays (issue 18): the reduced-precision CPU paths of GroupNorm and
attention give torch's own answers (fp32 bit for bit, bf16 within bf16's rounding), and
train.precision=auto picks bf16 from the hardware, says so once, and falls back honestly."""

import warnings

import pytest
import torch
from torch.nn import functional as F

from difflab import devices
from difflab.config import ConfigError
from difflab.nets.layers import GroupNorm, attention
from difflab.nets.unet import UNet
from test_speed import SMALL_UNET, _image_cfg, _weights_after

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: relative rounding of one value


def _norm(channels=32, groups=8):
    torch.manual_seed(0)
    norm = GroupNorm(groups, channels)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    return norm


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_group_norm_in_fp32_is_torchs_bit_for_bit(layout):
    norm = _norm()
    x = (torch.randn(4, 32, 8, 8) * 3 + 1).contiguous(memory_format=layout).requires_grad_()
    y = norm(x)
    ref = torch.nn.GroupNorm.forward(norm, x)
    assert torch.equal(y, ref) and y.is_contiguous(memory_format=layout)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.equal(g, g_ref)


def test_group_norm_of_channels_last_bf16_is_the_nchw_kernel_and_stays_channels_last():
    norm = _norm()
    x = torch.randn(4, 32, 8, 8) * 3 + 1
    x_cl = x.contiguous(memory_format=torch.channels_last).bfloat16().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y = norm(x_cl)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    nchw = F.group_norm(x.bfloat16(), 8, norm.weight, norm.bias, norm.eps)
    assert torch.equal(y.contiguous(), nchw)  # the same kernel, only the layout around it
    full = torch.nn.GroupNorm.forward(norm, x)  # fp32 statistics: bf16's rounding, no more
    assert (y.float() - full).abs().max() <= 2 * BF16_EPS * full.abs().max()
    (g,) = torch.autograd.grad(y.float().square().sum(), x_cl)
    assert g.is_contiguous(memory_format=torch.channels_last)  # adds meet it in its own layout
    x32 = x.clone().requires_grad_()
    (g32,) = torch.autograd.grad(torch.nn.GroupNorm.forward(norm, x32).square().sum(), x32)
    assert (g.float() - g32).abs().max() <= 8 * BF16_EPS * g32.abs().max()


@pytest.mark.parametrize("masked", [False, True])
def test_attention_is_sdpa_in_fp32_and_close_to_it_in_bf16(masked):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))
    mask = torch.rand(2, 1, 1, 64) > 0.3 if masked else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention(q, k, v, mask), ref)
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = attention(*low, mask)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 4 * BF16_EPS * ref.abs().max()
    grads = torch.autograd.grad(out.float().sum(), low)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = torch.autograd.grad(F.scaled_dot_product_attention(*full, attn_mask=mask).sum(), full)
    for g, r in zip(grads, refs, strict=True):
        assert (g.float() - r).abs().max() <= 16 * BF16_EPS * r.abs().max()


def test_a_unet_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    net = UNet(**SMALL_UNET).to(memory_format=torch.channels_last)
    for p in net.parameters():  # the zero-initialised output layers would hide everything
        torch.nn.init.normal_(p, 0.0, 0.2)
    x = torch.randn(4, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    t, y = torch.rand(4), torch.tensor([0, 1, 2, 3])
    full = net(x, t, y)
    with torch.autocast("cpu", torch.bfloat16):
        low = net(x, t, y)
    relative = (low.float() - full).abs().max() / full.abs().max()
    assert 0 < relative < 0.05, relative  # bf16 ran (not bit-equal) and stayed close


def test_auto_precision_is_bf16_on_bf16_hardware_and_says_why(monkeypatch):
    said = []
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    dtype = devices.resolve_precision("auto", torch.device("cpu"), "train.precision", said.append)
    assert dtype is torch.bfloat16
    assert len(said) == 1 and said[0].startswith("train.precision=auto: bf16 (this CPU has ")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    said.clear()
    dtype = devices.resolve_precision("auto", torch.device("cpu"), "train.precision", said.append)
    assert dtype is None and said == ["train.precision=auto: fp32 (no bf16 units on this CPU)"]


def test_bf16_on_a_cpu_without_bf16_units_falls_back_to_fp32_with_one_warning(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dtype = devices.resolve_precision("bf16", torch.device("cpu"), "train.precision")
    assert dtype is None
    assert [str(w.message) for w in caught] == [
        "train.precision=bf16: this CPU has no bf16 units (AVX512-BF16 or AMX), where bf16 is "
        "emulated and slower than fp32; running in fp32 instead"
    ]
    expected = r"train\.precision must be one of fp32, bf16, fp16, auto, got 'bf8'"
    with pytest.raises(ConfigError, match=expected):
        devices.resolve_precision("bf8", torch.device("cpu"), "train.precision")


def test_training_with_auto_precision_says_so_once_and_matches_its_explicit_choice(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    auto, _ = _weights_after(_image_cfg(tmp_path, "train.precision=auto"))
    out = capsys.readouterr().out
    assert out.count("train.precision=auto: bf16") == 1, out
    bf16, _ = _weights_after(_image_cfg(tmp_path, "train.precision=bf16"))
    full, _ = _weights_after(_image_cfg(tmp_path, "train.precision=fp32"))
    assert torch.equal(auto, bf16) and not torch.equal(bf16, full)
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    fallback, _ = _weights_after(_image_cfg(tmp_path, "train.precision=auto"))
    assert torch.equal(fallback, full)
    assert "train.precision=auto: fp32" in capsys.readouterr().out
