"""Shortcut models (Frans et al. 2024) against the closed form of Gaussian data on the rectified
path (rectified_gaussian.py: the exact step s(z, t, d) = u(z, t - d, t)): the self-consistency
target, the loss at d = 0, the sampler's grid, training and exact resume, the refusals."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab import build, cli
from difflab.config import apply_overrides, preset
from difflab.diffusion import schedules
from difflab.diffusion.few_step_losses import ShortcutLoss
from difflab.diffusion.losses import DiffusionLoss
from difflab.diffusion.prediction import Denoiser
from difflab.errors import ConfigError
from difflab.model import DataKind
from difflab.nets.mlp import MLP
from difflab.samplers import sample_shortcut
from difflab.training.loop import train
from rectified_gaussian import MU, ExactMeanFlowNet, S, endpoint

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


class ExactShortcutNet(ExactMeanFlowNet):
    """s(z, t, d) = u(z, t - d, t): the net reads t2 = d, as MeanFlow's reads t - r."""


def test_the_target_at_d_is_two_exact_half_steps():
    """The self-consistency target (s(z, t, d) + s(z - d s, t - d, d)) / 2 with the exact s is
    the step of size 2d that two exact steps of size d make: (z - z_{t - 2d}) / 2d."""
    g = torch.Generator().manual_seed(0)
    n = 256
    d = 2.0 ** -torch.randint(1, 6, (n,), generator=g).float()
    t = 2 * d + (1 - 2 * d) * torch.rand(n, generator=g)
    z = 2 * torch.randn(n, 2, generator=g)
    target = ShortcutLoss().target(ExactShortcutNet(), z, t, d, None)
    two_steps = (z - endpoint(z, t - 2 * d, t)) / (2 * d)[:, None]
    torch.testing.assert_close(target, two_steps, atol=1e-5, rtol=1e-5)
    # and it is not the one velocity at t: the paths' curvature is in the target
    assert (target - ExactShortcutNet()(z, t)).abs().max() > 1e-2


def test_the_draws_sit_on_the_grid():
    """Bootstrap rows (a fraction k) take d = 2^-j in [1 / max_steps, 1 / 2] and t a multiple
    of 2d in (0, 1]; the rest d = 0."""
    loss = ShortcutLoss(max_steps=16, bootstrap_fraction=0.25)
    t, d, eps = loss.draw((4000, 2), torch.Generator().manual_seed(0))
    boot = d > 0
    assert 0.2 < float(boot.float().mean()) < 0.3 and eps.shape == (4000, 2)
    assert set(d[boot].tolist()) == {1 / 2, 1 / 4, 1 / 8, 1 / 16}
    k = t[boot] / (2 * d[boot])
    assert torch.equal(k, k.round()) and bool((k >= 1).all()) and bool((t <= 1).all())


def test_at_d_zero_the_loss_is_flow_matching():
    """With no bootstrap rows (k = 0, every d = 0) the shortcut loss is the flow-matching loss on
    the same (t, eps), example by example."""
    cfg = apply_overrides(preset("toy2d-shortcut"), ["model.mlp.width=32", "model.mlp.depth=2"])
    torch.manual_seed(0)
    model = build.build_model(cfg, DataKind((2,)))
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0 = torch.randn(64, 2)
    loss = ShortcutLoss(bootstrap_fraction=0.0)
    t, d, eps = loss.draw((64, 2), torch.Generator().manual_seed(3))
    assert not bool(d.any())
    got, _ = loss(model, x0, None, noise=(t, d, eps), step=0)
    fm = DiffusionLoss(build.build_loss_spec(cfg.diffusion, model.schedule), model.schedule)
    want, _ = fm(model, x0, None, noise=(t, eps), step=0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_sampler_with_the_exact_steps_samples_the_data(steps):
    """n uniform steps of d = 1 / n from t = 1 with the exact s land on mu + s z_1."""
    denoiser = Denoiser(
        ExactShortcutNet(), schedules.RectifiedFlowSchedule(), "velocity", step_grid="shortcut:8"
    )
    x_T = torch.randn(2048, 2, generator=torch.Generator().manual_seed(1))
    ts = torch.linspace(0.999, 0.0, steps + 1, dtype=torch.float64)  # the path's grid
    torch.testing.assert_close(
        sample_shortcut(denoiser, x_T, ts), MU + S * x_T, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ConfigError, match="power of two up to 8"):
        sample_shortcut(denoiser, x_T, torch.linspace(0.999, 0.0, 17, dtype=torch.float64))


def test_training_runs_resumes_bitwise_and_refuses_steps_off_the_grid(tmp_path, capsys):
    """`difflab train --preset toy2d-shortcut` for 4 steps; stopped at 2 and resumed it equals a
    straight run; sampling (and `eval --compare`, by default with the run's own sampler) takes
    --steps on the grid and refuses others in one line, exit 2."""
    argv = ["train", "--preset", "toy2d-shortcut", *FLAGS, "--runs", str(tmp_path)]
    sets = ["--set", *SMALL, "train.steps=4"]
    threads = torch.get_num_threads()
    try:
        assert cli.main([*argv, "--name", "a", *sets]) == 0
        cfg = apply_overrides(preset("toy2d-shortcut"), [*SMALL, "train.steps=4"])
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
    run = str(tmp_path / "a")
    assert cli.main(["sample", run, "--steps", "2", "--n", "20", "--out", str(out)]) == 0
    assert np.load(out)["samples"].shape == (20, 2)
    out.unlink()
    capsys.readouterr()
    assert cli.main(["eval", run, "--compare", "--nfe", "1,2,4", "--json"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(printed[printed.index("{\n") :])["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("shortcut", n) for n in (1, 2, 4)]
    for steps in ("3", "256"):
        code = cli.main(["sample", run, "--steps", steps, "--n", "20", "--out", str(out)])
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code == 2 and len(err) == 1 and "not on this shortcut model's step grid" in err[0]
        assert not out.exists()


def test_a_net_without_the_second_time_is_refused(tmp_path, capsys):
    argv = ["train", "--preset", "toy2d-shortcut", "--runs", str(tmp_path), "--name", "x"]
    code = cli.main([*argv, *FLAGS, "--set", *SMALL, "model.second_time=false"])
    err = capsys.readouterr().err
    assert code == 2 and "model.second_time=true" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    plain = build.build_model(preset("toy2d-flow"), DataKind((2,)))
    with pytest.raises(ConfigError, match="needs a network with a second time input"):
        ShortcutLoss().attach(plain, "cpu")


def test_a_tiny_model_approaches_the_closed_form():
    """400 steps of the shortcut loss on N(mu, s^2) (one thread, about 3 s): one and two steps
    from the same noise land near the exact map z_1 -> mu + s z_1 (measured mean error 0.055
    and 0.043; the untrained net's is above 0.5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = MLP(dim=2, width=64, depth=2, emb_dim=32, second_time=True)
        model, loss = SimpleNamespace(net=net), ShortcutLoss(max_steps=8)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        den = Denoiser(net, schedules.RectifiedFlowSchedule(), "velocity", step_grid="shortcut:8")
        x_T = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
        ts = torch.linspace(0.999, 0.0, 2, dtype=torch.float64)
        before = float((sample_shortcut(den, x_T, ts) - (MU + S * x_T)).abs().mean())
        for step in range(400):
            x0 = MU + S * torch.randn(256, 2, generator=g)
            value, _ = loss(model, x0, None, noise=loss.draw((256, 2), g), step=step)
            opt.zero_grad()
            value.mean().backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert before > 0.3
    for steps in (1, 2):
        ts = torch.linspace(0.999, 0.0, steps + 1, dtype=torch.float64)
        x0 = sample_shortcut(den, x_T, ts)
        assert float((x0 - (MU + S * x_T)).abs().mean()) < 0.1, steps
        torch.testing.assert_close(x0.std(0), S, atol=0.1, rtol=0)  # measured 0.08 off


def test_the_finest_steps_are_the_velocitys_euler_steps():
    """At d = 1 / max_steps the target's two steps ask the net for the velocity (t2 = 0), and so
    does the sampler at --steps max_steps: two Euler half-steps, and plain Euler along the grid,
    whatever the net answers for t2 = d."""

    class VelocityOnly(ExactShortcutNet):  # noise unless t2 = 0: only the velocity is right
        def forward(self, z, t, cond=None, *, t2=None):
            bad = t2 is not None and bool((t2 != 0).any())
            return super().forward(z, t) + (7.0 if bad else 0.0)

    net, g = VelocityOnly(), torch.Generator().manual_seed(0)
    z, t = 2 * torch.randn(64, 2, generator=g), 0.5 + 0.5 * torch.rand(64, generator=g)
    d = torch.full((64,), 1 / 8)
    v1 = net(z, t, t2=torch.zeros_like(t))
    euler = (v1 + net(z - d[:, None] * v1, t - d, t2=torch.zeros_like(t))) / 2
    torch.testing.assert_close(ShortcutLoss(max_steps=8).target(net, z, t, d, None), euler)
    denoiser = Denoiser(net, schedules.RectifiedFlowSchedule(), "velocity", step_grid="shortcut:8")
    x_T = torch.randn(256, 2, generator=g)
    x = x_T.clone()
    for k in range(8, 0, -1):  # Euler on the lattice t = k / 8
        x = x - net(x, torch.full((256,), k / 8), t2=torch.zeros(256)) / 8
    ts = torch.linspace(0.999, 0.0, 9, dtype=torch.float64)
    torch.testing.assert_close(sample_shortcut(denoiser, x_T, ts), x, atol=1e-5, rtol=1e-5)
