import pytest
import torch

from difflab.diffusion import schedules
from difflab.diffusion.prediction import Denoiser, split_raw, target_of


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


@pytest.mark.parametrize("schedule", [schedules.CosineSchedule(), schedules.EDMSchedule()])
def test_edm_preconditioning_round_trips_and_matches_karras(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(64, 3, generator=g, dtype=torch.float64) for _ in range(2))
    u = torch.rand(64, generator=g, dtype=torch.float64)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * (0.01 + 0.98 * u)
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    x_t = alpha * x0 + sigma * eps
    raw = target_of("edm", x0, eps, alpha, sigma, 0.5)
    x0_hat, eps_hat = split_raw(raw, x_t, alpha, sigma, "edm", 0.5)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    # Karras et al. 2022, Table 1, at s = sigma / alpha: D = c_skip x~ + c_out F.
    s = sigma / alpha
    c_skip, c_out = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(c_skip * x_t / alpha + c_out * raw, x0)


def test_edm_network_sees_scaled_input_and_log_sigma():
    seen = {}

    def net(x, t, y):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    s = schedules.EDMSchedule()
    x_t = torch.full((2, 1), 10.0)
    Denoiser(net, s, "edm", sigma_data=0.5)(x_t, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(seen["x"], x_t / (4 + 0.25) ** 0.5)  # c_in = 1/sqrt(s^2 + sd^2)
    torch.testing.assert_close(
        seen["t"], torch.full((2,), 0.25 * float(torch.log(torch.tensor(2.0))))
    )


def test_exploding_schedules_scale_the_input_and_refuse_v():
    seen = {}

    def net(x, t, y):
        seen["x"] = x
        return torch.zeros_like(x)

    s = schedules.VESchedule()
    t = torch.tensor([1.0])
    Denoiser(net, s, "eps")(torch.full((1, 1), 3.0), t)
    assert float(seen["x"]) == pytest.approx(3.0 / (1 + 50.0**2) ** 0.5)
    with pytest.raises(ValueError, match="variance-preserving"):
        Denoiser(net, s, "v")
