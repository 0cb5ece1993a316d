"""The class-conditional few-step presets (issue 40): mnist-meanflow, guided by folding guidance
into its training (Geng et al. 2025, Sec. 4.2), and mnist-shortcut, guided at sampling by
classifier-free guidance. Each trains 3 steps on a tiny U-Net over two classes of 8x8 stripes
(an image folder shaped like MNIST) and samples through the CLI; the folded run refuses a
guidance scale and samples guided at one network call a step."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import stripes_folder, train_here
from difflab import build
from difflab.cli import main
from difflab.config import SampleConfig, apply_overrides, preset
from difflab.errors import ConfigError
from difflab.evaluation.sampled import counted_rows, timed_samples
from difflab.model import DataKind, FoldedGuidance
from difflab.runs import load_run
from difflab.samplers import nfe_of

TINY_UNET = [
    "data.name=imagefolder",
    "data.channels=1",
    "data.image_size=8",
    "model.unet.base_channels=8",
    "model.unet.channel_mults=1,2",
    "model.unet.attention_levels=1",
    "model.unet.num_heads=2",
    "model.unet.norm_groups=4",
    "train.steps=3",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.time_limit_minutes=0",
    "train.threads=1",
    "sample.n=4",
    "sample.batch_size=4",
]


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    return stripes_folder(tmp_path_factory.mktemp("stripes"))


@pytest.fixture(scope="module")
def meanflow_run(stripes, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "meanflow"
    train_here(_tiny("mnist-meanflow", stripes), run)
    return run


def test_the_presets_are_class_conditional_few_step_runs():
    meanflow, shortcut, flow = preset("mnist-meanflow"), preset("mnist-shortcut"), preset("mnist")
    for cfg in (meanflow, shortcut):
        assert cfg.data.class_conditional and cfg.train.label_dropout > 0
        assert cfg.model.second_time and cfg.model.unet == flow.model.unet
        assert cfg.sample.steps == 1 and cfg.train.time_limit_minutes <= 30
    assert (meanflow.meanflow.omega, meanflow.meanflow.kappa) != (1.0, 0.0)
    assert meanflow.sample.guidance == 1.0 and meanflow.train.precision == "fp32"
    assert shortcut.sample.guidance > 1.0
    # few levels, each seen often: the 128-step lattice on a quarter of batch 64 drew noise
    assert shortcut.shortcut.max_steps == 16 and shortcut.shortcut.bootstrap_fraction == 0.5


def _tiny(name, root="unused"):
    return apply_overrides(preset(name), [f"data.root={root}", *TINY_UNET])


def _model(name):
    """The preset's tiny model on two classes of 8x8 images, untrained but every weight
    moved off its zero start (so every input matters)."""
    torch.manual_seed(0)
    model = build.build_model(_tiny(name), DataKind((1, 8, 8), 2))
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_a_folded_model_refuses_a_guidance_scale_naming_omega_and_kappa(one_thread):
    model = _model("mnist-meanflow")
    assert model.kind.folded_guidance == FoldedGuidance(1.0, 0.25)
    model.check_sample(model_sample := SampleConfig(sampler="meanflow", steps=1, n=2))
    with pytest.raises(ConfigError) as info:
        model.check_sample(dataclasses.replace(model_sample, guidance=2.0))
    message = str(info.value)
    assert "\n" not in message and "folded" in message and "--guidance 1" in message
    assert "omega=1, kappa=0.25: CFG scale 1.33333" in message
    assert _model("mnist-shortcut").kind.folded_guidance is None


def test_a_shortcut_model_takes_classifier_free_guidance_at_sampling(one_thread):
    """One doubled batch a step (two network rows a sample and step; guidance 1: one row), and
    a one-step sample at scale 2 is x(null) + 2 (x(c) - x(null)) from the same noise (the step
    is affine in the net's output; x0 clipping off, as it acts after the combination)."""
    model = _model("mnist-shortcut")
    model.denoiser.clip_x0 = None
    labels = torch.tensor([0, 1, 0, 1])

    def draw(guidance, steps=1, cond=labels):
        scfg = SampleConfig(
            sampler="shortcut", steps=steps, spacing="uniform", n=4, batch_size=4, guidance=guidance
        )
        with counted_rows(model) as rows:
            return model.sample(scfg, cond=cond), rows[0]

    assert draw(2.0, steps=2)[1] == 2 * 4 * 2
    (conditional, rows), (guided, rows_guided) = draw(1.0), draw(2.0)
    assert (rows, rows_guided) == (4, 8)
    unconditional, _ = draw(1.0, cond=torch.full_like(labels, 2))  # the null label
    want = unconditional + 2 * (conditional - unconditional)
    torch.testing.assert_close(guided, want, atol=1e-5, rtol=1e-5)
    assert (guided - conditional).abs().max() > 1e-3


@pytest.mark.slow
def test_mnist_meanflow_trains_and_samples_guided_at_one_call(meanflow_run, tmp_path, capsys):
    """3 training steps; the run's kind records the folded guidance, a guided sample costs one
    network call (the sampler's NFE and the rows counted), its samples file says how it was
    guided, and --guidance 2 is refused in one line, exit 2, nothing written."""
    run = load_run(meanflow_run)
    assert run.model.kind.folded_guidance == FoldedGuidance(1.0, 0.25)
    scfg = dataclasses.replace(run.cfg.sample, n=4, batch_size=4)
    samples, timing = timed_samples(run, scfg, run.model.conditioner.balanced(4))
    assert samples.shape == (4, 1, 8, 8) and bool(samples.isfinite().all())
    assert nfe_of(scfg.sampler, scfg.steps, scfg) == 1 and timing["net_calls"] == 1
    out = tmp_path / "s.npz"
    argv = ["sample", str(meanflow_run), "--n", "4", "--per-class", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    with np.load(out) as f:
        assert "kappa=0.25" in str(f["folded_guidance"]) and f["labels"].tolist() == [0, 0, 1, 1]
    refused = tmp_path / "g.npz"
    argv = ["sample", str(meanflow_run), "--n", "4", "--guidance", "2", "--out", str(refused)]
    capsys.readouterr()
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "omega=1, kappa=0.25" in err, err
    assert not refused.exists() and not refused.with_suffix(".png").exists()


@pytest.mark.slow
def test_mnist_shortcut_trains_and_samples_with_cfg(stripes, tmp_path):
    """3 steps, then 1 and 2 shortcut steps with classifier-free guidance 2 through the CLI."""
    train_here(_tiny("mnist-shortcut", stripes), tmp_path / "shortcut")
    for steps in ("1", "2"):
        out = tmp_path / f"s{steps}.npz"
        argv = ["sample", str(tmp_path / "shortcut"), "--n", "4", "--per-class", "--quiet"]
        assert main([*argv, "--steps", steps, "--guidance", "2", "--out", str(out)]) == 0
        with np.load(out) as f:
            assert f["samples"].shape == (4, 1, 8, 8) and np.isfinite(f["samples"]).all()
            assert float(f["guidance"]) == 2.0


def test_mnist_ct_is_ict_from_scratch_on_the_mnist_unet(stripes, tmp_path):
    """mnist-ct (the MNIST iCT row of bench/few_step.py): no teacher, the mnist U-Net and labels,
    iCT's curriculum starting at s0 + 1 levels; it trains and samples in 1 and 2 steps."""
    cfg, base = preset("mnist-ct"), preset("mnist")
    assert cfg.train.loss == "ict" and not cfg.consistency.teacher
    assert cfg.model.unet == base.model.unet and cfg.data.class_conditional
    assert (cfg.diffusion.schedule, cfg.diffusion.sigma_data) == ("edm", 0.5)
    run = tmp_path / "ct"
    train_here(_tiny("mnist-ct", stripes), run)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["consistency_N"] == cfg.consistency.s0 + 1
    for steps in ("1", "2"):
        out = tmp_path / f"s{steps}.npz"
        argv = ["sample", str(run), "--n", "4", "--per-class", "--quiet", "--steps", steps]
        assert main([*argv, "--out", str(out)]) == 0
        with np.load(out) as f:
            assert f["samples"].shape == (4, 1, 8, 8) and np.isfinite(f["samples"]).all()


@pytest.mark.slow
def test_a_guided_image_runs_figure_holds_each_step_count(meanflow_run):
    """plots/steps_compare.png of the folded MeanFlow run: 1, 2, 4 and 8 steps, each 40 images
    of the two classes in order, from the same noise (1 step differs from 8)."""
    from difflab.report.few_step import few_step_figures

    run = load_run(meanflow_run)
    (path,) = few_step_figures(meanflow_run, run.model.kind)
    assert path == meanflow_run / "plots" / "steps_compare.png" and path.is_file()
    with np.load(meanflow_run / "samples" / "steps_compare.npz") as f:
        assert sorted(f.files) == ["steps_1", "steps_2", "steps_4", "steps_8"]
        assert all(f[key].shape == (40, 1, 8, 8) for key in f.files)
        assert np.abs(f["steps_1"] - f["steps_8"]).max() > 1e-4
