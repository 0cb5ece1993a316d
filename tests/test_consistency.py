"""Consistency models: the parameterisation (boundary, closed form on Gaussian data), the
curricula and distances against their formulas, ECT at r = 0, and the sampler."""

import itertools
import math

import pytest
import torch

from difflab import build
from difflab.config import apply_overrides, preset
from difflab.diffusion import schedules
from difflab.diffusion.consistency import (
    ConsistencyDenoiser,
    gaussian_consistency,
    noise_range,
    pseudo_huber,
    sigma_of,
    t_of_sigma,
)
from difflab.diffusion.curriculum import (
    ct_decay,
    ct_steps,
    ect_r,
    ict_steps,
    interval_index,
    karras,
    lognormal_weights,
)
from difflab.diffusion.prediction import Denoiser
from difflab.model import DataKind
from difflab.nets.mlp import MLP
from difflab.samplers import SampleNoise, generate, sample_consistency, sample_heun

SCHEDULES = {
    "edm": lambda: schedules.EDMSchedule(),
    "ve": lambda: schedules.VESchedule(0.01, 20.0),
    "linear": lambda: schedules.linear(1000),
    "cosine": lambda: schedules.CosineSchedule(),
    "rectified": lambda: schedules.RectifiedFlowSchedule(),  # a flow teacher's velocity F
}
KINDS = {"edm": "edm", "ve": "eps", "linear": "v", "cosine": "eps", "rectified": "velocity"}


def _cm(name, seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=2, width=32, depth=1)
    return ConsistencyDenoiser(Denoiser(net, SCHEDULES[name](), KINDS[name]))


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_boundary_holds_to_float_precision(name):
    cm = _cm(name)
    x = 3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    t_min = torch.full((64,), cm.schedule.t_min)
    f, _ = cm(x, t_min)
    alpha = float(cm.schedule.alpha(torch.tensor(cm.schedule.t_min, dtype=torch.float32)))
    assert torch.equal(f, x / torch.tensor(alpha, dtype=torch.float32))  # c_out = 0 exactly
    if name in ("edm", "ve"):
        assert torch.equal(f, x)  # alpha = 1: f(x, sigma_min) = x
    # away from sigma_min f is the wrapped denoiser's x0_hat (ECT's start): F is the EDM raw
    # output x0_hat implies, so f = c_skip x~ + (s - sigma_min) / s (x0_hat - c_skip' x~)
    t = torch.full((64,), 0.5 * cm.schedule.t_max)
    x0_hat, _ = cm.inner(x, t)
    s = float(sigma_of(cm.schedule, 0.5 * cm.schedule.t_max))
    sd, lo = cm.sigma_data, cm.sigma_min
    c_skip, c_skip_edm = sd**2 / ((s - lo) ** 2 + sd**2), sd**2 / (s**2 + sd**2)
    a = float(cm.schedule.alpha(0.5 * cm.schedule.t_max))
    want = c_skip * x / a + (s - lo) / s * (x0_hat - c_skip_edm * x / a)
    torch.testing.assert_close(cm(x, t)[0], want, rtol=1e-5, atol=1e-5)
    # ... which is x0_hat up to O(sigma_min / s) times |x~|
    gap = (cm(x, t)[0] - x0_hat).abs().max()
    assert gap <= 4 * lo / s * (x / a).abs().max() + 1e-5, (gap, lo, s)


def _gaussian_denoiser(schedule, mu, std):
    """The exact denoiser of N(mu, std^2) data: E[x0 | x_t] on any affine path."""

    class Exact:
        def __init__(self):
            self.schedule = schedule

        def __call__(self, x_t, t, y=None):
            t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
            a = schedule.alpha(t).reshape(-1, 1).to(x_t)
            s = sigma_of(schedule, t).reshape(-1, 1).to(x_t)
            x0 = mu + std**2 / (std**2 + s**2) * (x_t / a - mu)
            return x0, (x_t - a * x0) / (a * s)

    return Exact()


@pytest.mark.parametrize("name", ["edm", "linear", "ve"])
def test_the_closed_form_is_the_end_of_the_probability_flow(name):
    schedule, mu, std = SCHEDULES[name](), 0.7, 0.4
    exact = _gaussian_denoiser(schedule, mu, std)
    t0 = float(t_of_sigma(schedule, 5.0))
    x_t = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = float(schedule.alpha(t0)) * (mu + math.sqrt(std**2 + 25.0) * x_t)
    grid = t_of_sigma(schedule, karras(120, noise_range(schedule)[0], 5.0).flip(0))
    end = sample_heun(exact, x_t, grid.double())  # the ODE from sigma = 5 down to sigma_min
    alpha_min = float(schedule.alpha(schedule.t_min))
    want = gaussian_consistency(x_t, t0, schedule, mu, std)
    torch.testing.assert_close(end / alpha_min, want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["edm", "linear"])
def test_the_exact_consistency_function_samples_the_data_in_one_step(name):
    schedule, mu, std = SCHEDULES[name](), 0.7, 0.4

    class Exact:
        consistency = True
        sigma_min, sigma_max = noise_range(schedule)

        def __init__(self):
            self.schedule = schedule

        def __call__(self, x_t, t, y=None):
            return gaussian_consistency(x_t, t[0].item(), schedule, mu, std).float(), x_t

    ts = torch.tensor([schedule.t_max, 0.0], dtype=torch.float64)
    x = generate(sample_consistency, Exact(), 8000, (2,), ts, seed=3)
    spread = math.sqrt(std**2 + Exact.sigma_min**2)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(spread, rel=0.02)
    ts2 = torch.tensor([schedule.t_max, float(t_of_sigma(schedule, 0.8)), 0.0])
    x2 = generate(sample_consistency, Exact(), 8000, (2,), ts2.double(), seed=3)
    assert x2.std().item() == pytest.approx(spread, rel=0.02)  # renoised and mapped back


def test_curricula_equal_their_formulas():
    K = 1000
    # CT (Song et al. 2023, App. C): N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1,
    # rising from s0 to s1 + 1 as a square root. By hand, s0 = 2, s1 = 150: k = 0 gives
    # ceil(sqrt(4) - 1) + 1 = 2; k = 250 gives 0.25 (151^2 - 2^2) + 2^2 = 5703.25, between
    # 75^2 = 5625 and 76^2 = 5776, so sqrt = 75.5.. and N = 75 + 1 = 76; k = K gives 151^2, N = 151
    assert [ct_steps(k, K, 2, 150) for k in (0, 250, 1000)] == [2, 76, 151]
    # ceil(y - 1) + 1 = ceil(y), so N(k) is the least integer N with N^2 >= that radicand; in
    # integers (times K), with no square root or rounding:
    for s0, s1, K_ in ((2, 150, 1000), (10, 1280, 400_000), (2, 200, 7)):
        for k in sorted({*range(0, K_ + 1, max(K_ // 500, 1)), K_ - 1, K_}):
            radicand_K = k * ((s1 + 1) ** 2 - s0**2) + s0**2 * K_
            n = math.isqrt(radicand_K // K_)  # within one of the answer
            least = next(m for m in (n, n + 1, n + 2) if m * m * K_ >= radicand_K)
            assert ct_steps(k, K_, s0, s1) == least, (s0, s1, K_, k)
    assert ct_decay(0, K, 2, 150, 0.9) == pytest.approx(0.9)
    assert ct_decay(K, K, 2, 150, 0.9) == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    # iCT (Song & Dhariwal 2023, eq. 9): K' = floor(1000 / 8) = 125, doubling 10 -> 1280
    got = [ict_steps(k, K, 10, 1280) for k in (0, 124, 125, 250, 874, 875, 999)]
    assert got == [11, 11, 21, 41, 641, 1281, 1281]
    steps = [ict_steps(k, K, 10, 1280) for k in range(K)]
    assert all(a <= b for a, b in itertools.pairwise(steps))
    sig = karras(18, 0.002, 80.0)
    assert sig[0].item() == pytest.approx(0.002) and sig[-1].item() == pytest.approx(80.0)
    rho = sig ** (1 / 7)
    torch.testing.assert_close(rho.diff(), torch.full((17,), rho.diff()[0].item()).double())


def test_the_discretised_lognormal_sums_to_one_and_is_sampled_by_its_cdf():
    sig = karras(1281, 0.002, 80.0)
    p = lognormal_weights(sig, -1.1, 2.0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12) and (p >= 0).all()
    # unnormalised mass: the normal CDF differences of ln sigma
    cdf = 0.5 * (1 + torch.erf((torch.log(sig) + 1.1) / (2.0 * math.sqrt(2))))
    torch.testing.assert_close(p, cdf.diff() / (cdf[-1] - cdf[0]))
    i = interval_index(torch.rand(200_000, generator=torch.Generator().manual_seed(0)), p)
    freq = torch.bincount(i, minlength=len(p)).double() / len(i)
    top = p.argmax()
    assert freq[top].item() == pytest.approx(p[top].item(), rel=0.1)
    assert int(i.min()) >= 0 and int(i.max()) <= len(p) - 1


def test_pseudo_huber_tends_to_the_squared_and_the_absolute_distance():
    d = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    norm = d.norm(dim=1)
    torch.testing.assert_close(pseudo_huber(d, 0.0), norm)
    torch.testing.assert_close(pseudo_huber(d, 1e4), norm**2 / 2e4, rtol=1e-3, atol=0)
    big = 1e3 * d  # ||d|| >> c: ||d|| - c
    torch.testing.assert_close(pseudo_huber(big, 0.5), big.norm(dim=1) - 0.5, rtol=1e-6, atol=0)


def _model(loss, *extra, dim=2):
    small = ["model.mlp.width=32", "model.mlp.depth=1"]
    cfg = apply_overrides(preset("toy2d-ct"), [f"train.loss={loss}", *small, *extra])
    torch.manual_seed(0)
    model = build.build_model(cfg, DataKind((dim,)))
    return model, build.build_loss(cfg, model.schedule)


def test_ect_with_r_zero_is_the_denoising_loss():
    # ect_k large: r(t) < 0 for every t, so the target is the data and lambda = 1 / t
    model, loss = _model("ect", "consistency.ect_k=1e6", "consistency.init_from_teacher=false")
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    n, eps = loss.draw(x0.shape, torch.Generator().manual_seed(1))
    got, _ = loss(model, x0, None, noise=(n, eps), step=0)
    s = torch.exp(-1.1 + 2.0 * n.double()).clamp(*noise_range(model.schedule))
    t = t_of_sigma(model.schedule, s).float()
    x_t = x0 + model.schedule.sigma(t.double()).float()[:, None] * eps
    f, _ = model.denoiser(x_t, t)
    want = pseudo_huber(f - x0, 0.00054 * math.sqrt(2)) / s.float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (ect_r(s, 0, 2.0, 1e6, 1.0) == 0).all()
    r = ect_r(torch.tensor([1.0, 10.0]), 20, 2.0, 8.0, 1.0)  # late stages: r -> t
    assert ((r > 0.99 * torch.tensor([1.0, 10.0])) & (r < torch.tensor([1.0, 10.0]))).all()


def test_ict_loss_is_the_weighted_pseudo_huber_of_adjacent_levels():
    model, loss = _model("ict")
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    u, eps = loss.draw(x0.shape, torch.Generator().manual_seed(2))
    got, _ = loss(model, x0, None, noise=(u, eps), step=0)
    sig = karras(11, *noise_range(model.schedule))
    i = interval_index(u, lognormal_weights(sig, -1.1, 2.0))
    f = [model.denoiser(x0 + s.float()[:, None] * eps, s.float())[0] for s in (sig[i + 1], sig[i])]
    want = pseudo_huber(f[0] - f[1], 0.00054 * math.sqrt(2)) / (sig[i + 1] - sig[i]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["edm", "linear"])
def test_multistep_sampling_costs_one_call_per_step(name):
    cm = _cm(name)
    calls = []
    inner = cm.net

    def counting(x, t, y=None):
        calls.append(len(x))
        return inner(x, t, y)

    cm = cm.with_net(counting)
    for steps in (1, 2, 4):
        calls.clear()
        ts = torch.linspace(cm.schedule.t_max, cm.schedule.t_min, steps).double()
        ts = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
        x = sample_consistency(cm, torch.randn(8, 2), ts, generator=SampleNoise(0))
        assert len(calls) == steps and x.shape == (8, 2)
