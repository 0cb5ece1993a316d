"""The foreign-model adapter, and difflab's solvers against diffusers' schedulers on one model.

diffusers is the reference implementation here: on the same eps-model, the same table and the
same trailing timesteps, difflab's DDIM, DPM-Solver++(2M) and UniPC-2 must land where diffusers'
DDIMScheduler, DPMSolverMultistepScheduler and UniPCMultistepScheduler do.
"""

import pytest
import torch

from difflab.diffusion import schedules
from difflab.diffusion.adapters import betas_from_config, foreign_denoiser
from difflab.samplers import (
    sample_ddim,
    sample_dpmpp_2m,
    sample_unipc,
    timesteps,
)
from gaussian import GaussianDenoiser, pf_endpoint

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
S = torch.tensor([0.4, 0.7], dtype=torch.float64)
LINEAR = schedules.linear()
EXACT = GaussianDenoiser(LINEAR, MU, S)


def eps_model(x, timestep):
    """The exact eps-predictor for Gaussian data, called the diffusers way (timestep 0..T-1)."""
    t = (torch.as_tensor(timestep, dtype=torch.float64) + 1) / LINEAR.num_steps
    return EXACT(x, t.reshape(-1).expand(x.shape[0]))[1]


def x0_model(x, timestep):
    t = (torch.as_tensor(timestep, dtype=torch.float64) + 1) / LINEAR.num_steps
    return EXACT(x, t.reshape(-1).expand(x.shape[0]))[0]


X_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_scheduler_configs_give_the_known_tables():
    torch.testing.assert_close(betas_from_config({"beta_schedule": "linear"}), LINEAR.betas)
    scaled = betas_from_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    assert float(scaled[0]) == pytest.approx(0.00085) and float(scaled[-1]) == pytest.approx(0.012)
    cosine = schedules.DiscreteSchedule(betas_from_config({"beta_schedule": "squaredcos_cap_v2"}))
    t = torch.arange(10, 900, 10, dtype=torch.float64) / 1000  # on the table's grid
    torch.testing.assert_close(
        cosine.alpha_bar(t), schedules.CosineSchedule().alpha_bar(t), rtol=1e-9, atol=0
    )
    with pytest.raises(ValueError, match="give the betas directly"):
        betas_from_config({"beta_schedule": "exotic"})


@pytest.mark.parametrize(("model", "kind"), [(eps_model, "epsilon"), (x0_model, "sample")])
def test_foreign_model_samples_like_the_native_denoiser(model, kind):
    den = foreign_denoiser(model, scheduler_config={"prediction_type": kind})
    ts = timesteps(den.schedule, 200, "trailing")
    out = sample_ddim(den, X_T, ts)
    assert float((out - pf_endpoint(LINEAR, MU, S, X_T, 1.0)).norm(dim=1).mean()) < 0.02
    torch.testing.assert_close(out, sample_ddim(EXACT, X_T, ts), atol=1e-5, rtol=0)


def test_adapter_refuses_ambiguous_or_unknown_input():
    with pytest.raises(ValueError, match="exactly one"):
        foreign_denoiser(eps_model)
    with pytest.raises(ValueError, match="prediction_type"):
        foreign_denoiser(eps_model, scheduler_config={"prediction_type": "banana"})
    den = foreign_denoiser(eps_model, betas=LINEAR.betas)
    with pytest.raises(ValueError, match="class_labels"):
        den(X_T, torch.full((64,), 0.5), torch.zeros(64, dtype=torch.long))


def _diffusers_run(scheduler, steps):
    scheduler.set_timesteps(steps)
    x = X_T.clone()
    for timestep in scheduler.timesteps:
        x = scheduler.step(eps_model(x, timestep), timestep, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [5, 10])
def test_solvers_match_diffusers_schedulers(steps):
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is a dev extra: pip install -e '.[dev]'"
    )
    den = foreign_denoiser(eps_model, betas=LINEAR.betas, prediction="eps")
    ts = timesteps(den.schedule, steps, "trailing")  # = diffusers' trailing timesteps + 1
    common = dict(num_train_timesteps=1000, timestep_spacing="trailing")
    pairs = {
        "ddim": (
            sample_ddim(den, X_T, ts),
            diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common),
        ),
        "dpmpp_2m": (
            sample_dpmpp_2m(den, X_T, ts),
            diffusers.DPMSolverMultistepScheduler(
                algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **common
            ),
        ),
        "unipc": (
            sample_unipc(den, X_T, ts),
            diffusers.UniPCMultistepScheduler(solver_order=2, final_sigmas_type="zero", **common),
        ),
    }
    for name, (ours, scheduler) in pairs.items():
        theirs = _diffusers_run(scheduler, steps)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=name)
