"""MeanFlow (Geng et al. 2025) against the closed form of Gaussian data on the rectified path
(rectified_gaussian.py derives v and the average velocity u): the MeanFlow identity, one-step
sampling, its loss at r = t, the JVP against finite differences, training and exact resume."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab import build, cli
from difflab.conditioners import ClassLabels
from difflab.config import apply_overrides, preset
from difflab.diffusion import schedules
from difflab.diffusion.few_step_losses import MeanFlowLoss, mean_velocity_jvp
from difflab.diffusion.guidance import GuidedNet
from difflab.diffusion.losses import DiffusionLoss
from difflab.diffusion.prediction import Denoiser
from difflab.errors import ConfigError
from difflab.model import DataKind
from difflab.nets.dit import DiT
from difflab.nets.mlp import MLP
from difflab.nets.unet import UNet
from difflab.samplers import sample_meanflow
from difflab.training.loop import train
from rectified_gaussian import MU, ExactMeanFlowNet, S, average_velocity, velocity

SMALL = [
    "model.mlp.width=32",
    "model.mlp.depth=1",
    "train.batch_size=64",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.threads=1",
    "sample.n=200",
    "sample.batch_size=200",
]
FLAGS = ["--no-finish", "--quiet"]


def _points(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 0.98 + 0.01
    r = t * torch.rand(n, generator=g)
    return torch.randn(n, 2, generator=g) * 2, r, t


def test_the_meanflow_target_of_the_exact_u_is_the_exact_u():
    """u_tgt = v - (t - r)(v d_z u + d_t u), by the loss's JVP along (v, 0, 1) with the exact
    marginal v, equals u: the MeanFlow identity holds in closed form."""
    z, r, t = _points()
    net = ExactMeanFlowNet()
    v = velocity(z, t)
    u, dudt = mean_velocity_jvp(net, z, r, t, v, None)
    u_tgt = v - (t - r)[:, None] * dudt
    torch.testing.assert_close(u, average_velocity(z, r, t))
    torch.testing.assert_close(u_tgt, u, atol=1e-4, rtol=1e-4)
    assert (u - v).abs().max() > 0.05  # u is not v: the identity is not trivially met


@pytest.mark.parametrize("steps", [1, 2])
def test_the_exact_u_samples_the_data_in_one_step(steps):
    """z_0 = z_1 - u(z_1, 0, 1) is mu + s z_1: N(mu, s^2) exactly, in one step or two."""
    denoiser = Denoiser(
        ExactMeanFlowNet(), schedules.RectifiedFlowSchedule(), "velocity", step_grid="meanflow"
    )
    x_T = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x0 = sample_meanflow(denoiser, x_T, ts)
    torch.testing.assert_close(x0, MU + S * x_T, atol=1e-5, rtol=1e-5)


def _mlp_model():
    cfg = apply_overrides(preset("toy2d-meanflow"), ["model.mlp.width=32", "model.mlp.depth=2"])
    torch.manual_seed(0)
    model = build.build_model(cfg, DataKind((2,)))
    with torch.no_grad():  # open the zero-initialised blocks so every input matters
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def test_at_r_equal_t_the_loss_is_flow_matching():
    """With every r = t (fraction 0) and no adaptive weight (power 0), MeanFlow's loss is the
    flow-matching loss on the same (t, eps), example by example."""
    cfg, model = _mlp_model()
    x0 = torch.randn(64, 2)
    loss = MeanFlowLoss(fraction=0.0, power=0.0)
    t, r, eps = loss.draw((64, 2), torch.Generator().manual_seed(3))
    assert torch.equal(t, r)
    mf, _ = loss(model, x0, None, noise=(t, r, eps), step=0)
    fm = DiffusionLoss(build.build_loss_spec(cfg.diffusion, model.schedule), model.schedule)
    want, _ = fm(model, x0, None, noise=(t, eps), step=0)
    torch.testing.assert_close(mf, want)
    # the adaptive weight 1 / (err + c)^p divides each example's loss
    weighted, _ = MeanFlowLoss(fraction=0.0, power=1.0, constant=0.5)(
        model, x0, None, noise=(t, r, eps), step=0
    )
    torch.testing.assert_close(weighted, want / (want + 0.5))


def _fd(net, z, r, t, v, h):
    def u(z_, t_):
        return net(z_, t_, None, t2=t_ - r)

    return (u(z + h * v, t + h) - u(z - h * v, t - h)) / (2 * h)


@pytest.mark.parametrize("backbone", ["mlp", "unet", "dit"])
def test_the_jvp_equals_finite_differences(backbone):
    """The loss's forward-mode JVP along (v, 0, 1) equals a central difference (fp32), for
    every backbone (the DiT's attention takes its plain path under the JVP)."""
    torch.manual_seed(0)
    if backbone == "mlp":
        net = MLP(dim=2, width=32, depth=2, emb_dim=32, second_time=True)
        z = torch.randn(16, 2)
    else:
        net = UNet(
            in_channels=1,
            base_channels=8,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            norm_groups=4,
            second_time=True,
        )
        z = torch.randn(4, 1, 8, 8)
    if backbone == "dit":  # attention under the JVP: the plain product (layers.attention)
        net = DiT(
            in_channels=1,
            input_size=(8, 8),
            width=32,
            depth=2,
            heads=2,
            patch_size=2,
            second_time=True,
        )
        z = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = z.shape[0]
    t = torch.linspace(0.3, 0.9, n)
    r = t * 0.5
    v = torch.randn_like(z)
    u, dudt = mean_velocity_jvp(net, z, r, t, v, None)
    torch.testing.assert_close(u, net(z, t, None, t2=t - r))
    with torch.no_grad():
        fd = _fd(net, z, r, t, v, 2e-4)  # the sinusoid spins at 1000 rad per unit t
    err = float((dudt - fd).norm() / dudt.norm())
    assert err < 2e-2, err


def test_training_runs_and_resumes_bitwise(tmp_path):
    """Tiny MeanFlow training through the real trainer; a run stopped after 2 steps and resumed
    equals a straight one, weight for weight."""
    cfg = apply_overrides(preset("toy2d-meanflow"), [*SMALL, "train.steps=4"])
    threads = torch.get_num_threads()
    try:
        train(cfg, tmp_path / "a", progress=False)
        train(cfg, tmp_path / "b", progress=False, stop_after=2)
        train(cfg, tmp_path / "b", resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    for which in ("model", "ema"):
        a = load_file(tmp_path / f"a/checkpoints/step-4/{which}.safetensors")
        b = load_file(tmp_path / f"b/checkpoints/step-4/{which}.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("time2_emb") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), (which, k)
    out = tmp_path / "s.npz"
    assert (
        cli.main(["sample", str(tmp_path / "a"), "--steps", "1", "--n", "20", "--out", str(out)])
        == 0
    )
    samples = np.load(out)["samples"]
    assert samples.shape == (20, 2) and np.isfinite(samples).all()


def test_a_net_without_the_second_time_is_refused(tmp_path, capsys):
    """train.loss=meanflow on a net built without t2: one line, exit 2, nothing written; the
    loss itself refuses such a net (the check when a model is handed to it)."""
    argv = ["train", "--preset", "toy2d-meanflow", "--runs", str(tmp_path), "--name", "x"]
    code = cli.main([*argv, *FLAGS, "--set", *SMALL, "model.second_time=false"])
    err = capsys.readouterr().err
    assert code == 2 and "model.second_time=true" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    cfg = apply_overrides(preset("toy2d-flow"), ["model.mlp.width=16"])
    plain = build.build_model(cfg, DataKind((2,)))
    with pytest.raises(ConfigError, match="needs a network with a second time input"):
        MeanFlowLoss().attach(plain, "cpu")


def test_classifier_free_guidance_passes_the_second_time_on():
    """The guided net (one doubled batch) hands t2 to both halves: w = 2 gives
    u(null) + 2 (u(y) - u(null)), each at the same t2."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=1, emb_dim=16, num_classes=3, second_time=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(4, 2), torch.full((4,), 0.8), torch.tensor([0, 1, 2, 0])
    t2 = torch.full((4,), 0.3)
    null = torch.full((4,), 3)
    want = net(x, t, null, t2=t2) + 2 * (net(x, t, y, t2=t2) - net(x, t, null, t2=t2))
    got = GuidedNet(net, 2.0, ClassLabels(3))(x, t, y, t2=t2)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, GuidedNet(net, 2.0, ClassLabels(3))(x, t, y))


class _NoForwardRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _Part(torch.nn.Module):
    def forward(self, x):
        return _NoForwardRule.apply(x)


class _NetWithAnOpWithoutJvp(torch.nn.Module):
    second_time = True

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)
        self.bad = _Part()

    def forward(self, z, t, cond=None, *, t2=None):
        return self.bad(self.inner(z) * t[:, None])


def test_a_jvp_that_fails_on_an_op_names_it_and_the_part():
    z, r, t = _points(8)
    with pytest.raises(ConfigError, match=r"_NetWithAnOpWithoutJvp \(module bad\)") as info:
        mean_velocity_jvp(_NetWithAnOpWithoutJvp(), z, r, t, torch.randn_like(z), None)
    assert "\n" not in str(info.value) and "train.precision=fp32" in str(info.value)


def test_uniform_times_draw_sorted_uniform_pairs():
    """meanflow.times=uniform: t and r are the max and min of two U(0, 1) draws, so their means
    are 2/3 and 1/3 (order statistics); r = t on the flow-matching rows; another name is refused."""
    n = 200_000
    t, r, _ = MeanFlowLoss(fraction=1.0, times="uniform").draw((n, 2), torch.Generator())
    assert bool((r <= t).all()) and float(t.max()) <= 1 and float(r.min()) >= 0
    assert abs(float(t.mean()) - 2 / 3) < 4e-3 and abs(float(r.mean()) - 1 / 3) < 4e-3
    t, r, _ = MeanFlowLoss(fraction=0.0, times="uniform").draw((1000, 2), torch.Generator())
    assert torch.equal(t, r)
    with pytest.raises(ConfigError, match=r"meanflow\.times must be logit_normal or uniform"):
        MeanFlowLoss(times="beta")


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_the_time_scale_bounds_the_embeddings_speed_in_t(scale):
    """model.time_scale multiplies t before the sinusoids: d/dt of sin(scale f t) is
    scale f cos(scale f t), at most `scale` (the top frequency f is 1); the embedding's JVP along
    t is exactly that, and a net built with it reads it."""
    from difflab.nets.layers import sinusoidal_embedding

    t = torch.linspace(0.05, 0.95, 7)
    _, d = torch.func.jvp(
        lambda t_: sinusoidal_embedding(t_, 64, scale=scale), (t,), (torch.ones_like(t),)
    )
    freqs = torch.exp(-math.log(10000.0) * torch.arange(32) / 32)
    args = scale * t[:, None] * freqs[None]
    want = torch.cat([-torch.sin(args), torch.cos(args)], dim=1) * scale * freqs.repeat(2)
    torch.testing.assert_close(d, want, rtol=1e-4, atol=1e-3 * scale)
    cfg = apply_overrides(preset("toy2d-meanflow"), [f"model.time_scale={scale}"])
    net = build.build_model(cfg, DataKind((2,))).net
    assert net.time_emb.scale == scale and net.time2_emb.emb.scale == scale


def test_a_time_scale_that_is_not_positive_is_refused():
    for bad in ("0", "-1", "nan"):
        cfg = apply_overrides(preset("toy2d-meanflow"), [f"model.time_scale={bad}"])
        with pytest.raises(ConfigError, match=r"model\.time_scale must be a number > 0"):
            build.build_model(cfg, DataKind((2,)))
