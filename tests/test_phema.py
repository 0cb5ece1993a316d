"""Post-hoc EMA (EDM2, Karras et al. 2024): power-function profiles, their snapshots, and the
least-squares reconstruction of any sigma_rel (training/phema.py, training/posthoc.py)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from difflab.cli import main
from difflab.config import ConfigError, apply_overrides, preset
from difflab.runs import load_run
from difflab.training.loop import train
from difflab.training.phema import PowerEMA, gamma_of, power_beta, sigma_rel_of
from difflab.training.posthoc import (
    list_snapshots,
    profile_inner,
    solve_coefficients,
    synthesise,
)

TRAIN = [
    "model.mlp.width=32",
    "model.mlp.depth=2",
    "train.batch_size=64",
    "train.log_every=10",
    "train.warmup_steps=5",
    "train.steps=40",
    "train.checkpoint_every=20",
    "train.phema_sigma_rels=0.05,0.10",
    "train.phema_every=5",
    "sample.sampler=ddim",
    "sample.steps=10",
    "sample.n=200",
]


def _cfg(*extra):
    return apply_overrides(preset("toy2d"), [*TRAIN, *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("phema") / "run"
    train(_cfg(), path, progress=False)
    return path


def test_gamma_and_sigma_rel_round_trip():
    for gamma in (0.1, 1.0, 6.94, 16.97, 100.0):
        assert gamma_of(sigma_rel_of(gamma)) == pytest.approx(gamma, rel=1e-10)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    # EDM2 Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (two decimals there)
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_of(0.0) == pytest.approx(1 / math.sqrt(12))  # gamma 0: the plain average


def _linear_trajectory(T: int, every: int, a: float, b: float):
    """Track both profiles of a one-weight net whose weight after step tau is a + b tau;
    returns (snapshot steps, values (S, 2))."""
    net = nn.Linear(1, 1, bias=False)
    ema = PowerEMA(net, (0.05, 0.10))
    steps, values = [], []
    for t in range(1, T + 1):
        net.weight.data.fill_(a + b * t)
        ema.update(net, t)
        if t % every == 0:
            steps.append(t)
            values.append([m.weight.double().item() for m in ema.models])
    return np.asarray(steps, np.float64), np.asarray(values)


def _power_average(T: int, gamma: float, a: float, b: float) -> float:
    """sum_tau w_tau (a + b tau) by direct summation of the discrete power-function weights
    w_tau = prod_{s > tau} beta_s (1 - beta_tau), beta_s = (1 - 1/s)^(gamma + 1)."""
    total, carry = 0.0, 1.0  # carry: the product of beta over the later steps
    for tau in range(T, 0, -1):
        total += carry * (1 - power_beta(gamma, tau)) * (a + b * tau)
        carry *= power_beta(gamma, tau)
    return total


def test_tracked_profiles_are_the_power_function_average():
    T, a, b = 300, 2.0, 0.5
    _, values = _linear_trajectory(T, T, a, b)
    for k, sigma_rel in enumerate((0.05, 0.10)):
        gamma = gamma_of(sigma_rel)
        assert values[-1, k] == pytest.approx(_power_average(T, gamma, a, b), rel=1e-6)
        # the continuous profile (gamma + 1) tau^gamma / T^(gamma + 1) has mean T (g+1)/(g+2);
        # the discrete one is half a step later (Euler-Maclaurin)
        continuous = a + b * (T * (gamma + 1) / (gamma + 2) + 0.5)
        assert values[-1, k] == pytest.approx(continuous, abs=0.02 * b)


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15, 0.2])
def test_synthesised_linear_trajectory_is_the_analytic_average(sigma_rel):
    T, every, a, b = 400, 20, 2.0, 0.5
    steps, values = _linear_trajectory(T, every, a, b)
    in_t = np.repeat(steps, 2)
    in_gamma = np.tile([gamma_of(0.05), gamma_of(0.10)], len(steps))
    gamma = gamma_of(sigma_rel)
    x, error = solve_coefficients(in_t, in_gamma, T, gamma)
    synthesised = x @ values.reshape(-1)
    exact = _power_average(T, gamma, a, b)
    # The coefficients sum to 1, so the matched profile integrates to 1 like the target and
    # |int (p_hat - p)(tau - T/2)| <= ||p_hat - p|| ||tau - T/2|| (Cauchy-Schwarz), with
    # ||p_hat - p|| = error ||p|| and ||tau - T/2||^2 = T^3 / 12 on [0, T]; 0.02 b allows for
    # the discrete profiles' Euler-Maclaurin remainders (test above).
    bound = b * (error * math.sqrt(profile_inner(T, gamma, T, gamma)) * math.sqrt(T**3 / 12))
    assert abs(synthesised - exact) <= bound + 0.02 * b
    # and it is the target's average, not a stored profile's
    stored = [_power_average(T, gamma_of(s), a, b) for s in (0.05, 0.10)]
    assert min(abs(synthesised - s) for s in stored) > 4 * (bound + 0.02 * b)


def test_synthesising_a_stored_sigma_rel_reproduces_it(run_dir):
    snapshots = list_snapshots(run_dir)
    assert [s.step for s in snapshots] == list(range(5, 41, 5))
    last = load_file(snapshots[-1].path)
    for k, sigma_rel in enumerate((0.05, 0.10)):
        weights = synthesise(snapshots, sigma_rel)
        for name, value in weights.items():
            torch.testing.assert_close(value, last[f"{k}.{name}"], rtol=1e-6, atol=1e-7)


def test_snapshots_survive_a_kill_and_resume_bitwise(run_dir, tmp_path):
    cfg = _cfg()
    train(cfg, tmp_path / "b", progress=False, stop_after=25)
    # killed after step 25's snapshot, before its checkpoint: resume from step 20 writes it again
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-25")
    (tmp_path / "b" / "phema" / "step-25.safetensors").unlink()
    train(cfg, tmp_path / "b", resume=True, progress=False)  # from the step-20 checkpoint
    straight = sorted(p.name for p in (run_dir / "phema").iterdir())
    resumed = sorted(p.name for p in (tmp_path / "b" / "phema").iterdir())
    assert straight == resumed
    for name in straight:
        a = (run_dir / "phema" / name).read_bytes()
        assert a == (tmp_path / "b" / "phema" / name).read_bytes(), name


def test_ema_writes_weights_that_sample(run_dir, tmp_path, capsys):
    out = tmp_path / "ema.safetensors"
    assert main(["ema", str(run_dir), "--sigma-rel", "0.08", "--out", str(out)]) == 0
    run = load_run(out, device="cpu")
    assert run.step == 40 and run.ema
    assert main(["sample", str(out), "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
    assert np.load(tmp_path / "s.npz")["samples"].shape == (200, 2)


def test_sweep_marks_the_best_and_plots(run_dir, tmp_path):
    out = tmp_path / "sweep.json"
    args = ["ema", str(run_dir), "--sweep", "0.05:0.10:3", "--metric", "sliced_w2"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    values = [r["value"] for r in result["rows"]]
    assert [r["sigma_rel"] for r in result["rows"]] == [0.05, 0.075, 0.1]
    assert result["best"]["value"] == min(values)
    assert (run_dir / "plots" / "posthoc_sweep.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sigma-rel", "0.005"], "cannot be reconstructed from 8 snapshots"),
        (["--sigma-rel", "0.4"], "outside (0, 0.2887)"),
        (["--sweep", "0.005:0.1", "--metric", "sliced_w2"], "cannot be reconstructed"),
    ],
)
def test_ema_refuses_what_the_snapshots_cannot_reconstruct(
    run_dir, tmp_path, capsys, flags, message
):
    out = tmp_path / "x.safetensors"
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert main(["ema", str(run_dir), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists() and sorted(p.name for p in run_dir.rglob("*")) == before


def test_ema_on_a_run_without_snapshots_names_the_setting(tmp_path, capsys):
    cfg = _cfg("train.phema_sigma_rels=", "train.steps=10", "train.checkpoint_every=10")
    train(cfg, tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain" / "phema").exists()  # classic EMA stays the default
    assert main(["ema", str(tmp_path / "plain"), "--sigma-rel", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.phema_sigma_rels" in err
    assert not (tmp_path / "plain" / "posthoc").exists()


def test_bad_phema_config_writes_nothing(tmp_path):
    for bad in (["train.phema_sigma_rels=0.5"], ["train.phema_every=0"]):
        with pytest.raises(ConfigError, match="phema"):
            train(_cfg(*bad), tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists(), bad


def test_sweep_of_an_image_run_goes_through_image_evaluation(tmp_path):
    from PIL import Image

    from difflab.evaluation.classifier import Judge, save_judge
    from difflab.runs import save_samples

    for name, axis in (("h", 0), ("v", 1)):  # two classes of stripes
        (tmp_path / "data" / name).mkdir(parents=True)
        stripes = ((np.arange(32) // 2) % 2 * 255).astype(np.uint8)
        img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 32, 1 - axis)
        Image.fromarray(img).save(tmp_path / "data" / name / "0.png")
    sets = [
        f"data.root={tmp_path / 'data'}",
        "data.image_size=32",
        "data.channels=1",
        "data.class_conditional=true",
        "model.unet.base_channels=8",
        "model.unet.channel_mults=1",
        "model.unet.num_res_blocks=1",
        "model.unet.attention_levels=",
        "model.unet.norm_groups=4",
        "model.unet.mid_attention=false",
        "diffusion.num_steps=100",
        "train.batch_size=4",
        "train.steps=6",
        "train.warmup_steps=1",
        "train.checkpoint_every=6",
        "train.phema_sigma_rels=0.05,0.10",
        "train.phema_every=1",
    ]
    argv = ["train", "--preset", "imagefolder", "--runs", str(tmp_path), "--name", "img"]
    assert main([*argv, "--quiet", "--no-finish", "--set", *sets]) == 0
    torch.manual_seed(0)
    judge = save_judge(
        Judge(in_channels=1, num_classes=2).eval(),
        tmp_path / "j.safetensors",
        {"dataset": "stripes"},
    )
    reference = save_samples(tmp_path / "ref.npz", torch.rand(4, 1, 32, 32) * 2 - 1)
    out = tmp_path / "sweep.json"
    flags = ["--metric", "accuracy", "--judge", str(judge), "--reference", str(reference)]
    flags += ["--n", "4", "--sampler", "ddim", "--steps", "2", "--no-cache", "--quiet"]
    run = tmp_path / "img"
    assert main(["ema", str(run), "--sweep", "0.06:0.09:2", *flags, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["higher_is_better"] and len(result["rows"]) == 2
    assert all(r["metric"] == "accuracy" and r["n_generated"] == 4 for r in result["rows"])
    assert result["best"]["value"] == max(r["value"] for r in result["rows"])
