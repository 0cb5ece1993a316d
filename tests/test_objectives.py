import pytest
import torch

from difflab.diffusion import schedules
from difflab.diffusion.objectives import LossSpec, diffusion_loss, sample_t, space_weight
from difflab.diffusion.prediction import Denoiser


def _net(x, t, y):
    return torch.sin(3 * x) * t[:, None] + 0.1  # any fixed function will do


def _loss(kind, **spec):
    den = Denoiser(_net, schedules.CosineSchedule(), kind)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    return diffusion_loss(den, x0, None, LossSpec(**spec), torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_same_weighting_means_the_same_loss_in_every_space(kind):
    # An x0-space weighting is one objective whatever space it is measured in (MSE).
    ref, t_ref = _loss(kind, target="x0", weighting="min_snr")
    for target in ("eps", "v"):
        other, t = _loss(kind, target=target, weighting="min_snr")
        torch.testing.assert_close(t, t_ref)
        torch.testing.assert_close(other, ref, rtol=1e-4, atol=1e-6)


def test_snr_weighting_in_x0_space_is_plain_eps_mse():
    a, _ = _loss("eps", target="x0", weighting="snr")
    b, _ = _loss("eps", target="eps", weighting="none")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    spec = LossSpec(weighting="min_snr", min_snr_gamma=5.0)
    torch.testing.assert_close(space_weight(spec, "eps", snr), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(space_weight(spec, "x0", snr), torch.tensor([0.5, 5.0, 5.0]))
    torch.testing.assert_close(
        space_weight(spec, "v", snr), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51])
    )


def test_loss_types():
    den = Denoiser(lambda x, t, y: torch.zeros_like(x), schedules.linear(), "x0")
    x0 = torch.full((8, 1), 0.5)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(
        diffusion_loss(den, x0, None, LossSpec(loss="mse"), g)[0], torch.tensor(0.25)
    )
    assert torch.allclose(
        diffusion_loss(den, x0, None, LossSpec(loss="l1"), g)[0], torch.tensor(0.5)
    )
    huber = diffusion_loss(den, x0, None, LossSpec(loss="huber", huber_delta=0.1), g)[0]
    assert torch.allclose(huber, torch.tensor(0.1 * (0.5 - 0.05)))


def test_discrete_t_is_on_the_grid_and_stratified_covers_it():
    s = schedules.linear(100)
    t = sample_t(s, 1000, "uniform", torch.Generator().manual_seed(0))
    steps = t * 100
    torch.testing.assert_close(steps, steps.round())
    assert steps.min() >= 1 and steps.max() <= 100
    strat = sample_t(s, 100, "stratified", torch.Generator().manual_seed(0))
    assert sorted((strat * 100).round().long().tolist()) == list(range(1, 101))


def test_bad_spec():
    with pytest.raises(ValueError, match="weighting"):
        LossSpec(weighting="p2")
    with pytest.raises(ValueError, match="loss"):
        LossSpec(loss="l3")


def test_edm_weighting_is_plain_mse_of_the_preconditioned_output():
    # EDM's lambda(sigma) c_out(sigma)^2 = 1 (Karras et al. 2022, eq. 8 and Table 1): an
    # edm-kind network trained with x0-space weight "edm" measured in x0 space has the same
    # loss as the plain MSE of its own output.
    def loss(**spec):
        den = Denoiser(_net, schedules.EDMSchedule(), "edm", sigma_data=0.5)
        x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
        spec = LossSpec(t_sampling="lognormal", sigma_data=0.5, **spec)
        return diffusion_loss(den, x0, None, spec, torch.Generator().manual_seed(7))

    a, t_a = loss(target="x0", weighting="edm")
    b, t_b = loss(weighting="none")
    torch.testing.assert_close(t_a, t_b)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lognormal_t_sampling_has_the_edm_sigma_distribution():
    s = schedules.EDMSchedule()
    t = sample_t(s, 50000, "lognormal", torch.Generator().manual_seed(0), lognormal=(-1.2, 1.2))
    log_sigma = torch.log(s.sigma(t.double()))
    inside = (t > s.t_min) & (t < s.t_max)  # clamping only touches the far tails
    assert float(inside.float().mean()) > 0.99
    assert float(log_sigma[inside].mean()) == pytest.approx(-1.2, abs=0.03)
    assert float(log_sigma[inside].std()) == pytest.approx(1.2, abs=0.03)
    discrete = schedules.linear()
    td = sample_t(discrete, 1000, "lognormal", torch.Generator().manual_seed(0))
    steps = td.double() * discrete.num_steps
    torch.testing.assert_close(steps, steps.round())  # on the trained grid
