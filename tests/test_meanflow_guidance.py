"""MeanFlow with guidance folded into its target (Geng et al. 2025, Sec. 4.2 and App. B.1),
against class-conditional Gaussians on the rectified path z_t = (1 - t) x + t eps.

Per coordinate, class c is N(mu_c, s_c^2) and the null condition N(mu_n, s_n^2), so each has the
linear velocity v_k(z, t) = -mu_k + a_k(t) (z - (1 - t) mu_k), a_k = d/dt log sd_k(t), sd_k(t)^2 =
(1 - t)^2 s_k^2 + t^2 (rectified_gaussian.py). The guided field w v_c + (1 - w) v_n is linear
too, and where the classes share either their spread or their mean its flow is closed form:

    z_r = m(r) + Phi(r, t) (z - m(t)),  m(t) = (1 - t) (w mu_c + (1 - w) mu_n),
    Phi(r, t) = (sd_c(r) / sd_c(t))^w (sd_n(r) / sd_n(t))^(1 - w)

(equal spreads: the field of N(w mu_c + (1 - w) mu_n, s^2); equal means: z - m(t) grows at
the rate w a_c + (1 - w) a_n). Its average velocity u_cfg(z, r, t) = (z - z_r) / (t - r) is
what a MeanFlow net folded at omega, kappa must learn, with w = omega / (1 - kappa).
"""

import re
from types import SimpleNamespace

import pytest
import torch

from difflab import build, cli
from difflab.conditioners import ClassLabels
from difflab.conditioners.text import TextConditioner, make_encoder
from difflab.config import apply_overrides, preset
from difflab.diffusion.few_step_losses import MeanFlowLoss, mean_velocity_jvp
from difflab.errors import ConfigError
from difflab.model import DataKind
from test_sampler_registry import CountedNet

CLASSES = 3
CASES = {  # (class means (3, 2), class spreads, null mean, null spread)
    "spread shared": (
        torch.tensor([[0.5, -0.3], [-0.6, 0.4], [0.2, 0.9]]),
        torch.tensor([[0.4, 0.7]] * 3),
        torch.tensor([0.0, 0.3]),
        torch.tensor([0.4, 0.7]),
    ),
    "mean shared": (
        torch.tensor([[0.5, -0.3]] * 3),
        torch.tensor([[0.4, 0.7], [0.3, 0.5], [0.6, 0.2]]),
        torch.tensor([0.5, -0.3]),
        torch.tensor([0.9, 1.1]),
    ),
}


def _sd(s, t):
    return torch.sqrt((1 - t[:, None]) ** 2 * s**2 + t[:, None] ** 2)


def _rate(s, t):  # a(t) = d/dt log sd(t)
    return (t[:, None] - (1 - t[:, None]) * s**2) / _sd(s, t) ** 2


class GuidedGaussians(torch.nn.Module):
    """The exact folded MeanFlow net: net(z, t, y, t2) = u_cfg(z, t - t2, t | y) guided at w for
    classes y < 3, and the null condition's own average velocity for y = 3 (the null label)."""

    second_time = True

    def __init__(self, case: str, w: float):
        super().__init__()
        self.mus, self.spreads, self.mu_n, self.s_n = CASES[case]
        self.w = w

    def _parts(self, y):
        c = y.clamp_max(CLASSES - 1)
        w = torch.where(y == CLASSES, 0.0, self.w)[:, None]  # the null row: its own field
        return self.mus[c], self.spreads[c], w

    def velocity(self, z, t, y, w=None):
        """The exact velocity guided at w (the net's by default; 1: class y's own), the null
        condition's own on null rows."""
        mu_c, s_c, w_net = self._parts(y)
        w = w_net if w is None else torch.where(w_net > 0, w, 0.0)
        mu_g = w * mu_c + (1 - w) * self.mu_n
        rate = w * _rate(s_c, t) + (1 - w) * _rate(self.s_n, t)
        return -mu_g + rate * (z - (1 - t[:, None]) * mu_g)

    def forward(self, z, t, y, *, t2=None):
        t2 = torch.zeros_like(t) if t2 is None else t2
        r = t - t2
        mu_c, s_c, w = self._parts(y)
        m = lambda time: (1 - time[:, None]) * (w * mu_c + (1 - w) * self.mu_n)  # noqa: E731
        phi = (_sd(s_c, r) / _sd(s_c, t)) ** w * (_sd(self.s_n, r) / _sd(self.s_n, t)) ** (1 - w)
        z_r = m(r) + phi * (z - m(t))
        gap = t2[:, None]
        u = (z - z_r) / gap.clamp_min(1e-12)
        return torch.where(gap > 0, u, self.velocity(z, t, y))


def _batch(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 0.98 + 0.01
    r = t * torch.rand(n, generator=g)
    y = torch.randint(CLASSES, (n,), generator=g)
    y = torch.where(torch.rand(n, generator=g) < 0.2, CLASSES, y)  # some rows dropped
    return 2 * torch.randn(n, 2, generator=g), r, t, y


def _exact_model(case, w):
    return SimpleNamespace(net=GuidedGaussians(case, w), conditioner=ClassLabels(CLASSES))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("omega", "kappa"), [(2.0, 0.0), (1.0, 0.5), (0.6, 0.7)])
def test_the_folded_target_of_the_exact_guided_u_is_the_exact_guided_u(case, omega, kappa):
    """With v the exact conditional velocity, v~ = omega v + kappa u(c) + (1 - omega - kappa)
    u(null) is the guided field at w = omega / (1 - kappa), and the MeanFlow identity built on
    it (tangent and target) returns the exact guided average velocity; dropped rows keep v."""
    w = omega / (1 - kappa)
    z, r, t, y = _batch()
    net = GuidedGaussians(case, w)
    v = net.velocity(z, t, y, w=1.0)  # each row's own class (or null) velocity
    loss = MeanFlowLoss(omega=omega, kappa=kappa)
    v_tilde = loss.guided_velocity(net, ClassLabels(CLASSES), z, t, v, y)
    torch.testing.assert_close(v_tilde, net.velocity(z, t, y), atol=1e-5, rtol=1e-5)
    dropped = y == CLASSES
    assert torch.equal(v_tilde[dropped], v[dropped])
    u, dudt = mean_velocity_jvp(net, z, r, t, v_tilde, y)
    u_tgt = v_tilde - (t - r)[:, None] * dudt
    torch.testing.assert_close(u_tgt, u, atol=1e-4, rtol=1e-4)
    # not trivially met: guidance moved u, and the unguided v as tangent breaks the identity
    assert (u - GuidedGaussians(case, 1.0)(z, t, y, t2=t - r))[~dropped].abs().max() > 0.05
    _, dudt_plain = mean_velocity_jvp(net, z, r, t, v, y)
    assert (v - (t - r)[:, None] * dudt_plain - u)[~dropped].abs().max() > 0.05


def _pairs_with_velocity(net, z, t, y):
    """(x0, eps) with z = (1 - t) x0 + t eps and eps - x0 the exact conditional velocity."""
    v = net.velocity(z, t, y, w=1.0)
    return z - t[:, None] * v, z + (1 - t[:, None]) * v


@pytest.mark.parametrize("case", list(CASES))
def test_the_folded_loss_of_the_exact_guided_net_is_zero(case):
    """Through the loss object: at the pairs whose sample velocity is the exact conditional one,
    the folded loss (omega 1.5, kappa 0.25: w = 2) of the exact guided net is zero at every r;
    unfolded, the guided net is wrong and the unguided exact net is right."""
    z, r, t, y = _batch(256, seed=1)
    x0, eps = _pairs_with_velocity(GuidedGaussians(case, 1.0), z, t, y)
    noise = (t, r, eps)
    folded = MeanFlowLoss(omega=1.5, kappa=0.25, power=0.0)
    got, _ = folded(_exact_model(case, 2.0), x0, y, noise=noise, step=0)
    assert float(got.max()) < 1e-8
    plain = MeanFlowLoss(power=0.0)
    wrong, _ = plain(_exact_model(case, 2.0), x0, y, noise=noise, step=0)
    assert float(wrong.max()) > 1e-3
    right, _ = plain(_exact_model(case, 1.0), x0, y, noise=noise, step=0)
    assert float(right.max()) < 1e-8


def test_guidance_is_folded_only_inside_its_interval_of_t():
    """meanflow.guidance_t_start / _end: rows with t outside [start, end] keep v (the authors'
    code sets omega 1, kappa 0 there)."""
    z, _, t, y = _batch()
    net = GuidedGaussians("spread shared", 3.0)
    v = net.velocity(z, t, y, w=1.0)
    loss = MeanFlowLoss(omega=3.0, guidance_t_start=0.3, guidance_t_end=0.6)
    v_tilde = loss.guided_velocity(net, ClassLabels(CLASSES), z, t, v, y)
    inside = (t >= 0.3) & (t <= 0.6) & (y < CLASSES)
    assert torch.equal(v_tilde[~inside], v[~inside])
    torch.testing.assert_close(v_tilde[inside], net.velocity(z, t, y)[inside])


class _Counted(CountedNet):
    """A net that counts its calls and reads the second time input (the loss checks for it)."""

    second_time = True


def _conditional_mlp():
    cfg = apply_overrides(preset("toy2d-meanflow"), ["model.mlp.width=32", "model.mlp.depth=2"])
    torch.manual_seed(0)
    model = build.build_model(cfg, DataKind((2,), CLASSES))
    with torch.no_grad():  # open the zero-initialised blocks so every input matters
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_omega_one_kappa_zero_is_the_unguided_loss_bit_for_bit():
    """The defaults (omega 1, kappa 0) fold nothing: on the same seed the loss and its gradients
    are, bit for bit, those of the MeanFlow formula with the sample's v (the loss before folded
    guidance existed), at one network call (the JVP); folding costs one more (a doubled batch)."""
    model = _conditional_mlp()
    g = torch.Generator().manual_seed(5)
    x0, y = torch.randn(64, 2, generator=g), torch.randint(CLASSES + 1, (64,), generator=g)
    loss = MeanFlowLoss()
    t, r, eps = noise = loss.draw((64, 2), g)
    counted = model.net = _Counted(model.net)
    got, _ = loss(model, x0, y, noise=noise, step=0)
    assert counted.calls == 1
    got.mean().backward()
    grads = [p.grad.clone() for p in counted.parameters()]
    counted.zero_grad()
    # by hand: u_tgt = v - (t - r)(v d_z u + d_t u), adaptive weight 1 / (err + c)
    z = (1 - t[:, None]) * x0 + t[:, None] * eps
    u, dudt = mean_velocity_jvp(counted, z, r, t, eps - x0, y)
    sq = (u - (eps - x0 - (t - r)[:, None] * dudt).detach()).pow(2).mean(dim=1)
    want = (sq.detach() + 1e-3) ** -1.0 * sq
    assert torch.equal(got, want)
    want.mean().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, counted.parameters(), strict=True))
    counted.calls = 0
    MeanFlowLoss(omega=2.0)(model, x0, y, noise=noise, step=0)
    assert counted.calls == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("meanflow.kappa=1", "need 0 <= kappa < 1"),
        ("meanflow.kappa=-0.1", "need 0 <= kappa < 1"),
        ("meanflow.omega=0", "omega > 0"),
        ("meanflow.omega=0.5", "omega + kappa >= 1"),
        ("meanflow.guidance_t_end=0", "need 0 <= start < end <= 1"),
        ("meanflow.guidance_t_end=1.5", "need 0 <= start < end <= 1"),
    ],
)
def test_folded_guidance_settings_are_validated_in_one_line(override, message):
    cfg = apply_overrides(preset("mnist-meanflow"), [override])
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        build.build_loss(cfg, build.build_schedule(cfg.diffusion))
    assert "\n" not in str(info.value)


def test_folded_guidance_on_an_unconditional_run_is_refused(tmp_path, capsys):
    """The checkerboard has no classes: meanflow.omega=2 is refused in one line naming the fix,
    exit 2, nothing written; so is a conditional run that never drops its label."""
    argv = ["train", "--preset", "toy2d-meanflow", "--runs", str(tmp_path), "--name", "x"]
    code = cli.main([*argv, "--no-finish", "--quiet", "--set", "meanflow.omega=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "data.class_conditional=true" in err and "meanflow.omega=1" in err
    assert not (tmp_path / "x").exists()
    model = _conditional_mlp()
    model.conditioner.dropout = 0.0
    with pytest.raises(ConfigError, match=re.escape("train.label_dropout > 0")):
        MeanFlowLoss(kappa=0.5).attach(model, "cpu")


def test_the_conditioners_say_which_rows_were_dropped():
    """is_null: the rows guidance leaves at v~ = v, for labels and for text (the empty prompt)."""
    labels = ClassLabels(CLASSES, dropout=0.5)
    y = labels.train_condition(torch.arange(8) % CLASSES, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(labels.is_null(y), y == CLASSES) and 0 < int((y == CLASSES).sum()) < 8
    text = TextConditioner(make_encoder("char", 16))
    cond = text.prompts(["a handwritten seven", "", "an eight"])
    assert text.is_null(cond).tolist() == [False, True, False]
