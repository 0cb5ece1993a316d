"""A DiT run shared through diffusers: `difflab export --format diffusers` writes a folder whose
DiTTransformer2DModel, looped over diffusers' own DDIMScheduler, lands where difflab's DDIM does;
`difflab import` reads it back; what DiTTransformer2DModel cannot hold is refused."""

import json

import pytest
import torch

from conftest import stripes_folder
from difflab.cli import main
from difflab.config import SampleConfig, apply_overrides, preset
from difflab.runs import load_run

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a dev extra: pip install -e '.[dev]'"
)

TINY = [
    "data.name=imagefolder",
    "data.image_size=16",
    "data.channels=1",
    "model.dit.width=32",
    "model.dit.depth=2",
    "model.dit.heads=2",
    "model.dit.patch_size=4",
    "diffusion.schedule=linear",
    "diffusion.num_steps=1000",
    "train.precision=fp32",
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.lr=3e-3",
    "train.ema_decay=0.5",
    "train.time_limit_minutes=0",
    "sample.steps=4",
    "sample.n=4",
    "sample.batch_size=4",
]
STEPS, SPACING = 4, "trailing"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return stripes_folder(tmp_path_factory.mktemp("images"))


def _train(folder, runs, name, *extra):
    sets = [f"data.root={folder}", *TINY, *extra]
    argv = ["train", "--preset", "mnist-dit", "--runs", str(runs), "--name", name, "--quiet"]
    assert main([*argv, "--no-finish", *[x for s in sets for x in ("--set", s)]]) == 0
    return runs / name


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    """A tiny unconditional (eps) and class-conditional (v, clipped) DiT, trained 4 steps."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "uncond": _train(
            folder,
            root,
            "u",
            "diffusion.prediction=eps",
            "data.class_conditional=false",
            "sample.guidance=1",
        ),
        "cond": _train(folder, root, "c", "data.class_conditional=true", "diffusion.prediction=v"),
    }


def _difflab_ddim(run_dir, x_T, labels):
    from difflab.diffusion.guidance import guided
    from difflab.samplers import sample_ddim, timesteps

    run = load_run(run_dir)
    scfg = SampleConfig(sampler="ddim", steps=STEPS, spacing=SPACING, n=len(x_T), guidance=1.0)
    den = run.model.denoiser
    if labels is not None:
        den = guided(den, scfg.guidance, run.model.conditioner)
    return sample_ddim(den, x_T, timesteps(run.model.schedule, STEPS, SPACING), y=labels)


def _diffusers_ddim(folder, x_T, labels):
    """diffusers' DiT pipeline loop (DiTPipeline.__call__'s, without a VAE or guidance):
    DDIMScheduler's timesteps, transformer(x, timestep, class_labels), scheduler.step."""
    net, info = diffusers.DiTTransformer2DModel.from_pretrained(
        folder, subfolder="transformer", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(STEPS)
    x = x_T.clone()
    y = labels if labels is not None else torch.zeros(len(x), dtype=torch.long)  # zero row
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            t = timestep.expand(len(x))
            out = net.eval()(x, timestep=t, class_labels=y).sample
            x = scheduler.step(out, timestep, x, use_clipped_model_output=True).prev_sample
    return x


def _one_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error:") and needle in err, err


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_dit_export_samples_like_difflab_and_imports_back(runs, tmp_path, kind):
    run_dir, out = runs[kind], tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "diffusers", "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert diffusers.DiTPipeline.from_pretrained(out, vae=None).transformer.config.sample_size == 16
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1]) if kind == "cond" else None
    ours = _difflab_ddim(run_dir, x_T, labels)
    theirs = _diffusers_ddim(out, x_T, labels)
    # fp32 sums in another order over 4 steps (measured 1.5e-6 unconditional, 1.8e-7 with labels)
    assert float((ours - theirs).abs().max()) < 1e-5
    assert "DiTTransformer2DModel" in (out / "README.md").read_text()
    assert main(["import", str(out), "--name", "back", "--runs", str(tmp_path / "runs")]) == 0
    back = load_run(tmp_path / "runs" / "back")
    assert back.cfg.model.name == "dit" and back.cfg.model.dit == load_run(run_dir).cfg.model.dit
    # 1e-6, not bitwise by construction: the one-step fold multiplies the first time Linear by a
    # rotation in float64 and rounds to fp32 on export, then by its inverse on import; each
    # weight comes back within an ulp or two (bit for bit in the runs measured, not guaranteed)
    again = _difflab_ddim(tmp_path / "runs" / "back", x_T, labels)
    assert float((again - ours).abs().max()) < 1e-6
    argv = ["train", "--resume", str(tmp_path / "runs" / "back"), "--quiet", "--no-finish"]
    assert main([*argv, "--set", "train.steps=2"]) == 0  # an imported DiT fine-tunes


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.dit.qk_norm=true", "q/k normalisation"),
        ("model.dit.mlp_ratio=2", "MLP ratio other than 4"),
        ("model.dit.text=joint", "joint text attention"),
        ("diffusion.num_steps=0", "continuous-time"),
        ("model.codec=runs/ae", "latent diffusion"),
    ],
)
def test_what_diffusers_cannot_hold_names_the_part(override, needle):
    from difflab.share import dit_keys, mapping

    cfg = apply_overrides(preset("mnist-dit"), [*TINY, override])
    with pytest.raises(mapping.NoEquivalent, match=needle):  # the order export checks in
        mapping.check_exportable(cfg.model, cfg.diffusion)
        dit_keys.transformer_config(cfg.model, (1, 16, 16), 2)


def test_export_of_a_qk_norm_dit_is_one_line_and_writes_nothing(folder, tmp_path, capsys):
    run_dir = _train(
        folder,
        tmp_path,
        "qk",
        "model.dit.qk_norm=true",
        "train.steps=2",
        "train.checkpoint_every=2",
    )
    out = tmp_path / "out"
    argv = ["export", str(run_dir), "--format", "diffusers", "--out", str(out)]
    _one_error(capsys, argv, "q/k normalisation (model.dit.qk_norm)")
    assert not out.exists()
