"""Editing (samplers/editing.py): SDEdit's start level, inpainting by replacement and RePaint,
checked against Gaussian data whose exact denoiser and conditionals are known, and through the
command line on a tiny trained image run."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.codecs import Identity
from difflab.config import ConfigError, apply_overrides, preset
from difflab.diffusion import schedules
from difflab.diffusion.consistency import ConsistencyDenoiser
from difflab.diffusion.prediction import Denoiser
from difflab.nets.mlp import MLP
from difflab.samplers import (
    SAMPLERS,
    Edit,
    SampleNoise,
    deterministic_samplers,
    generate,
    sample_ddpm,
    sampler_info,
    timesteps,
)
from difflab.samplers.editing import (
    check_edit,
    latent_mask,
    prepare,
    repaint_plan,
    sample_edited,
    start_grid,
)
from difflab.training.loop import train
from gaussian import MU, CorrelatedGaussianDenoiser, GaussianDenoiser, S

pytestmark = pytest.mark.usefixtures("one_thread")  # many small steps: one thread is faster
N = 256


def _draw(name, schedule, denoiser, edit, steps=10, spacing="uniform", seed=3, **options):
    """n samples of an edit through `prepare` and `generate`, as Model.sample draws them."""
    ts = timesteps(schedule, steps, spacing)
    n = len(edit.init)
    sampler, ts, rows = prepare(edit, sampler_info(name), schedule, Identity(), (2,), ts, n, "cpu")
    return generate(sampler, denoiser, n, (2,), ts, seed=seed, rows=rows, **options)


def _gaussian(schedule_name="linear"):
    schedule = {"linear": schedules.linear, "rectified": schedules.RectifiedFlowSchedule}[
        schedule_name
    ]()
    return schedule, GaussianDenoiser(schedule, MU, S)


def _init(n=N):
    return MU + S * torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


# ---- SDEdit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("schedule_name", ["linear", "rectified"])
def test_strength_one_is_the_fresh_sample_of_the_same_noise(name, schedule_name):
    schedule, denoiser = _gaussian(schedule_name)
    info = sampler_info(name)
    init = _init()
    ts = timesteps(schedule, 10, "uniform")
    fresh = generate(info.fn, denoiser, N, (2,), ts, seed=3)
    edited = _draw(name, schedule, denoiser, Edit(init, strength=1.0))
    assert torch.equal(edited, fresh)
    # and the init matters below 1
    assert not torch.allclose(_draw(name, schedule, denoiser, Edit(init, strength=0.5)), fresh)


@pytest.mark.parametrize(
    ("schedule_name", "strengths", "tolerance"),
    [("linear", (1e-1, 1e-2, 1e-3), 5e-2), ("rectified", (1e-2, 1e-4, 1e-6), 1e-4)],
)
def test_strength_to_zero_returns_the_input(schedule_name, strengths, tolerance):
    # One step from t_s = s t_max: x0_hat(alpha x + sigma eps) -> x as sigma -> 0, at the rate
    # of the exact denoiser's (alpha s^2 / var - 1) (x - mu) + alpha s^2 sigma eps / var (the
    # 1000-step table stops at its first step, t = 1 / 1000, sigma = 0.01).
    schedule, denoiser = _gaussian(schedule_name)
    init = _init()
    errors = [
        float((_draw("ddim", schedule, denoiser, Edit(init, strength=s)) - init).abs().max())
        for s in strengths
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < tolerance, errors
    # a level that rounds to t = 0 on a 1000-step table takes no step: the input bit for bit
    if schedule_name == "linear":
        assert torch.equal(_draw("ddpm", schedule, denoiser, Edit(init, strength=4e-4)), init)


def test_the_start_level_and_its_grid():
    schedule = schedules.linear()  # a 1000-step table: t_s rounds to i / 1000
    ts = timesteps(schedule, 10, "trailing")  # 1.0, 0.9, ..., 0.1, 0
    assert torch.equal(start_grid(schedule, ts, 1.0), ts)
    assert start_grid(schedule, ts, 0.6).tolist() == pytest.approx(
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0]
    )
    assert start_grid(schedule, ts, 0.6049).tolist()[:2] == pytest.approx([0.605, 0.6])
    assert start_grid(schedule, ts, 1e-4).tolist() == [0.0]


def test_sdedit_starts_at_the_level_with_the_samples_own_noise():
    # With the exact denoiser DDIM follows the probability-flow ODE, so from x_{t_s} =
    # alpha x + sigma eps its endpoint is the closed form (gaussian.pf_solution) of that start.
    from gaussian import pf_endpoint

    schedule, denoiser = _gaussian("rectified")
    init = _init()
    out = _draw("heun", schedule, denoiser, Edit(init, strength=0.5), steps=100)
    eps = SampleNoise(3).randn((N, 2), 0)
    t_s = 0.5 * schedule.t_max
    x_start = float(schedule.alpha(t_s)) * init + float(schedule.sigma(t_s)) * eps
    assert torch.allclose(out.double(), pf_endpoint(schedule, MU, S, x_start, t_s), atol=1e-3)


def test_a_consistency_run_takes_one_step_from_the_level():
    torch.manual_seed(0)
    schedule = schedules.EDMSchedule()
    cm = ConsistencyDenoiser(Denoiser(MLP(dim=2, width=32, depth=1), schedule, "edm"))
    init = _init(8)
    calls = []

    def counted(x_t, t, y=None):
        calls.append(float(t[0]))
        return cm(x_t, t, y)

    counted.schedule, counted.consistency = schedule, True
    counted.sigma_min, counted.sigma_max = cm.sigma_min, cm.sigma_max
    out = _draw("consistency", schedule, counted, Edit(init, strength=0.3), steps=1)
    assert calls == [pytest.approx(0.3 * schedule.t_max)]
    eps = SampleNoise(3).randn((8, 2), 0)
    alpha, sigma = float(schedule.alpha(calls[0])), float(schedule.sigma(calls[0]))
    expected, _ = cm(alpha * init + sigma * eps, torch.full((8,), calls[0]))
    assert torch.allclose(out, expected, atol=1e-6)


# ---- inpainting -----------------------------------------------------------------------------

MASK = torch.tensor([True, False])


@pytest.mark.parametrize("name", deterministic_samplers())
@pytest.mark.parametrize("schedule_name", ["linear", "rectified"])
def test_every_deterministic_sampler_keeps_known_values_bit_for_bit(name, schedule_name):
    schedule, denoiser = _gaussian(schedule_name)
    init = _init()
    edit = Edit(init, mask=MASK.expand(N, 2))
    out = _draw(name, schedule, denoiser, edit, spacing="logsnr")
    assert torch.equal(out[:, 0], init[:, 0])
    assert not torch.equal(out[:, 1], init[:, 1])  # the unknown coordinate is sampled
    # with RePaint's passes too (consistency aside: refused, below)
    edit = Edit(init, mask=MASK.expand(N, 2), resample=3, jump=2)
    assert torch.equal(_draw(name, schedule, denoiser, edit, spacing="logsnr")[:, 0], init[:, 0])


@pytest.mark.parametrize("name", ["ddpm", "pc", "dpmpp_2m_sde"])
def test_stochastic_samplers_keep_known_values_too(name):
    schedule, denoiser = _gaussian("linear")
    init = _init()
    out = _draw(name, schedule, denoiser, Edit(init, mask=MASK[None], resample=2, jump=3))
    assert torch.equal(out[:, 0], init[:, 0])


def test_repaint_plan_samples_every_jump_segment_resample_times():
    assert repaint_plan(10, 1, 3) == [(0, 10)]  # replacement: one pass
    plan = repaint_plan(10, 3, 3)
    # jump points p = 9, 6, 3 (p >= J, counted up from the last noisy level)
    assert plan[:3] == [(0, 3), (3, 0), (0, 3)]
    down = sum(b - a for a, b in plan if b > a)
    assert down == 10 + 2 * 3 * 3 and plan[-1] == (9, 10)


def _conditional_fit(out, k0, r, n):
    """|mean error| and |variance error| of the unknown coordinate against N(r k0, 1 - r^2),
    in units of their standard errors for n samples."""
    u = out[:, 1].double()
    var = 1 - r * r
    mean_se, var_se = (var / n) ** 0.5, var * (2 / (n - 1)) ** 0.5
    return abs(float(u.mean()) - r * k0) / mean_se, abs(float(u.var()) - var) / var_se


def test_repaint_approaches_the_exact_conditional_where_replacement_is_biased():
    # x0 ~ N(0, [[1, r], [r, 1]]) with the first coordinate known, = k0: the unknown one is
    # exactly N(r k0, 1 - r^2). Replacement alone ignores most of what k0 says (its mean stays
    # near half of r k0 here); RePaint's resampling lets the unknown coordinate mix with the
    # known one at every level. 80 DDPM steps uniform in log-SNR, U = 10, J = 1 measured
    # (n = 2000, seed 0) a mean 1.318 for 1.35 and a variance 0.190 for 0.19; replacement
    # 0.80 and 0.32.
    r, k0, n = 0.9, 1.5, 1000
    schedule = schedules.linear()
    denoiser = CorrelatedGaussianDenoiser(schedule, torch.zeros(2), torch.tensor([[1, r], [r, 1]]))
    init = torch.tensor([[k0, 0.0]]).expand(n, 2)
    ts = timesteps(schedule, 80, "logsnr")
    noise = SampleNoise(0)
    x_T = noise.randn((n, 2), 0)
    draw = functools.partial(
        sample_edited, sample_ddpm, denoiser, x_T, ts, generator=noise, init=init, mask=MASK[None]
    )
    repaint = _conditional_fit(draw(resample=10, jump=1), k0, r, n)
    replacement = _conditional_fit(draw(), k0, r, n)
    assert max(repaint) < 4, repaint  # within 4 standard errors of the exact conditional
    assert min(replacement) > 10 * max(repaint), (replacement, repaint)


def test_repaint_approaches_the_conditional_mean_and_covariance_of_two_unknowns():
    # x0 ~ N(0, cov) in 3-D with x0[0] = k0 known: the unknown pair is exactly
    # N(cov_u0 k0 / cov_00, cov_uu - cov_u0 cov_0u / cov_00) (the Gaussian conditional), here
    # mean (0.9, -0.6) k0 and covariance [[0.19, 0.04], [0.04, 0.64]]. RePaint's sample mean and
    # covariance lie within 4 standard errors of them; replacement's mean does not.
    n, k0 = 1000, 1.5
    cov = torch.tensor([[1.0, 0.9, -0.6], [0.9, 1.0, -0.5], [-0.6, -0.5, 1.0]])
    mean_u = cov[1:, 0] * k0
    cov_u = cov[1:, 1:] - torch.outer(cov[1:, 0], cov[0, 1:])
    schedule = schedules.linear()
    denoiser = CorrelatedGaussianDenoiser(schedule, torch.zeros(3), cov)
    noise = SampleNoise(0)
    draw = functools.partial(
        sample_edited,
        sample_ddpm,
        denoiser,
        noise.randn((n, 3), 0),
        timesteps(schedule, 80, "logsnr"),
        generator=noise,
        init=torch.tensor([[k0, 0.0, 0.0]]).expand(n, 3),
        mask=torch.tensor([[True, False, False]]),
    )
    u = draw(resample=10, jump=1)[:, 1:].double()
    var = cov_u.diagonal().double()
    mean_se = (var / n).sqrt()
    # the standard error of a sample covariance entry: sqrt((s_ii s_jj + s_ij^2) / n)
    cov_se = ((torch.outer(var, var) + cov_u.double() ** 2) / n).sqrt()
    assert ((u.mean(0) - mean_u) / mean_se).abs().max() < 4, u.mean(0)
    assert ((torch.cov(u.T) - cov_u) / cov_se).abs().max() < 4, torch.cov(u.T)
    replaced = draw()[:, 1:].double()
    assert ((replaced.mean(0) - mean_u) / mean_se).abs().max() > 10


def test_latent_masks_keep_a_cell_only_where_every_pixel_is_known():
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 5, 2] = False  # one unknown pixel: its 2x2 latent cell is unknown
    cells = latent_mask(mask, (4, 4, 4))
    assert cells.shape == (1, 1, 4, 4) and cells.sum() == 15 and not cells[0, 0, 2, 1]


# ---- few-step and consistency families ------------------------------------------------------


def _few_step(family):
    from rectified_gaussian import ExactMeanFlowNet  # MeanFlow's exact u; a shortcut's exact s

    schedule = schedules.RectifiedFlowSchedule()
    # a 16-step lattice: its finest steps (1/16) would ask for the velocity (t2 = 0), an Euler
    # step, not the exact one these tests follow; the edits here step by 1/8 at the finest
    grid = "shortcut:16" if family == "shortcut" else "meanflow"
    return schedule, Denoiser(ExactMeanFlowNet(), schedule, "velocity", step_grid=grid)


@pytest.mark.parametrize(
    ("family", "steps", "strength"),
    [("meanflow", 1, 0.6), ("meanflow", 2, 0.3), ("shortcut", 4, 0.5), ("shortcut", 8, 0.375)],
)
def test_few_step_models_edit_from_the_level_exactly(family, steps, strength):
    # With the exact average velocity every jump lands on the probability-flow trajectory
    # through the start x_{t_s} = (1 - t_s) x + t_s eps: its endpoint is in closed form.
    # A shortcut model's lattice reads the path's t_max as 1, so its level is the strength.
    from rectified_gaussian import endpoint

    schedule, denoiser = _few_step(family)
    init = _init()
    out = _draw(family, schedule, denoiser, Edit(init, strength=strength), steps=steps)
    eps = SampleNoise(3).randn((N, 2), 0)
    t_s = strength * schedule.t_max
    start = (1 - t_s) * init + t_s * eps
    level = torch.full((N,), t_s if family == "meanflow" else strength)
    torch.testing.assert_close(out, endpoint(start, torch.zeros(N), level), atol=1e-5, rtol=1e-5)


def test_a_shortcut_edit_off_its_lattice_is_refused_in_one_line():
    schedule, denoiser = _few_step("shortcut")
    with pytest.raises(ConfigError, match=r"^[^\n]*multiple of 1 / steps[^\n]*$"):
        _draw("shortcut", schedule, denoiser, Edit(_init(8), strength=0.6), steps=4)


def _consistency():
    torch.manual_seed(0)
    schedule = schedules.EDMSchedule()
    return schedule, ConsistencyDenoiser(Denoiser(MLP(dim=2, width=32, depth=1), schedule, "edm"))


@pytest.mark.parametrize(
    ("family", "resample"), [("meanflow", 3), ("shortcut", 2), ("consistency", 1)]
)
def test_few_step_and_consistency_runs_keep_known_values_bit_for_bit(family, resample):
    schedule, denoiser = _consistency() if family == "consistency" else _few_step(family)
    init = _init()
    edit = Edit(init, mask=MASK[None], resample=resample, jump=1)
    out = _draw(family, schedule, denoiser, edit, steps=4, spacing="uniform")
    assert torch.equal(out[:, 0], init[:, 0])
    assert not torch.equal(out[:, 1], init[:, 1])


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (Edit(torch.zeros(4, 2), strength=0.0), "strength must lie in (0, 1]"),
        (Edit(torch.zeros(4, 2), strength=1.5), "strength must lie in (0, 1]"),
        (Edit(torch.zeros(4, 3)), "--init gives (4, 3)"),
        (Edit(torch.zeros(3, 2)), "--init gives (3, 2)"),
        (Edit(torch.zeros(4, 2), mask=torch.ones(4, 3)), "--mask gives (4, 3)"),
        (Edit(torch.zeros(4, 2), resample=2), "give a --mask"),
        (Edit(torch.zeros(4, 2), mask=torch.ones(4, 2), jump=0), "--jump must be"),
    ],
)
def test_bad_edits_are_refused_in_one_line(edit, message):
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as err:
        check_edit(edit, 4, (2,))
    assert message in str(err.value)


def test_repaint_is_refused_for_a_sampler_that_cannot_stop_above_clean_data():
    assert not SAMPLERS["consistency"].partial_grids
    assert all(info.partial_grids for name, info in SAMPLERS.items() if name != "consistency")
    schedule = schedules.EDMSchedule()
    edit = Edit(torch.zeros(4, 2), mask=torch.ones(4, 2), resample=2)
    ts = timesteps(schedule, 2, "karras")
    with pytest.raises(ConfigError, match="consistency always ends at clean data"):
        prepare(edit, sampler_info("consistency"), schedule, Identity(), (2,), ts, 4, "cpu")


# ---- the command line on a tiny trained image run -------------------------------------------

TINY = [
    "data.name=imagefolder",
    "data.image_size=16",
    "data.channels=1",
    "data.class_conditional=true",
    "model.unet.base_channels=16",
    "model.unet.channel_mults=1,2",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_levels=",
    "model.unet.norm_groups=8",
    "train.batch_size=8",
    "train.steps=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "sample.sampler=ddim",
    "sample.steps=4",
    "sample.spacing=trailing",
    "sample.n=4",
]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, axis in (("h", 0), ("v", 1)):
        (root / name).mkdir()
        for k in range(4):
            stripes = ((np.arange(16) // (2 + k % 2)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 16, axis=1 - axis)
            Image.fromarray(img).save(root / name / f"{k}.png")
    cfg = apply_overrides(preset("imagefolder"), [f"data.root={root}", *TINY])
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(cfg, run_dir, progress=False)
    return run_dir, root


def _sample(run_dir, out, *extra):
    return main(["sample", str(run_dir), "--out", str(out), "--quiet", *extra])


def test_inpainting_from_the_command_line_keeps_known_pixels(image_run, tmp_path):
    run_dir, root = image_run
    masks = tmp_path / "masks"
    masks.mkdir()
    keep = np.zeros((16, 16), np.uint8)
    keep[:8] = 255  # the upper half is known
    Image.fromarray(keep).save(masks / "m.png")
    out = tmp_path / "inpainted.npz"
    argv = ["--init", str(root / "h"), "--mask", str(masks / "m.png"), "--class", "1"]
    assert _sample(run_dir, out, *argv, "--resample", "2", "--jump", "2") == 0
    init = np.stack(
        [
            np.asarray(Image.open(p), np.float32) / 127.5 - 1
            for p in sorted((root / "h").glob("*.png"))
        ]
    )
    with np.load(out) as f:
        samples = f["samples"]
        assert samples.shape == (4, 1, 16, 16) and float(f["strength"]) == 1.0
        assert int(f["resample"]) == 2 and f["labels"].tolist() == [1] * 4
    assert np.array_equal(samples[:, 0, :8], init[:, :8])  # bit for bit
    assert not np.array_equal(samples[:, 0, 8:], init[:, 8:])
    assert out.with_suffix(".png").exists()
    # image to image: an .npz init round trip, the same numbers as from the files
    again = tmp_path / "again.npz"
    assert (
        _sample(
            run_dir,
            again,
            "--init",
            str(out),
            "--mask",
            str(masks / "m.png"),
            "--class",
            "1",
            "--resample",
            "2",
            "--jump",
            "2",
        )
        == 0
    )
    with np.load(again) as f:
        assert np.array_equal(f["samples"][:, 0, :8], samples[:, 0, :8])
    sdedit = tmp_path / "sdedit.npz"
    assert (
        _sample(
            run_dir, sdedit, "--init", str(root / "v" / "0.png"), "--strength", "0.5", "--n", "2"
        )
        == 0
    )
    with np.load(sdedit) as f:
        assert f["samples"].shape == (2, 1, 16, 16) and float(f["strength"]) == 0.5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strength", "0"], "--strength must lie in (0, 1]"),
        (["--strength", "1.2"], "--strength must lie in (0, 1]"),
        (["--mask", "MASK8"], "a mask needs its image's size"),
        (["--init", "BIG"], "pass --resize"),
        (["--init", "RGB"], "pass --resize"),
        (["--sampler", "consistency", "--mask", "MASK", "--resample", "2"], "consistency"),
    ],
)
def test_bad_edit_input_exits_2_with_one_line_and_writes_nothing(
    image_run, tmp_path, capsys, extra, message
):
    run_dir, root = image_run
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask8.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "rgb.png")
    names = {"MASK8": "mask8.png", "MASK": "mask.png", "BIG": "big.png", "RGB": "rgb.png"}
    extra = [str(tmp_path / names[x]) if x in names else x for x in extra]
    argv = ["--init", str(root / "h" / "0.png"), *extra]
    out = tmp_path / "out" / "bad.npz"
    assert _sample(run_dir, out, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_resize_converts_an_init_of_another_size_and_channels(image_run, tmp_path):
    run_dir, _ = image_run
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "rgb.png")
    out = tmp_path / "r.npz"
    assert (
        _sample(run_dir, out, "--init", str(tmp_path / "rgb.png"), "--resize", "--strength", "0.3")
        == 0
    )
    with np.load(out) as f:
        assert f["samples"].shape == (1, 1, 16, 16)
