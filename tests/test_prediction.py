import pytest
import torch

from difflab import schedules
from difflab.prediction import Denoiser, split_raw, target_of


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_conversions_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(64, 3, generator=g, dtype=torch.float64),
        torch.randn(64, 3, generator=g, dtype=torch.float64),
    )
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s = schedules.CosineSchedule()
    alpha, sigma = s.alpha(t)[:, None], s.sigma(t)[:, None]
    x_t = alpha * x0 + sigma * eps
    x0_hat, eps_hat = split_raw(target_of(kind, x0, eps, alpha, sigma), x_t, alpha, sigma, kind)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_v_definition():
    # Salimans & Ho 2022: v = alpha eps - sigma x0, and x0 = alpha x_t - sigma v
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    x0, eps = torch.tensor([1.0]), torch.tensor([2.0])
    v = target_of("v", x0, eps, alpha, sigma)
    assert float(v) == pytest.approx(0.6 * 2 - 0.8 * 1)
    x_t = alpha * x0 + sigma * eps
    assert float(alpha * x_t - sigma * v) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_denoiser_recovers_truth_from_an_oracle_network(kind):
    s = schedules.linear()
    x0, eps = torch.randn(32, 2), torch.randn(32, 2)
    t = torch.rand(32) * 0.9 + 0.05
    alpha, sigma = s.alpha(t)[:, None].float(), s.sigma(t)[:, None].float()
    x_t = alpha * x0 + sigma * eps
    oracle = lambda x, tt, y: target_of(kind, x0, eps, alpha, sigma)  # noqa: E731
    x0_hat, eps_hat = Denoiser(oracle, s, kind)(x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


def test_clip_x0_keeps_the_pair_consistent():
    s = schedules.linear()
    t = torch.full((4,), 0.5)
    x_t = torch.randn(4, 2) * 3
    den = Denoiser(lambda x, tt, y: torch.full_like(x, 5.0), s, "x0", clip_x0=1.0)
    x0_hat, eps_hat = den(x_t, t)
    assert (x0_hat == 1.0).all()
    alpha, sigma = s.alpha(t)[:, None].float(), s.sigma(t)[:, None].float()
    torch.testing.assert_close(alpha * x0_hat + sigma * eps_hat, x_t)


def test_unknown_kind():
    with pytest.raises(ValueError, match="eps, x0, v"):
        Denoiser(lambda *a: None, schedules.linear(), "score")
