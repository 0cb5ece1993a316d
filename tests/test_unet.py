"""The U-Net: shapes under every option, identity blocks at init, DDPM's parameter count,
conditioning, input validation and gradient flow. Tiny nets on 16x16 images keep this fast."""

import pytest
import torch

from difflab.nets.unet import AttentionBlock, ResBlock, UNet, ddpm_cifar10

TINY = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, norm_groups=8)


def _tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{"in_channels": 1, "attention_levels": (1,), **TINY, **overrides})


def _perturb(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its (partly zero) init, so every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(in_channels=3, downsample="avgpool", upsample="bilinear"),
        dict(downsample="space_to_depth", attention_levels=(0, 1), num_heads=2),
        dict(attention_levels=(), mid_attention=False, bottleneck_blocks=1),
        dict(weight_standardization=True, dropout=0.1),
        dict(in_channels=3, out_channels=6, channel_mults=(1, 2, 2), num_res_blocks=2),
        dict(num_classes=10),
    ],
    ids=["default", "avgpool-bilinear", "s2d-multihead", "no-attn", "ws", "3-levels", "classes"],
)
def test_output_shape_equals_input_shape(overrides):
    net = _tiny(**overrides)
    _perturb(net)  # zero-init output would hide a broken path; perturbed, the output must vary
    c_in = net.conv_in.in_channels
    x = torch.randn(2, c_in, 16, 16)
    y = torch.tensor([3, 7]) if net.num_classes else None
    out = net(x, torch.rand(2), y)
    assert out.shape == (2, net.out[-1].out_channels, 16, 16)
    assert torch.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("ws", [False, True])
def test_res_block_is_identity_at_init(ws):
    torch.manual_seed(0)
    block = ResBlock(16, 16, emb_dim=32, dropout=0.0, groups=8, ws=ws)
    h = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(h, torch.randn(2, 32)), h)


def test_attention_block_is_identity_at_init():
    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=2, groups=8)
    h = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(h), h)


def test_untrained_net_outputs_zero():
    # Zero-initialised output conv (documented choice): the untrained net predicts eps's mean.
    out = _tiny()(torch.randn(2, 1, 16, 16), torch.rand(2))
    assert torch.equal(out, torch.zeros_like(out))


def test_ddpm_cifar10_has_35_7m_parameters():
    # Ho et al. 2020, Appendix B: "Our CIFAR10 model has 35.7 million parameters".
    net = ddpm_cifar10()
    n = sum(p.numel() for p in net.parameters())
    assert round(n / 1e5) == 357, n
    net.eval()
    with torch.no_grad():  # one 32x32 forward pass: three downsamplings, attention at 16x16
        out = net(torch.randn(1, 3, 32, 32), torch.tensor([0.5]))
    assert out.shape == (1, 3, 32, 32)


def test_class_conditioning_changes_output_and_none_means_null_label():
    net = _tiny(num_classes=4).eval()
    _perturb(net)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    with torch.no_grad():
        out_a, out_b = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
        out_none, out_null = net(x, t), net(x, t, torch.tensor([4, 4]))
    assert not torch.allclose(out_a, out_b)
    assert torch.equal(out_none, out_null)


@pytest.mark.parametrize(
    ("build", "call", "phrase"),
    [
        (dict(), dict(shape=(2, 1, 15, 16)), r"not divisible by 2\^1 = 2"),
        (dict(channel_mults=(1, 2, 2)), dict(shape=(2, 1, 18, 16)), "image size 18x16"),
        (dict(num_classes=3), dict(y=[0, 5]), "out of range"),
        (dict(num_classes=3), dict(y=[-1, 0]), "out of range"),
        (dict(), dict(y=[0, 1]), "unconditional"),
    ],
    ids=["odd-size", "size-vs-levels", "label-high", "label-negative", "y-to-unconditional"],
)
def test_bad_forward_inputs_raise(build, call, phrase):
    net = _tiny(**build)
    x = torch.randn(*call.get("shape", (2, 1, 16, 16)))
    y = torch.tensor(call["y"]) if "y" in call else None
    with pytest.raises(ValueError, match=phrase):
        net(x, torch.rand(2), y)


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (dict(attention_levels=(2,)), r"valid levels are 0\.\.1"),
        (dict(norm_groups=5), "does not divide channel count"),
        (dict(downsample="maxpool"), "choose one of"),
        (dict(upsample="bicubic"), "choose one of"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(mid_attention=True, bottleneck_blocks=1), "bottleneck_blocks >= 2"),
    ],
    ids=["attn-level", "groups", "downsample", "upsample", "heads", "mid-attn"],
)
def test_bad_config_raises(overrides, phrase):
    with pytest.raises(ValueError, match=phrase):
        _tiny(**overrides)


@pytest.mark.parametrize("ws", [False, True])
def test_gradients_reach_every_parameter(ws):
    net = _tiny(weight_standardization=ws, num_heads=2)
    _perturb(net)
    net(torch.randn(2, 1, 16, 16), torch.rand(2)).square().mean().backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None]
    zero_grad = [name for name, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert not no_grad and not zero_grad, (no_grad, zero_grad)
