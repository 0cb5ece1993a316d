"""Image runs end to end on a tiny synthetic image folder (two classes), through the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import stripes_folder
from difflab.cli import main
from difflab.config import apply_overrides, preset
from difflab.report import images as report_images
from difflab.report.images import state_lams
from difflab.training.loop import train

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
    "train.batch_size=8",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "sample.steps=4",
    "sample.n=4",
    "sample.batch_size=4",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return stripes_folder(tmp_path_factory.mktemp("images"))


def _args(folder, *extra):
    sets = [f"data.root={folder}", *TINY, *extra]
    return [x for s in sets for x in ("--set", s)]


@pytest.fixture(scope="module")
def cond_run(folder, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "c", "--quiet"]
    extra = ("data.class_conditional=true", "train.sample_every=3")
    assert main([*argv, *_args(folder, *extra)]) == 0
    return runs / "c"


def test_conditional_image_run_has_every_figure(cond_run):
    names = (
        "samples.png",
        "forward.png",
        "denoising.gif",
        "trajectory_strip.png",
        "raw_vs_ema.png",
        "sampler_comparison.png",
        "diversity.png",
        "loss.png",
        "loss_by_t.png",
        "grid_history.png",
    )
    for name in names:
        assert (cond_run / "plots" / name).stat().st_size > 500, name
    grids = sorted(p.name for p in (cond_run / "samples").glob("grid-step-*.png"))
    assert grids == ["grid-step-3.png", "grid-step-6.png"]
    info = json.loads((cond_run / "checkpoints" / "step-6" / "data.json").read_text())
    assert info == {"shape": [1, 16, 16], "num_classes": 2, "class_names": ["h", "v"]}
    assert (cond_run / "plots" / "samples.png").unlink() is None
    assert main(["plot", str(cond_run), "--quiet"]) == 0  # from the files, no dataset needed
    assert (cond_run / "plots" / "samples.png").exists()


def test_sample_per_class_with_guidance(cond_run, tmp_path):
    out = tmp_path / "s.npz"
    argv = ["sample", str(cond_run), "--n", "4", "--per-class", "--guidance", "3", "--steps", "3"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (4, 1, 16, 16) and f["labels"].tolist() == [0, 0, 1, 1]
        assert f["samples"].dtype == np.float32 and np.abs(f["samples"]).max() <= 1.0
        assert float(f["guidance"]) == 3.0
    assert out.with_suffix(".png").stat().st_size > 100


def test_guidance_interval_from_the_command_line(cond_run, tmp_path):
    # An interval above every level of the grid leaves the conditional model (guidance 1), bit
    # for bit; the file says which interval was asked for.
    argv = ["sample", str(cond_run), "--n", "4", "--per-class", "--steps", "3", "--quiet"]
    out = {}
    for name, extra in (
        ("cond", ["--guidance", "1"]),
        ("above", ["--guidance", "3", "--guidance-tmin", "1e6"]),
        ("guided", ["--guidance", "3"]),
    ):
        assert main([*argv, *extra, "--out", str(tmp_path / f"{name}.npz")]) == 0
        with np.load(tmp_path / f"{name}.npz") as f:
            out[name] = f["samples"]
            if name == "above":
                assert f["guidance_interval"].tolist() == [1e6, 0.0]
    np.testing.assert_array_equal(out["above"], out["cond"])
    assert not np.array_equal(out["guided"], out["cond"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--class", "5"], "out of range"),
        (["--per-class", "--n", "3"], "multiple of the 2 classes"),
        (["--guidance", "-1"], ">= 0"),
        (["--guidance", "2", "--guidance-tmin", "2", "--guidance-tmax", "1"], "above"),
    ],
)
def test_bad_conditional_requests(cond_run, tmp_path, capsys, extra, message):
    argv = ["sample", str(cond_run), "--out", str(tmp_path / "x.npz"), "--steps", "2", "--quiet"]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_unconditional_run_refuses_class_requests(folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "u", "--quiet"]
    assert main([*argv, "--no-finish", *_args(folder)]) == 0
    for extra in (["--class", "0"], ["--guidance", "2"]):
        out = tmp_path / "x.npz"
        assert main(["sample", str(runs / "u"), "--out", str(out), "--quiet", *extra]) == 2
        assert "unconditional" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.image_size=18", "model.unet.channel_mults=1,2,2"], "not divisible by 2^2 = 4"),
        (["model.unet.attention_levels=3"], "attention"),
        (["data.flip=maybe"], "data.flip"),
        (["data.class_conditional=true", "data.root=/nonexistent/images"], "/nonexistent/images"),
    ],
)
def test_bad_image_configs_exit_2_and_write_nothing(folder, tmp_path, capsys, extra, message):
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "bad", "--quiet"]
    assert main([*argv, *_args(folder, *extra)]) == 2
    assert message in capsys.readouterr().err
    assert not (runs / "bad").exists()


def test_empty_and_corrupt_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"not a png")
    for root, message in ((tmp_path / "empty", "no images"), (tmp_path / "bad", "broken.png")):
        argv = ["train", "--preset", "imagefolder", "--runs", str(tmp_path / "runs"), "--quiet"]
        assert main([*argv, *_args(root)]) == 2
        assert message in capsys.readouterr().err


def test_image_resume_is_bitwise_exact(folder, tmp_path):
    cfg = apply_overrides(
        preset("imagefolder"),
        [
            f"data.root={folder}",
            *TINY,
            "data.class_conditional=true",
            "data.flip=on",
            "train.grad_accum=2",
        ],
    )
    a = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=3)
    b = train(cfg, tmp_path / "b", resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_eval_of_an_image_folder_run_says_which_metrics_apply(cond_run, capsys):
    assert main(["eval", str(cond_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'imagefolder' has none" in err and "--judge FILE" in err and "--metric fid" in err


def test_denoising_gif_states_are_spaced_in_log_snr(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(report_images, "GIF_FRAMES", 8)  # fewer states than steps, quickly
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "g", "--quiet"]
    assert main([*argv, *_args(folder, "sample.steps=24", "sample.sampler=ddpm")]) == 0
    with np.load(runs / "g" / "samples" / "trajectory.npz") as f:
        steps, ts = f["steps"], f["ts"]
    cfg = apply_overrides(preset("imagefolder"), [f"data.root={folder}", *TINY])
    lams = state_lams(cfg, ts)
    assert steps[0] == 0 and steps[-1] == 24 and (np.diff(steps) > 0).all()
    assert len(steps) <= 8 and (np.diff(lams) > 0).all()
    gaps = np.diff(lams[1:-1])  # x_T and the sample are shown, not spaced
    assert np.median(np.abs(gaps / np.median(gaps) - 1)) < 0.15, gaps
    with Image.open(runs / "g" / "plots" / "denoising.gif") as gif:
        assert gif.n_frames == len(steps)
