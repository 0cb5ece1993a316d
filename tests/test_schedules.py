import pytest
import torch

from difflab.diffusion import schedules

ALL = {
    "linear": schedules.linear(),
    "cosine": schedules.CosineSchedule(),
    "sigmoid": schedules.SigmoidSchedule(),
    "cosine-discrete": schedules.CosineSchedule().discretize(1000),
    "vp": schedules.VPSDESchedule(),
}
EXPLODING = {"ve": schedules.VESchedule(), "edm": schedules.EDMSchedule()}
T_GRID = torch.linspace(0.001, 0.99, 500, dtype=torch.float64)


@pytest.mark.parametrize("name", ALL)
def test_variance_preserving(name):
    s = ALL[name]
    torch.testing.assert_close(s.alpha(T_GRID) ** 2 + s.sigma(T_GRID) ** 2, torch.ones_like(T_GRID))


@pytest.mark.parametrize("name", ALL)
def test_log_snr_is_strictly_decreasing(name):
    lam = ALL[name].log_snr(T_GRID)
    assert (lam[1:] < lam[:-1]).all()


@pytest.mark.parametrize("name", ALL)
def test_log_snr_inverse_round_trips(name):
    s = ALL[name]
    t = torch.linspace(0.01, 0.98, 97, dtype=torch.float64)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, atol=1e-6, rtol=0)


def test_linear_table_is_ddpm():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    s = schedules.linear()
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    # the continuous view is exact on the grid t = i / T and has alpha_bar(0) = 1
    i = torch.tensor([1, 2, 500, 1000])
    torch.testing.assert_close(s.alpha_bar(i / 1000.0), torch.cumprod(1 - betas, 0)[i - 1])
    assert float(s.alpha_bar(0.0)) == 1.0


def test_discretize_matches_the_continuous_schedule_on_its_grid():
    cos = schedules.CosineSchedule()
    d = cos.discretize(100)
    t = torch.arange(1, 100, dtype=torch.float64) / 100
    torch.testing.assert_close(d.alpha_bar(t), cos.alpha_bar(t))


def test_cosine_closed_form():
    # Nichol & Dhariwal eq. 17 at t = 0.5 with s = 0.008
    import math

    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(schedules.CosineSchedule().alpha_bar(0.5)) == pytest.approx(
        f(0.5) / f(0.0), rel=1e-12
    )


def test_q_sample_moments():
    s = schedules.linear()
    x0 = torch.full((200000, 1), 0.7)
    t = torch.full((200000,), 0.3)
    x_t = s.q_sample(x0, t, torch.randn(200000, 1, generator=torch.Generator().manual_seed(0)))
    assert float(x_t.mean()) == pytest.approx(0.7 * float(s.alpha(0.3)), abs=0.005)
    assert float(x_t.std()) == pytest.approx(float(s.sigma(0.3)), abs=0.005)


@pytest.mark.parametrize(
    "kwargs", [dict(beta_start=-1e-4), dict(beta_end=1.5), dict(beta_start=0.03), dict(num_steps=0)]
)
def test_bad_linear_parameters_are_refused(kwargs):
    with pytest.raises(ValueError, match=r"beta|num_steps"):
        schedules.linear(**kwargs)


def test_vp_sde_is_the_limit_of_the_ddpm_table():
    # beta_i ~ beta(i / T) / T with beta(t) = 0.1 + 19.9 t is DDPM's linear table (Song et al.
    # 2021, App. B), so the continuous VP SDE and the 1000-step table agree to O(beta^2).
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    abar_sde = schedules.VPSDESchedule().alpha_bar(t)
    abar_table = schedules.linear().alpha_bar(t)
    assert float((abar_sde - abar_table).abs().max()) < 2e-3
    assert float((abar_sde - schedules.CosineSchedule().alpha_bar(t)).abs().max()) > 0.1


@pytest.mark.parametrize("name", EXPLODING)
def test_exploding_schedules(name):
    s = EXPLODING[name]
    t = torch.linspace(s.t_min, s.t_max, 200, dtype=torch.float64)
    assert (s.alpha(t) == 1).all()
    assert float(s.sigma(0.0)) == 0.0  # the last sampler step lands on clean data
    assert float(s.sigma(s.t_min)) == pytest.approx(s.sigma_min, rel=1e-3)
    assert float(s.sigma(s.t_max)) == pytest.approx(s.sigma_max)
    torch.testing.assert_close(s.log_snr(t), -2 * torch.log(s.sigma(t)))
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, atol=1e-9, rtol=1e-9)
    assert s.prior_std(s.t_max) == pytest.approx((1 + s.sigma_max**2) ** 0.5)


def test_ve_is_geometric_and_edm_time_is_sigma():
    ve = schedules.VESchedule(0.01, 50.0)
    assert float(ve.sigma(0.5)) == pytest.approx((0.01 * 50.0) ** 0.5)  # geometric mean
    assert float(schedules.EDMSchedule().sigma(3.7)) == pytest.approx(3.7)


def test_continuous_only_schedules_refuse_a_table():
    with pytest.raises(ValueError, match="num_steps=0"):
        schedules.EDMSchedule().discretize(1000)


def test_discrete_inverse_is_exact_between_table_steps():
    # log alpha_bar is linear between steps, so the inverse has a closed form per interval;
    # it must agree with the generic bisection and be exact to rounding.
    s = schedules.linear()
    t = torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = s.t_min + (1 - s.t_min) * t
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, atol=1e-12, rtol=0)
    generic = schedules.Schedule.t_from_log_snr(s, s.log_snr(t))
    torch.testing.assert_close(generic, t, atol=1e-9, rtol=0)
