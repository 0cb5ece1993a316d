"""Sharing a model: diffusers export and import, half-precision EMA files, the HTML report.

The reference implementation is diffusers itself: a plain loop over its DDIMScheduler, fed the
exported UNet2DModel, must land where difflab's DDIM does from the same x_T (within 1e-4).
"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import needs, stripes_folder
from difflab.cli import main
from difflab.config import SampleConfig
from difflab.runs import load_run

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a dev extra: pip install -e '.[dev]'"
)

TINY = [
    "data.name=imagefolder",
    "data.image_size=16",
    "data.channels=1",
    "model.unet.base_channels=16",
    "model.unet.channel_mults=1,2",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_levels=1",
    "model.unet.norm_groups=8",
    "model.unet.dropout=0.0",
    "model.unet.num_heads=2",
    "diffusion.schedule=linear",
    "diffusion.num_steps=1000",
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.lr=3e-3",
    "train.ema_decay=0.5",
    "sample.steps=4",
    "sample.n=4",
    "sample.batch_size=4",
]
STEPS, SPACING = 8, "trailing"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return stripes_folder(tmp_path_factory.mktemp("images"))


def _train(folder, runs, name, *extra, finish=False):
    sets = [f"data.root={folder}", *TINY, *extra]
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", name, "--quiet"]
    argv += [] if finish else ["--no-finish"]
    assert main([*argv, *[x for s in sets for x in ("--set", s)]]) == 0
    return runs / name


@pytest.fixture(scope="module")
def report_run(folder, tmp_path_factory):
    """A tiny class-conditional (v, clipped) run, trained 4 steps and finished: its report."""
    root = tmp_path_factory.mktemp("report")
    sets = ["data.class_conditional=true", "diffusion.prediction=v", "train.sample_every=4"]
    return _train(folder, root, "c", *sets, finish=True)


@pytest.fixture(scope="module")
def runs(folder, report_run, tmp_path_factory):
    """A tiny unconditional (eps) run, trained 4 steps, and the class-conditional report_run."""
    root = tmp_path_factory.mktemp("runs")
    return {"uncond": _train(folder, root, "u", "diffusion.prediction=eps"), "cond": report_run}


def _difflab_ddim(run_dir, x_T, labels):
    run = load_run(run_dir)
    scfg = SampleConfig(sampler="ddim", steps=STEPS, spacing=SPACING, n=len(x_T), guidance=1.0)
    from difflab.diffusion.guidance import guided
    from difflab.samplers import sample_ddim, timesteps

    den = run.model.denoiser
    if labels is not None:
        den = guided(den, scfg.guidance, run.model.conditioner)
    ts = timesteps(run.model.schedule, STEPS, SPACING)
    return sample_ddim(den, x_T, ts, y=labels)


def _diffusers_ddim(folder, x_T, labels):
    unet, info = diffusers.UNet2DModel.from_pretrained(
        folder, subfolder="unet", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(STEPS)
    x = x_T.clone()
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            out = unet(x, timestep, class_labels=labels).sample
            x = scheduler.step(out, timestep, x, use_clipped_model_output=True).prev_sample
    return x


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_export_samples_like_difflab_and_imports_back(runs, tmp_path, kind):
    run_dir, out = runs[kind], tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "diffusers", "--out", str(out)]) == 0
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1]) if kind == "cond" else None
    ours = _difflab_ddim(run_dir, x_T, labels)
    theirs = _diffusers_ddim(out, x_T, labels)
    assert float((ours - theirs).abs().max()) < 1e-4
    if kind == "uncond":
        for pipeline in (diffusers.DDPMPipeline, diffusers.DDIMPipeline):  # offline
            assert pipeline.from_pretrained(out).unet.config.sample_size == 16
    card = (out / "README.md").read_text()
    assert "training steps | 4" in card and "imagefolder" in card
    assert main(["import", str(out), "--name", "back", "--runs", str(tmp_path / "runs")]) == 0
    back = _difflab_ddim(tmp_path / "runs" / "back", x_T, labels)
    assert float((back - ours).abs().max()) < 1e-5
    if kind == "uncond":  # an imported run fine-tunes like any other (from step 0)
        argv = ["train", "--resume", str(tmp_path / "runs" / "back"), "--quiet", "--no-finish"]
        assert main([*argv, "--set", "train.steps=2"]) == 0
        assert (tmp_path / "runs" / "back" / "checkpoints" / "step-2").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_ema_file_is_small_and_samples_close(runs, tmp_path, dtype):
    run_dir, out = runs["cond"], tmp_path / f"ema-{dtype}.safetensors"
    argv = ["export", str(run_dir), "--format", "ema", "--dtype", dtype, "--out", str(out)]
    assert main(argv) == 0
    full = next((run_dir / "checkpoints").glob("step-*")) / "ema.safetensors"
    assert out.stat().st_size <= 0.55 * full.stat().st_size
    from safetensors import safe_open

    with safe_open(out, "pt") as f:  # a plain tensor file: nothing to execute
        assert json.loads(f.metadata()["difflab_data"])["num_classes"] == 2
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    half, full_samples = _difflab_ddim(out, x_T, labels), _difflab_ddim(run_dir, x_T, labels)
    tolerance = {"fp16": 0.02, "bf16": 0.1}[dtype]  # measured 4-step nets, x in [-1, 1]
    assert float((half - full_samples).abs().max()) < tolerance
    npz = tmp_path / "s.npz"
    assert main(["sample", str(out), "--n", "2", "--steps", "2", "--out", str(npz), "--quiet"]) == 0
    assert np.load(npz)["samples"].shape == (2, 1, 16, 16)


def _one_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error:") and needle in err, err


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(runs, folder, tmp_path, capsys):
    run_dir = runs["uncond"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    argv = ["export", str(run_dir), "--format", "diffusers", "--out", str(busy)]
    _one_error(capsys, argv, "--force")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert main([*argv, "--force"]) == 0 and (busy / "model_index.json").is_file()
    half = tmp_path / "e.safetensors"
    assert main(["export", str(run_dir), "--format", "ema", "--out", str(half)]) == 0
    _one_error(capsys, ["train", "--resume", str(half)], "cannot be trained on")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "e.safetensors"]


def test_export_refuses_what_diffusers_cannot_represent():
    from difflab.config import apply_overrides, preset
    from difflab.share import mapping

    refusals = {
        "diffusion.prediction=edm": "EDM preconditioning",
        "diffusion.num_steps=0": "continuous-time",
        "diffusion.num_steps=500": "1000-step table",
        "model.time_scale=1": "model.time_scale=1: diffusers embeds the integer timestep",
        "model.unet.downsample=avgpool": "downsample=avgpool",
        "model.unet.attention_levels=0,1": "one attention head width",
    }
    for override, needle in refusals.items():
        cfg = apply_overrides(preset("imagefolder"), [*TINY, override])
        with pytest.raises(mapping.NoEquivalent, match=needle):
            mapping.check_exportable(cfg.model, cfg.diffusion)
            mapping.unet2d_config(cfg.model, (1, 16, 16), 0)
    with pytest.raises(mapping.NoEquivalent, match="mlp"):
        mapping.check_exportable(preset("toy2d").model, preset("toy2d").diffusion)
        mapping.unet2d_config(preset("toy2d").model, (2,), 0)


def test_export_refuses_kinds_of_run_ddpm_pipeline_cannot_sample():
    """The run's kind, not its network, decides: a consistency, flow, latent or text run has a
    U-Net too, but DDPMPipeline would sample it as a plain pixel-space diffusion model."""
    from difflab import build
    from difflab.config import apply_overrides, preset
    from difflab.model import DataKind
    from difflab.share import mapping

    images = DataKind((1, 28, 28), 10)
    refusals = {
        ("mnist", "train.loss=ict"): "consistency run",
        ("mnist", "diffusion.schedule=rectified,diffusion.num_steps=0"): "flow run",
        ("mnist", "model.codec=runs/ae"): "latent run",
        ("mnist-text", ""): "text conditioning",
    }
    for (name, override), needle in refusals.items():
        cfg = apply_overrides(preset(name), override.split(",") if override else [])
        with pytest.raises(mapping.NoEquivalent, match=needle):
            mapping.check_kind(build.run_kind(cfg, images))
    mapping.check_kind(build.run_kind(preset("mnist"), images))  # class labels in pixel space


@pytest.mark.parametrize("classes", [0, 3])
def test_mapped_weights_give_diffusers_the_same_network(classes):
    """A random-weight U-Net (every block type, 2 heads) and its UNet2DModel agree at steps
    1, 500 and 1000 (diffusers' timesteps 0, 499, 999), and the weights map back exactly."""
    from difflab.config import apply_overrides, preset
    from difflab.nets.unet import UNet
    from difflab.share.keys import from_diffusers, to_diffusers
    from difflab.share.mapping import unet2d_config

    cfg = apply_overrides(preset("imagefolder"), TINY)
    u = cfg.model.unet
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=8,
        num_classes=classes,
    )
    for p in net.parameters():
        p.data.normal_(0, 0.05)  # zero-initialised layers would hide a mapping error
    unet = diffusers.UNet2DModel(**unet2d_config(cfg.model, (1, 16, 16), classes))
    unet.load_state_dict(to_diffusers(net.state_dict(), u), strict=True)  # no missing key
    x, i = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 1000])
    y = torch.tensor([0, 1, 3]) if classes else None  # 3 = the null label
    with torch.no_grad():
        ours, theirs = net(x, i / 1000, y), unet(x, i - 1, class_labels=y).sample
    assert float((ours - theirs).abs().max()) < 1e-5 * float(ours.abs().max())
    back = from_diffusers(unet.state_dict(), u)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=1e-6, rtol=0)


def test_import_refuses_a_folder_that_is_not_diffusers(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    argv = ["import", str(tmp_path / "plain"), "--name", "x", "--runs", str(tmp_path)]
    _one_error(capsys, argv, "not a diffusers model folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


@pytest.mark.slow
def test_export_of_an_edm_run_is_refused_and_writes_nothing(folder, tmp_path, capsys):
    edm = _train(
        folder,
        tmp_path,
        "edm",
        "diffusion.prediction=edm",
        "diffusion.schedule=edm",
        "diffusion.num_steps=0",
    )
    out = tmp_path / "out"
    _one_error(capsys, ["export", str(edm), "--format", "diffusers", "--out", str(out)], "EDM")
    assert not out.exists()


def test_report_page_holds_every_figure(report_run, tmp_path):
    from difflab.report.html import figures, referenced_files

    run_dir = report_run
    page = (run_dir / "report.html").read_text()  # written by training's finish step
    every = [p for paths in figures(run_dir).values() for p in paths]
    assert len(every) >= 10
    files = referenced_files(page)
    assert sorted(files) == sorted(str(p.relative_to(run_dir)) for p in every)
    assert all((run_dir / f).is_file() for f in files)
    for needle in (
        "learning rate",
        "gradient norm",
        "parameter norm",
        "throughput",
        "config",
        'name="viewport"',
        "grid-step-4.png",
        "denoising.gif",
    ):
        assert needle in page, needle
    assert "http://" not in page and "https://" not in page  # no network
    assert main(["report", str(run_dir)]) == 0


@needs("chromium", BROWSER is not None, "apt-get install -y chromium")
def test_report_renders_in_headless_chromium(report_run):
    assert BROWSER is not None, "DIFFLAB_TESTS_REQUIRE names chromium, but it is not on PATH"
    page = report_run / "report.html"
    argv = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    dom = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    body = dom[dom.index("<body") : dom.index(">", dom.index("<body"))]  # the attributes set
    assert 'data-images-ok="1"' in body and "data-script-error" not in body, body
