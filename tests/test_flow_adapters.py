"""A flow model trained elsewhere (diffusers' FlowMatchEulerDiscreteScheduler convention) driven
by difflab's solvers, against diffusers' own scheduler step on the same model."""

import pytest
import torch

from difflab.diffusion import schedules
from difflab.diffusion.adapters import foreign_denoiser
from difflab.samplers import sample_ddim, sample_dpmpp_2m, sample_heun, timesteps
from gaussian import GaussianDenoiser, pf_solution

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
S = torch.tensor([0.4, 0.7], dtype=torch.float64)
PATH = schedules.RectifiedFlowSchedule()
EXACT = GaussianDenoiser(PATH, MU, S)


def flow_model(x, timestep):
    """The exact velocity eps - x0 for Gaussian data, called the diffusers way (sigma * 1000)."""
    t = (torch.as_tensor(timestep, dtype=torch.float64) / 1000).reshape(-1).expand(x.shape[0])
    x0_hat, eps_hat = EXACT(x.double(), t)
    return (eps_hat - x0_hat).to(x.dtype)


X_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _diffusers_euler(scheduler, steps):
    scheduler.set_timesteps(steps)
    x = X_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(flow_model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ddim_on_the_schedulers_sigmas_is_its_euler_step(shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs = _diffusers_euler(scheduler, 12)
    den = foreign_denoiser(flow_model, scheduler_config=scheduler.config)
    assert den.kind == "velocity" and isinstance(den.schedule, schedules.RectifiedFlowSchedule)
    ours = sample_ddim(den, X_T.clone(), scheduler.sigmas.double())
    assert torch.allclose(ours, theirs.double(), atol=1e-5)
    # difflab's shift is diffusers': its base grid runs from 1 to the shifted 1 / T
    end = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    base = torch.linspace(1.0, end, 12, dtype=torch.float64)
    assert torch.allclose(
        scheduler.sigmas[:-1].double(), shift * base / (1 + (shift - 1) * base), atol=1e-6
    )


def test_higher_order_difflab_solvers_beat_the_schedulers_euler_on_the_foreign_flow():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    den = foreign_denoiser(flow_model, scheduler_config=dict(scheduler.config))
    ts = timesteps(den.schedule, 10, "uniform")
    exact = pf_solution(PATH, MU, S, X_T, float(ts[0]), 0.0)
    euler_error = float((_diffusers_euler(scheduler, 10).double() - exact).norm(dim=1).mean())
    for sampler in (sample_heun, sample_dpmpp_2m):
        error = float((sampler(den, X_T.clone(), ts) - exact).norm(dim=1).mean())
        assert error < euler_error / 3, (sampler.__name__, error, euler_error)


def test_flow_configs_that_cannot_be_followed_are_refused():
    config = dict(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="dynamic"):
        foreign_denoiser(flow_model, scheduler_config=config)
    with pytest.raises(ValueError, match="velocity"):
        foreign_denoiser(flow_model, scheduler_config={"prediction_type": "flow"}, prediction="eps")
    den = foreign_denoiser(flow_model, scheduler_config={"prediction_type": "flow_prediction"})
    assert den.kind == "velocity"
