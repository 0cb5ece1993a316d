"""Samplers against closed-form Gaussian answers (see gaussian.py)."""

import itertools
import math

import pytest
import torch

from difflab.diffusion import schedules
from difflab.samplers import (
    Recorder,
    SampleNoise,
    discrete_timesteps,
    generate,
    sample_ddim,
    sample_ddpm,
    timesteps,
)
from gaussian import GaussianDenoiser, pf_endpoint

MU = torch.tensor([0.5, -0.3])
S = torch.tensor([0.4, 0.7])
SCHEDULES = {
    "linear": schedules.linear(),
    "cosine": schedules.CosineSchedule(),
    "sigmoid": schedules.SigmoidSchedule(),
}


def _errors(schedule, sampler, steps_list, spacing="linspace"):
    den = GaussianDenoiser(schedule, MU, S)
    x_T = SampleNoise(3).randn((256, 2), 0, dtype=torch.float64)
    errors = []
    for n in steps_list:
        ts = timesteps(schedule, n, spacing)
        exact = pf_endpoint(schedule, MU, S, x_T, float(ts[0]))
        out = sampler(den, x_T, ts)
        errors.append(float((out - exact).norm(dim=1).mean()))
    return errors


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_ddim_converges_at_first_order(name):
    # DDIM with eta = 0 is a first-order ODE solver: doubling the steps halves the error.
    errors = _errors(
        SCHEDULES[name],
        sample_ddim,
        [25, 50, 100, 200],
        "linspace" if name == "linear" else "uniform",
    )
    orders = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert errors[-1] < 0.02
    assert all(0.8 < p < 1.2 for p in orders), (errors, orders)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_reproduces_mean_and_std(variance):
    schedule = SCHEDULES["linear"]
    den = GaussianDenoiser(schedule, MU, S)
    n = 20000
    out = generate(
        sample_ddpm,
        den,
        n,
        (2,),
        timesteps(schedule, 1000),
        seed=5,
        batch_size=n,
        variance=variance,
    )
    se_mean = S / math.sqrt(n)
    assert ((out.mean(0) - MU).abs() < 4 * se_mean).all(), out.mean(0)
    # std of a sample std is about s / sqrt(2n); "large" adds a little extra variance by design
    assert (
        (out.std(0) - S).abs() < 4 * S / math.sqrt(2 * n) + (0.01 if variance == "large" else 0)
    ).all()


def test_ddim_eta_one_reproduces_distribution():
    schedule = SCHEDULES["cosine"]
    den = GaussianDenoiser(schedule, MU, S)
    n = 20000
    out = generate(
        sample_ddim, den, n, (2,), timesteps(schedule, 200), seed=2, batch_size=n, eta=1.0
    )
    assert ((out.mean(0) - MU).abs() < 4 * S / math.sqrt(n)).all()
    assert ((out.std(0) - S).abs() < 0.02).all()


def test_ddim_inversion_round_trips():
    schedule = SCHEDULES["cosine"]
    den = GaussianDenoiser(schedule, MU, S)
    x0 = MU + S * SampleNoise(9).randn((128, 2), 0, dtype=torch.float64)
    gaps = []
    for n in (50, 400):
        ts = timesteps(schedule, n, "uniform")
        x_T = sample_ddim(den, x0, ts.flip(0))  # data -> noise
        gaps.append(float((sample_ddim(den, x_T, ts) - x0).norm(dim=1).mean()))
    # first order: 8x the steps gives about 1/8 the round-trip gap
    assert gaps[1] < gaps[0] / 6 and gaps[1] < 0.01, gaps


def test_samples_do_not_depend_on_batch_size():
    schedule = SCHEDULES["linear"]
    den = GaussianDenoiser(schedule, MU, S)
    ts = timesteps(schedule, 20)
    a = generate(sample_ddpm, den, 50, (2,), ts, seed=4, batch_size=7)
    b = generate(sample_ddpm, den, 50, (2,), ts, seed=4, batch_size=50)
    c = generate(sample_ddpm, den, 50, (2,), ts, seed=5, batch_size=50)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)


def test_callback_records_every_step():
    schedule = SCHEDULES["linear"]
    den = GaussianDenoiser(schedule, MU, S)
    rec = Recorder()
    ts = timesteps(schedule, 10)
    out = sample_ddim(den, SampleNoise(0).randn((16, 2), 0), ts, callback=rec)
    assert len(rec.xs) == 10 and len(rec.x0_hats) == 10 and rec.ts == [float(t) for t in ts[:-1]]
    traj = rec.trajectory()
    assert traj.shape == (11, 16, 2)
    torch.testing.assert_close(traj[-1], out)
    torch.testing.assert_close(rec.x0_hats[-1], out)  # the last step to t = 0 returns x0_hat


def test_discrete_spacings_match_their_definitions():
    # i = 1..T; diffusers' 0-based equivalents (Lin et al. 2024, Table 2) plus one.
    assert discrete_timesteps(1000, 10, "leading").tolist() == list(range(901, 0, -100))
    assert discrete_timesteps(1000, 10, "trailing").tolist() == list(range(1000, 0, -100))
    assert discrete_timesteps(1000, 4, "linspace").tolist() == [1000, 667, 334, 1]
    assert discrete_timesteps(1000, 1000, "trailing").tolist() == list(range(1000, 0, -1))


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_bad_step_counts_are_refused(steps):
    with pytest.raises(ValueError, match="steps"):
        timesteps(SCHEDULES["linear"], steps)


def test_non_finite_model_output_names_the_step():
    from difflab.diffusion.prediction import Denoiser
    from difflab.samplers import NonFiniteError

    schedule = SCHEDULES["linear"]
    den = Denoiser(lambda x, t, y: torch.where(t[:, None] < 0.5, torch.nan, 0.0) * x, schedule)
    # trailing grid 1.0, 0.9, ..., 0.1: the first t below 0.5 is 0.4, step 6
    with pytest.raises(NonFiniteError, match=r"step 6 \(t = 0.4000\)"):
        sample_ddim(den, torch.randn(4, 2), timesteps(schedule, 10, "trailing"))


def test_t_end_moves_the_last_nonzero_time_and_is_checked():
    schedule = SCHEDULES["linear"]
    for spacing in ("logsnr", "karras"):
        ts = timesteps(schedule, 10, spacing, t_end=0.01)
        assert float(ts[-2]) == pytest.approx(0.01) and float(ts[-1]) == 0.0
        assert float(ts[0]) == 1.0 and (ts[1:] < ts[:-1]).all()
    with pytest.raises(ValueError, match="t_end must lie in"):
        timesteps(schedule, 10, "logsnr", t_end=1.5)
