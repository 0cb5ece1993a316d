import pytest
import torch

from difflab import build
from difflab.conditioners import ClassLabels, Unconditional
from difflab.config import SampleConfig
from difflab.diffusion import schedules
from difflab.diffusion.consistency import ConsistencyDenoiser
from difflab.diffusion.guidance import GuidedNet, guided
from difflab.diffusion.prediction import Denoiser
from difflab.samplers import SAMPLERS

NUM_CLASSES = 3
LABELS = ClassLabels(NUM_CLASSES)
SHIFT = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, -1.0], [0.2, 0.2]])  # last row: null label


def _net(x, t, y):
    return 0.5 * x + t[:, None] + SHIFT[y]  # raw = f(x, t) + g(y)


def test_scale_zero_is_unconditional_and_one_is_conditional():
    x, t, y = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    null = torch.full_like(y, NUM_CLASSES)
    torch.testing.assert_close(GuidedNet(_net, 0.0, LABELS)(x, t, y), _net(x, t, null))
    torch.testing.assert_close(GuidedNet(_net, 1.0, LABELS)(x, t, y), _net(x, t, y))


def test_guidance_extrapolates_linearly_in_one_call():
    calls = []

    def counting(x, t, y):
        calls.append(len(x))
        return _net(x, t, y)

    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 2])
    out = GuidedNet(counting, 3.0, LABELS)(x, t, y)
    expected = _net(x, t, y) + 2.0 * (
        SHIFT[y] - SHIFT[NUM_CLASSES]
    )  # f + g(null) + 3 (g(y) - g(null))
    torch.testing.assert_close(out, expected)
    assert calls == [8]  # one doubled batch


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_guiding_raw_equals_guiding_x0_and_eps(kind):
    s = schedules.linear()
    x, t, y = torch.randn(6, 2), torch.full((6,), 0.4), torch.tensor([0, 1, 2, 0, 1, 2])
    den = Denoiser(_net, s, kind)
    x0_g, eps_g = guided(den, 2.5, LABELS)(x, t, y)
    x0_c, eps_c = den(x, t, y)
    x0_u, eps_u = den(x, t, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(x0_g, x0_u + 2.5 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_g, eps_u + 2.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


def test_guidance_refuses_unconditional_models_and_missing_labels():
    den = Denoiser(_net, schedules.linear(), "eps")
    with pytest.raises(ValueError, match="class-conditional"):
        guided(den, 2.0, Unconditional())
    with pytest.raises(ValueError, match="labels"):
        guided(den, 2.0, LABELS)(torch.randn(2, 2), torch.rand(2), None)
    with pytest.raises(ValueError, match=">= 0"):
        guided(den, -1.0, LABELS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_guided_with_one_call_per_evaluation(name):
    # Guidance is a denoiser wrapper, so every sampler takes it: each model evaluation is one
    # doubled batch, and scale 1 reproduces the conditional model exactly. A family's own
    # sampler (meanflow, shortcut) runs on its family's model: rectified, velocity, t2 read.
    calls = []
    family = SAMPLERS[name].family

    def net(x, t, y, t2=None):
        return _net(x, t, y) + (0.0 if t2 is None else t2[:, None])

    def counting(x, t, y, **t2):
        calls.append(len(x))
        return net(x, t, y, **t2)

    schedule = schedules.RectifiedFlowSchedule() if family else schedules.linear()
    kind, grid = (
        ("velocity", "shortcut:8" if family == "shortcut" else family) if family else ("v", "")
    )
    scfg = SampleConfig(sampler=name, steps=4, spacing="uniform" if family else "logsnr")
    fn, options, ts = build.build_sampler(scfg, schedule)
    x_T, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    # the consistency sampler takes consistency models only: the same net, parameterised so
    wrap = ConsistencyDenoiser if name == "consistency" else (lambda den: den)
    den = wrap(Denoiser(counting, schedule, kind, step_grid=grid))
    out = fn(guided(den, 2.5, LABELS), x_T, ts, y=y, generator=0, **options)
    assert torch.isfinite(out).all() and set(calls) == {12}
    cond = fn(
        wrap(Denoiser(net, schedule, kind, step_grid=grid)), x_T, ts, y=y, generator=0, **options
    )
    plain = guided(wrap(Denoiser(net, schedule, kind, step_grid=grid)), 1.0, LABELS)
    torch.testing.assert_close(fn(plain, x_T, ts, y=y, generator=0, **options), cond)


def _counting():
    calls = []

    def net(x, t, y):
        calls.append(len(x))
        return _net(x, t, y)

    return net, calls


def test_interval_guides_inside_and_is_conditional_outside_per_row():
    # Kynkäänniemi et al. 2024: w inside (s_lo, s_hi] of s = sigma / alpha, w = 1 outside.
    s = schedules.linear()
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
    level = s.sigma(t) / s.alpha(t)
    s_lo, s_hi = float(level[1]), float(level[3])  # rows 2 and 3 inside; row 1 on the open end
    x, y = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    net, calls = _counting()
    den = guided(Denoiser(net, s, "eps"), 2.0, LABELS, s_lo, s_hi)
    x0, _ = den(x, t, y)
    x0_c, _ = Denoiser(_net, s, "eps")(x, t, y)
    x0_g, _ = guided(Denoiser(_net, s, "eps"), 2.0, LABELS)(x, t, y)
    inside = torch.tensor([False, False, True, True, False])
    torch.testing.assert_close(x0[inside], x0_g[inside])
    torch.testing.assert_close(x0[~inside], x0_c[~inside])
    assert not torch.allclose(x0_g[~inside], x0_c[~inside])  # the test can tell them apart
    assert calls == [10]  # mixed rows: one doubled batch


def test_interval_outside_costs_one_undoubled_call_and_no_limit_above():
    s = schedules.linear()
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    low, high = torch.full((4,), 0.02), torch.full((4,), 0.9)
    net, calls = _counting()
    den = guided(Denoiser(net, s, "v"), 3.0, LABELS, 1.0, 0.0)  # (1, inf): high noise only
    out_low = den(x, low, y)
    assert calls == [4]
    for got, want in zip(out_low, Denoiser(_net, s, "v")(x, low, y), strict=True):
        torch.testing.assert_close(got, want)
    out_high = den(x, high, y)
    assert calls == [4, 8]
    plain = guided(Denoiser(_net, s, "v"), 3.0, LABELS)(x, high, y)
    for got, want in zip(out_high, plain, strict=True):
        torch.testing.assert_close(got, want)
    # guidance 0 (unconditional) inside the interval, conditional outside, as for any w
    uncond = guided(Denoiser(_net, s, "v"), 0.0, LABELS, 1.0, 0.0)
    torch.testing.assert_close(uncond(x, low, y)[0], Denoiser(_net, s, "v")(x, low, y)[0])
    null = torch.full_like(y, NUM_CLASSES)
    torch.testing.assert_close(uncond(x, high, y)[0], Denoiser(_net, s, "v")(x, high, null)[0])


@pytest.mark.parametrize("name", ["ddpm", "heun", "dpmpp_2m"])
def test_an_interval_holding_every_level_is_plain_guidance(name):
    # The same samples, bit for bit, as guidance everywhere, when (s_lo, s_hi] holds the grid.
    schedule = schedules.linear()
    scfg = SampleConfig(sampler=name, steps=6, spacing="logsnr")
    fn, options, ts = build.build_sampler(scfg, schedule)
    x_T, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    den = Denoiser(_net, schedule, "v")
    plain = fn(guided(den, 2.5, LABELS), x_T, ts, y=y, generator=0, **options)
    wide = fn(guided(den, 2.5, LABELS, 1e-6, 1e6), x_T, ts, y=y, generator=0, **options)
    torch.testing.assert_close(wide, plain, rtol=0, atol=0)
    none = fn(guided(den, 2.5, LABELS, 1e5, 1e6), x_T, ts, y=y, generator=0, **options)
    cond = fn(den, x_T, ts, y=y, generator=0, **options)
    torch.testing.assert_close(none, cond, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("lo", "hi", "match"),
    [(-1.0, 0.0, ">= 0"), (2.0, 1.0, "above"), (1.0, 1.0, "above"), (float("nan"), 0.0, "finite")],
)
def test_bad_intervals_are_refused_with_the_fix(lo, hi, match):
    den = Denoiser(_net, schedules.linear(), "eps")
    with pytest.raises(ValueError, match=match):
        guided(den, 2.0, LABELS, lo, hi)
