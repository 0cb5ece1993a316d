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
    # doubled batch, and scale 1 reproduces the conditional model exactly.
    calls = []

    def counting(x, t, y):
        calls.append(len(x))
        return _net(x, t, y)

    schedule = schedules.linear()
    scfg = SampleConfig(sampler=name, steps=4, spacing="logsnr")
    fn, options, ts = build.build_sampler(scfg, schedule)
    x_T, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    # the consistency sampler takes consistency models only: the same net, parameterised so
    wrap = ConsistencyDenoiser if name == "consistency" else (lambda den: den)
    den = wrap(Denoiser(counting, schedule, "v"))
    out = fn(guided(den, 2.5, LABELS), x_T, ts, y=y, generator=0, **options)
    assert torch.isfinite(out).all() and set(calls) == {12}
    cond = fn(wrap(Denoiser(_net, schedule, "v")), x_T, ts, y=y, generator=0, **options)
    plain = guided(wrap(Denoiser(_net, schedule, "v")), 1.0, LABELS)
    torch.testing.assert_close(fn(plain, x_T, ts, y=y, generator=0, **options), cond)
