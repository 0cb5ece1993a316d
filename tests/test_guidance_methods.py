"""Guidance methods (diffusion/guidance.py) on a two-class Gaussian mixture in 2-D, whose
conditional and unconditional denoisers are exact:

    class k: x0 ~ N(mu_k, s_k^2 I),  p(k) = 1/2
    E[x0 | x_t, k] = mu_k + alpha s_k^2 (x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)
    E[x0 | x_t]    = sum_k p(k | x_t) E[x0 | x_t, k],  p(k | x_t) ~ N(x_t; alpha mu_k, v_k I)

with v_k = alpha^2 s_k^2 + sigma^2. The "network" returns the exact eps of either, so every
identity below holds to float precision; then a tiny trained run goes through the CLI.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from difflab import cli
from difflab.conditioners import ClassLabels
from difflab.config import ConfigError
from difflab.diffusion import schedules
from difflab.diffusion.guidance import (
    CFG_PP_SAMPLERS,
    check_method,
    guide,
    guided,
    per_draw,
)
from difflab.diffusion.prediction import Denoiser
from difflab.samplers import SAMPLERS, generate, sample_ddim, timesteps

MU = torch.tensor([[1.0, 0.5], [-0.8, -0.6]], dtype=torch.float64)  # class means
S = torch.tensor([0.3, 0.6], dtype=torch.float64)  # class standard deviations
LABELS = ClassLabels(2)  # null label 2
SCHEDULE = schedules.linear()


def mixture_x0(x_t, t, y):
    """Exact E[x0 | x_t, y] (y = 2: the unconditional mixture) in float64, (B, 2)."""
    alpha = SCHEDULE.alpha(t.double())[:, None, None]  # (B, 1, 1)
    sigma = SCHEDULE.sigma(t.double())[:, None, None]
    var = alpha**2 * S[None, :, None] ** 2 + sigma**2  # (B, K, 1)
    resid = x_t.double()[:, None, :] - alpha * MU[None]  # (B, K, 2)
    means = MU[None] + alpha * S[None, :, None] ** 2 * resid / var  # (B, K, 2)
    log_p = -0.5 * (resid**2).sum(-1, keepdim=True) / var - torch.log(var)  # 2-D: det = var^2
    weights = torch.softmax(log_p, dim=1)  # p(k | x_t), (B, K, 1)
    mixture = (weights * means).sum(1)
    pick = means[torch.arange(len(y)), y.clamp(max=1)]
    return torch.where((y == 2)[:, None], mixture, pick)


def mixture_net(x_t, t, y):
    """An eps network whose output is the exact eps of the mixture (per class or unconditional)."""
    alpha = SCHEDULE.alpha(t.double())[:, None]
    sigma = SCHEDULE.sigma(t.double())[:, None]
    return ((x_t.double() - alpha * mixture_x0(x_t, t, y)) / sigma).to(x_t.dtype)


DENOISER = Denoiser(mixture_net, SCHEDULE, "eps")


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    y = torch.randint(2, (n,), generator=g)
    return x, t.float(), y


def _apg(scale, eta=1.0, momentum=0.0, threshold=0.0, denoiser=DENOISER):
    return guide(
        denoiser, "apg", scale, LABELS, apg_eta=eta, apg_momentum=momentum, apg_threshold=threshold
    )


def test_cfg_and_apg_at_scale_one_are_the_conditional_denoiser():
    x, t, y = _batch()
    x0_c, eps_c = DENOISER(x, t, y)
    torch.testing.assert_close(mixture_x0(x, t, y), x0_c, rtol=0, atol=1e-12)  # the exact one
    for den in (guided(DENOISER, 1.0, LABELS), _apg(1.0), _apg(1.0, eta=0.0, momentum=-0.5)):
        x0_hat, eps_hat = den(x, t, y)
        torch.testing.assert_close(x0_hat, x0_c, rtol=0, atol=1e-12)
        torch.testing.assert_close(eps_hat, eps_c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_apg_with_eta_one_and_no_momentum_or_threshold_is_cfg(scale):
    x, t, y = _batch()
    x0_g, eps_g = guided(DENOISER, scale, LABELS)(x, t, y)
    x0_a, eps_a = _apg(scale)(x, t, y)
    torch.testing.assert_close(x0_a, x0_g, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_a, eps_g, rtol=1e-10, atol=1e-10)
    if scale == 0.0:  # and CFG at 0 is the exact unconditional (mixture) denoiser
        torch.testing.assert_close(
            x0_g, mixture_x0(x, t, torch.full_like(y, 2)), atol=1e-12, rtol=0
        )


def test_apg_update_is_split_into_parts_parallel_and_orthogonal_to_the_conditional_x0():
    x, t, y = _batch()
    x0_c, _ = DENOISER(x, t, y)
    x0_u, _ = DENOISER(x, t, torch.full_like(y, 2))
    x0_orth, _ = _apg(3.0, eta=0.0)(x, t, y)  # only the orthogonal part
    x0_full, _ = _apg(3.0, eta=1.0)(x, t, y)
    orthogonal, full = (x0_orth - x0_c) / 2.0, (x0_full - x0_c) / 2.0  # (w - 1) = 2
    d = x0_c - x0_u  # the CFG update D, split into the two parts
    scale = x0_c.norm(dim=1) ** 2  # x0_hat - x0_c is exact to rounding of x0_c's size
    inner = (orthogonal * x0_c).sum(1) / scale
    assert inner.abs().max() < 1e-12  # orthogonal per example
    parallel = full - orthogonal
    cross = parallel[:, 0] * x0_c[:, 1] - parallel[:, 1] * x0_c[:, 0]  # 2-D: zero if along
    assert (cross.abs() / scale).max() < 1e-12  # along x0_c
    torch.testing.assert_close(full, d, rtol=1e-12, atol=1e-12)  # together: D
    assert (orthogonal.norm(dim=1) > 1e-3 * d.norm(dim=1)).sum() > 32  # neither part is empty
    assert (parallel.norm(dim=1) > 1e-3 * d.norm(dim=1)).sum() > 32
    # eta = 0 changes x0 and leaves it far from CFG's (the test above cannot pass by accident)
    assert (x0_orth - x0_full).abs().max() > 1e-2


def test_apg_threshold_caps_the_update_norm():
    x, t, y = _batch()
    x0_c, _ = DENOISER(x, t, y)
    x0_hat, _ = _apg(2.0, eta=1.0, threshold=0.05)(x, t, y)
    assert ((x0_hat - x0_c).norm(dim=1) <= 0.05 + 1e-12).all()
    assert ((x0_hat - x0_c).norm(dim=1) > 0.05 - 1e-9).any()  # the cap is reached


def test_apg_momentum_adds_beta_times_the_running_update_and_resets():
    x, t, y = _batch()
    den = _apg(2.0, eta=1.0, momentum=-0.5)
    x0_c, _ = DENOISER(x, t, y)
    d = x0_c - DENOISER(x, t, torch.full_like(y, 2))[0]
    first, _ = den(x, t, y)
    second, _ = den(x, t, y)  # running sum: d - 0.5 d
    torch.testing.assert_close(first - x0_c, d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second - x0_c, 0.5 * d, rtol=1e-10, atol=1e-12)
    den.reset()
    torch.testing.assert_close(den(x, t, y)[0], first, rtol=0, atol=0)


def test_autoguidance_with_the_weak_model_equal_to_the_strong_is_the_strong_one():
    x, t, y = _batch()
    x0_c, eps_c = DENOISER(x, t, y)
    for w in (0.0, 1.0, 3.0):
        x0_hat, eps_hat = guide(DENOISER, "auto", w, LABELS, weak=DENOISER)(x, t, y)
        torch.testing.assert_close(x0_hat, x0_c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps_hat, eps_c, rtol=1e-12, atol=1e-12)


def test_autoguidance_extrapolates_away_from_the_weak_model_of_another_kind():
    # the weak model: the unconditional mixture, as an x0 network (another kind than eps)
    weak = Denoiser(
        lambda x_t, t, y: mixture_x0(x_t, t, torch.full_like(y, 2)).float(), SCHEDULE, "x0"
    )
    x, t, y = _batch()
    x0_auto, eps_auto = guide(DENOISER, "auto", 2.0, LABELS, weak=weak)(x, t, y)
    x0_cfg, eps_cfg = guided(DENOISER, 2.0, LABELS)(x, t, y)  # the same D_0 as cfg's
    torch.testing.assert_close(x0_auto, x0_cfg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_auto, eps_cfg, rtol=1e-5, atol=1e-5)


def test_cfg_plus_plus_with_ddim_renoises_with_the_unconditional_eps():
    ts = timesteps(SCHEDULE, 10, "trailing")
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1] * 4)
    null = torch.full_like(y, 2)
    # lambda = 0: unconditional DDIM, step for step
    zero = sample_ddim(guide(DENOISER, "cfg++", 0.0, LABELS), x_T, ts, y=y)
    torch.testing.assert_close(zero, sample_ddim(DENOISER, x_T, ts, y=null), rtol=0, atol=1e-6)
    # lambda = 0.6: each step's x0 is CFG's at 0.6, and x_s = alpha_s x0_lam + sigma_s eps_u
    steps = []
    sample_ddim(guide(DENOISER, "cfg++", 0.6, LABELS), x_T, ts, y=y, callback=steps.append)
    cfg = guided(DENOISER, 0.6, LABELS)
    for state in steps:
        t = torch.full((8,), state.t)
        x0_lam, _ = cfg(state.x_t, t, y)
        _, eps_u = DENOISER(state.x_t, t, null)
        alpha_s, sigma_s = float(SCHEDULE.alpha(state.t_next)), float(SCHEDULE.sigma(state.t_next))
        torch.testing.assert_close(state.x0_hat, x0_lam, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            state.x_next, alpha_s * x0_lam + sigma_s * eps_u, rtol=1e-5, atol=1e-5
        )
    # and it is not CFG's DDIM (the renoising differs)
    plain = sample_ddim(cfg, x_T, ts, y=y)
    assert (steps[-1].x_next - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cfg_plus_plus_is_refused_where_the_paper_does_not_define_it(name):
    if name in CFG_PP_SAMPLERS:
        check_method("cfg++", 0.5, sampler=name, eta=0.0)
        with pytest.raises(ConfigError, match="eta = 0"):
            check_method("cfg++", 0.5, sampler=name, eta=1.0)
    else:
        with pytest.raises(ConfigError, match="DDIM"):
            check_method("cfg++", 0.5, sampler=name)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        check_method("cfg++", 1.5, sampler="ddim")


def _draw(den, n, start=0, batch_size=1024, sampler=sample_ddim, **options):
    ts = timesteps(SCHEDULE, 6, "trailing")
    y = torch.arange(start, start + n) % 2
    return generate(
        per_draw(sampler, den),
        den,
        n,
        (2,),
        ts,
        seed=5,
        start=start,
        batch_size=batch_size,
        labels=y,
        **options,
    )


def test_apg_momentum_does_not_leak_between_draws_batches_or_shards():
    den = _apg(3.0, eta=0.0, momentum=-0.75, threshold=1.0)
    first = _draw(den, 8)
    torch.testing.assert_close(_draw(den, 8), first, rtol=0, atol=0)  # the same seed again
    torch.testing.assert_close(_draw(den, 8, batch_size=3), first, rtol=0, atol=0)
    torch.testing.assert_close(_draw(den, 5, start=3), first[3:], rtol=0, atol=0)  # a shard
    # the state is real: without a reset, the second draw starts from the first's momentum
    ts = timesteps(SCHEDULE, 6, "trailing")
    x_T, y = torch.randn(8, 2), torch.arange(8) % 2
    once = sample_ddim(den, x_T, ts, y=y)
    assert (sample_ddim(den, x_T, ts, y=y) - once).abs().max() > 1e-4
    den.reset()
    torch.testing.assert_close(sample_ddim(den, x_T, ts, y=y), once, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_apg_and_autoguidance_run_with_every_sampler(name):
    # a consistency model for the consistency sampler: guidance wraps any denoiser
    from difflab.config import SampleConfig
    from difflab.diffusion.consistency import ConsistencyDenoiser
    from difflab.samplers import sampler_info

    info = sampler_info(name)
    options = info.options_from(SampleConfig(sampler=name))
    den = ConsistencyDenoiser(DENOISER) if name == "consistency" else DENOISER
    if info.family:  # meanflow, shortcut: their net reads t2, which these methods do not pass
        for combined in (guide(den, "auto", 2.0, LABELS, weak=den), _apg(2.0, denoiser=den)):
            with pytest.raises(ConfigError, match="classifier-free guidance only"):
                _draw(combined, 6, sampler=info.fn, **options)
        return
    neutral = _draw(guide(den, "auto", 2.0, LABELS, weak=den), 6, sampler=info.fn, **options)
    strong = _draw(guided(den, 1.0, LABELS), 6, sampler=info.fn, **options)
    torch.testing.assert_close(neutral, strong, rtol=1e-5, atol=1e-5)
    apg = _draw(_apg(2.0, eta=0.0, momentum=-0.5, denoiser=den), 6, sampler=info.fn, **options)
    assert torch.isfinite(apg).all() and (apg - strong).abs().max() > 1e-4


class _Tokens:
    """A text-like conditioner: conditions (B, L, D) with the zero context as null."""

    conditional = True

    def null_like(self, cond):
        return torch.zeros_like(cond)

    def cat(self, a, b):
        return torch.cat([a, b])


def test_apg_and_cfg_plus_plus_take_token_conditions_through_the_doubled_batch():
    calls = []

    def net(x_t, t, cond):  # class 0 where the context sums > 0, 1 where < 0, null at 0
        calls.append(len(x_t))
        total = cond.sum((1, 2))
        y = torch.where(total > 0, 0, torch.where(total < 0, 1, 2))
        return mixture_net(x_t, t, y)

    x, t, y = _batch(8)
    tokens = torch.where(y == 0, 1.0, -1.0)[:, None, None].expand(8, 3, 4).contiguous()
    den = Denoiser(net, SCHEDULE, "eps")
    for method, scale in (("apg", 2.0), ("cfg++", 0.5)):
        calls.clear()
        out = guide(den, method, scale, _Tokens(), apg_eta=1.0)(x, t, tokens)
        ref = guide(DENOISER, method, scale, LABELS, apg_eta=1.0)(x, t, y)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        assert calls == [16]  # one doubled batch


def test_every_method_keeps_the_guidance_interval():
    # s = sigma / alpha; outside (0.5, 2] every method is the conditional denoiser
    x, t, y = _batch()
    s = SCHEDULE.sigma(t) / SCHEDULE.alpha(t)
    outside = (s <= 0.5) | (s > 2.0)
    assert outside.any() and (~outside).any()
    x0_c, _ = DENOISER(x, t, y)
    for method in ("apg", "cfg++", "auto"):
        den = guide(
            DENOISER,
            method,
            0.5 if method == "cfg++" else 3.0,
            LABELS,
            0.5,
            2.0,
            weak=Denoiser(mixture_net, SCHEDULE, "eps") if method == "auto" else None,
        )
        x0_hat, _ = den(x, t, y)
        torch.testing.assert_close(x0_hat[outside], x0_c[outside], rtol=0, atol=0)
        assert method == "auto" or (x0_hat[~outside] - x0_c[~outside]).abs().max() > 1e-3


# ---- the command line, on a tiny class-conditional image run -------------------------------

TINY = [
    "data.name=imagefolder",
    "data.image_size=32",
    "data.channels=1",
    "data.class_conditional=true",
    "model.unet.base_channels=8",
    "model.unet.channel_mults=1",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_levels=",
    "model.unet.norm_groups=4",
    "model.unet.mid_attention=false",
    "model.unet.dropout=0.0",
    "diffusion.schedule=linear",
    "diffusion.num_steps=100",
    "train.batch_size=4",
    "train.steps=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=3",
    "train.ema_decay=0.5",
    "sample.sampler=ddim",
    "sample.steps=3",
    "sample.spacing=trailing",
    "sample.n=4",
    "sample.batch_size=4",
]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("guide")
    for name, axis in (("h", 0), ("v", 1)):
        (root / "data" / name).mkdir(parents=True)
        for k in range(3):
            stripes = ((np.arange(32) // (2 + k)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 32, 1 - axis)
            Image.fromarray(img).save(root / "data" / name / f"{k}.png")

    shutil.copytree(root / "data", root / "data2")  # the same images, another data set

    def train(name, *extra):
        sets = [f"data.root={root / 'data'}", *TINY, *extra]
        argv = ["train", "--preset", "imagefolder", "--runs", str(root), "--name", name]
        assert cli.main([*argv, "--quiet", "--no-finish", "--set", *sets]) == 0
        return root / name

    return {
        "cond": train("c"),
        "uncond": train("u", "data.class_conditional=false"),
        "other_schedule": train("s", "diffusion.schedule=cosine"),
        "other_data": train("d", f"data.root={root / 'data2'}"),
        "other_size": train("z", "data.image_size=16"),
    }


METHODS = {
    "cfg": ["--guidance", "2.0"],
    "apg": [
        "--guidance-method",
        "apg",
        "--guidance",
        "3.0",
        "--apg-momentum",
        "-0.5",
        "--apg-threshold",
        "4",
    ],
    "cfg++": ["--guidance-method", "cfg++", "--guidance", "0.6"],
    "auto": ["--guidance-method", "auto", "--guidance", "2.0", "--guide-with", "{run}:step-1"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sample_and_eval_with_each_method_record_it(tiny_runs, tmp_path, method, capsys):
    run = tiny_runs["cond"]
    flags = [f.format(run=run) for f in METHODS[method]] + ["--n", "4", "--quiet"]
    out = tmp_path / "s.npz"
    assert cli.main(["sample", str(run), "--out", str(out), "--per-class", *flags]) == 0
    with np.load(out) as f:
        samples = f["samples"]
        meta = {k: f[k].item() for k in f.files if f[k].ndim == 0}
    assert samples.shape == (4, 1, 32, 32) and np.isfinite(samples).all()
    assert meta["guidance"] == float(flags[flags.index("--guidance") + 1])
    assert meta.get("guidance_method", "cfg") == method
    if method == "auto":
        assert meta["guide_with"] == f"{run}:step-1"
    if method == "apg":
        assert (meta["apg_momentum"], meta["apg_threshold"]) == (-0.5, 4.0)
    # the same draw again: identical (APG's momentum starts afresh each draw)
    again = tmp_path / "again.npz"
    assert cli.main(["sample", str(run), "--out", str(again), "--per-class", *flags]) == 0
    with np.load(again) as f:
        assert np.array_equal(f["samples"], samples)
    if method in ("apg", "auto"):  # eval records the method in its rows too
        rows = tmp_path / "e.json"
        judge = ["--metric", "accuracy", "--judge", str(_judge(tmp_path / "j.safetensors"))]
        ref = ["--reference", str(out), "--n-reference", "4", "--no-cache"]
        assert cli.main(["eval", str(run), "--out", str(rows), *flags, *judge, *ref]) == 0
        row = json.loads(rows.read_text())["rows"][0]
        assert row["guidance_method"] == method and row["guidance"] == meta["guidance"]


def _judge(path):
    from difflab.evaluation.classifier import Judge, save_judge

    torch.manual_seed(0)
    return save_judge(Judge(in_channels=1, num_classes=2).eval(), path, {"dataset": "stripes"})


def test_autoguidance_guides_an_unconditional_run_with_an_earlier_checkpoint(tiny_runs, tmp_path):
    run = tiny_runs["uncond"]
    out = tmp_path / "u.npz"
    flags = ["--guidance-method", "auto", "--guidance", "2.0", "--n", "4", "--quiet"]
    argv = ["sample", str(run), "--out", str(out), *flags, "--guide-with", f"{run}:1"]
    assert cli.main(argv) == 0
    with np.load(out) as f:
        assert f["guidance_method"].item() == "auto" and f["guidance"].item() == 2.0
        guided_samples = f["samples"]
    plain = tmp_path / "plain.npz"
    assert cli.main(["sample", str(run), "--out", str(plain), "--n", "4", "--quiet"]) == 0
    with np.load(plain) as f:
        assert not np.allclose(f["samples"], guided_samples)  # the weak model moved them


BAD = {
    "cfg++ with a stochastic sampler": (
        "cond",
        ["--guidance-method", "cfg++", "--guidance", "0.5", "--sampler", "ddpm"],
        "cfg++ is defined for deterministic DDIM",
    ),
    "cfg++ above 1": ("cond", ["--guidance-method", "cfg++", "--guidance", "1.5"], "[0, 1]"),
    "a guide of another schedule": (
        "cond",
        ["--guidance-method", "auto", "--guide-with", "{other_schedule}"],
        "another schedule",
    ),
    "a guide of another conditioning": (
        "cond",
        ["--guidance-method", "auto", "--guide-with", "{uncond}"],
        "another conditioning",
    ),
    "a guide of another data set": (
        "cond",
        ["--guidance-method", "auto", "--guide-with", "{other_data}"],
        "another data set",
    ),
    "a guide of another image size": (
        "cond",
        ["--guidance-method", "auto", "--guide-with", "{other_size}"],
        "another image size",
    ),
    "autoguidance with no weak model": (
        "uncond",
        ["--guidance-method", "auto", "--guidance", "2.0"],
        "needs a weak model",
    ),
    "a missing guide checkpoint": (
        "cond",
        ["--guidance-method", "auto", "--guide-with", "{cond}:step-99"],
        "no checkpoint at step 99",
    ),
    "apg on an unconditional run": ("uncond", ["--guidance-method", "apg"], "conditional model"),
    "apg momentum out of range": (
        "cond",
        ["--guidance-method", "apg", "--apg-momentum", "1.5"],
        "apg_momentum",
    ),
    "an unknown method": ("cond", ["--guidance-method", "pag"], "unknown sample.guidance_method"),
    "guide-with without auto": ("cond", ["--guide-with", "{cond}"], "--guidance-method auto"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_guidance_exits_2_with_one_line_and_writes_nothing(tiny_runs, tmp_path, case, capsys):
    which, flags, message = BAD[case]
    names = {k: str(v) for k, v in tiny_runs.items()}
    flags = [f.format(**names) for f in flags]
    for command in ("sample", "eval"):
        out = tmp_path / ("s.npz" if command == "sample" else "e.json")
        capsys.readouterr()
        argv = [command, str(tiny_runs[which]), "--out", str(out), "--n", "4", "--quiet", *flags]
        if command == "eval":
            argv += ["--metric", "accuracy", "--judge", str(_judge(tmp_path / "j.safetensors"))]
        assert cli.main(argv) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("difflab: error:"), err
        assert message in err[0], (command, err)
        assert not out.exists()


@pytest.mark.parametrize("method", ["apg", "auto"])
def test_a_share_of_a_draw_is_those_rows_of_the_whole_draw(tiny_runs, method):
    # Model.sample(start=): what one process of a sharded draw computes
    from difflab.config import SampleConfig
    from difflab.runs import attach_guide, load_run

    run = load_run(tiny_runs["cond"])
    scfg = SampleConfig(
        sampler="ddim",
        steps=3,
        spacing="trailing",
        n=6,
        batch_size=3,
        guidance=3.0,
        guidance_method=method,
        apg_momentum=-0.5,
        guide_with=f"{tiny_runs['cond']}:step-1" if method == "auto" else "",
    )
    attach_guide(run, scfg)
    labels = torch.arange(6) % 2
    whole = run.model.sample(scfg, cond=labels)
    share = dataclasses.replace(scfg, n=3)
    part = run.model.sample(share, cond=labels[3:], start=3)
    torch.testing.assert_close(part, whole[3:], rtol=0, atol=0)
    plain = run.model.sample(dataclasses.replace(scfg, guidance=1.0), cond=labels)
    assert (whole - plain).abs().max() > 1e-6  # the method did something (2 training steps)


def test_training_time_samples_refuse_autoguidance_in_one_line(tiny_runs, tmp_path, capsys):
    sets = [f"sample.guide_with={tiny_runs['cond']}", "sample.guidance_method=auto"]
    argv = ["train", "--preset", "imagefolder", "--runs", str(tmp_path), "--name", "x"]
    argv += ["--quiet", "--no-finish", "--set", *TINY, *sets]
    argv += [f"data.root={tiny_runs['cond'].parent / 'data'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training-time samples" in err[0], err


def test_compare_sweeps_guidance_methods_with_their_own_scales(tiny_runs, tmp_path):
    run = tiny_runs["cond"]
    out = tmp_path / "c.json"
    argv = ["eval", str(run), "--compare", "--samplers", "ddim,euler", "--nfe", "2", "--n", "4"]
    argv += ["--guidance-methods", "cfg:1:2,cfg++:0.5,apg:2,auto:2", "--quiet", "--out", str(out)]
    argv += ["--guide-with", f"{run}:step-1", "--metric", "accuracy"]
    argv += ["--judge", str(_judge(tmp_path / "j.safetensors"))]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    seen = [(r["guidance_method"], r["sampler"], r["guidance"]) for r in rows]
    assert seen == [
        ("cfg", "ddim", 1.0),
        ("cfg", "ddim", 2.0),
        ("cfg", "euler", 1.0),
        ("cfg", "euler", 2.0),
        ("cfg++", "ddim", 0.5),  # CFG++ leaves Euler out
        ("apg", "ddim", 2.0),
        ("apg", "euler", 2.0),
        ("auto", "ddim", 2.0),
        ("auto", "euler", 2.0),
    ]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    # network calls per sample, counted as the nets ran: the conditional model alone at cfg 1,
    # else a doubled batch (cfg, cfg++, apg) or the strong and the weak net (auto) per step
    for r in rows:
        neutral = r["guidance_method"] == "cfg" and r["guidance"] == 1.0
        assert r["net_calls"] == r["nfe"] * (1 if neutral else 2), r


def test_tradeoff_plot_draws_one_curve_per_method(tmp_path):
    from difflab.report.charts import tradeoff_plot

    rows = [
        {
            "guidance_method": m,
            "sampler": "ddim",
            "nfe": 10,
            "guidance": w,
            "fd_judge": fd,
            "accuracy": acc,
        }
        for m, w, fd, acc in [("cfg", 1.0, 5, 0.9), ("cfg", 2.0, 9, 0.99), ("apg", 2.0, 6, 0.98)]
    ]
    path = tradeoff_plot(rows, tmp_path / "t.png", "fd_judge", "accuracy")
    assert path.is_file() and path.stat().st_size > 0
