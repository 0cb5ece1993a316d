"""User errors are one line and exit 2 with nothing written; anything else keeps its traceback.

Each bad input below once gave a raw traceback, or was accepted and silently did something else
(issue 38). The CLI catches only ConfigError (the project's error type) and user files that
cannot be read or written.
"""

import json
import os

import numpy as np
import pytest
import torch

from difflab import files
from difflab.cli import COMMANDS, main
from difflab.config import ConfigError, RunConfig
from difflab.diffusion import schedules
from difflab.samplers import timesteps

SETS = (
    "model.mlp.width=16",
    "model.mlp.depth=1",
    "train.steps=4",
    "train.batch_size=32",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "sample.sampler=ddim",
    "sample.steps=4",
    "sample.n=40",
)
FAST = ["--quiet", *(arg for s in SETS for arg in ("--set", s))]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    argv = ["train", "--preset", "toy2d", "--runs", str(runs), "--name", "r", "--no-finish"]
    assert main([*argv, *FAST]) == 0
    return runs / "r"


def _one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("difflab: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# -- the error type ------------------------------------------------------------------------------


def test_project_error_is_one_line_and_an_internal_value_error_a_traceback(monkeypatch, capsys):
    def user_error(args):
        raise ConfigError("--thing must be >= 1, got 0")

    def internal_bug(args):
        raise ValueError("shapes (3,) and (4,) do not broadcast")

    monkeypatch.setitem(COMMANDS, "plot", user_error)
    assert main(["plot", "somewhere"]) == 2
    _one_line(capsys, "--thing must be >= 1")
    monkeypatch.setitem(COMMANDS, "plot", internal_bug)
    with pytest.raises(ValueError, match="do not broadcast") as caught:
        main(["plot", "somewhere"])
    assert not isinstance(caught.value, ConfigError)
    assert capsys.readouterr().err == ""  # nothing pretends it was the user's input


def test_config_error_is_still_a_value_error():
    assert issubclass(ConfigError, ValueError)  # library callers' `except ValueError` holds
    with pytest.raises(ValueError):
        timesteps(schedules.linear(), 0)


# -- raw tracebacks and silent nonsense ----------------------------------------------------------


def test_config_that_is_a_folder(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path), "--runs", str(tmp_path / "runs")]) == 2
    _one_line(capsys, "is a folder", "config.json")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(ROOT, reason="root reads a chmod-000 file: no unreadable file to make")
def test_config_that_cannot_be_read(tmp_path, capsys):
    path = tmp_path / "c.json"
    RunConfig().save(path)
    path.chmod(0)
    try:
        assert main(["train", "--config", str(path), "--runs", str(tmp_path / "runs")]) == 2
    finally:
        path.chmod(0o600)
    _one_line(capsys, "cannot be read", "--config")
    assert not (tmp_path / "runs").exists()


def _read_only(folder, monkeypatch):
    """A folder writes fail in: chmod for a user; for root (whom chmod does not stop), the
    kernel's answer simulated where files.check_writable asks for it."""
    folder.mkdir()
    if ROOT:

        def refuse(f):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(files, "_probe_write", refuse)
    else:
        folder.chmod(0o555)
    return folder


def test_read_only_runs_folder(tmp_path, monkeypatch, capsys):
    runs = _read_only(tmp_path / "ro", monkeypatch)
    argv = ["train", "--preset", "toy2d", "--runs", str(runs), "--name", "r"]
    assert main([*argv, *FAST]) == 2
    _one_line(capsys, f"--runs {runs}", "cannot write", "writable")
    assert list(runs.iterdir()) == []


def test_out_in_a_read_only_folder(run_dir, tmp_path, monkeypatch, capsys):
    folder = _read_only(tmp_path / "ro", monkeypatch)
    out = folder / "s.npz"
    assert main(["sample", str(run_dir), "--out", str(out), "--quiet"]) == 2
    _one_line(capsys, f"--out {out}", "cannot write")
    assert list(folder.iterdir()) == []


def test_npz_labels_must_name_one_class_per_sample(tmp_path, capsys):
    samples = np.zeros((6, 1, 8, 8), np.float32)
    np.savez(tmp_path / "ref.npz", samples=samples)
    for labels in (np.zeros(1, np.int64), np.zeros(5, np.int64)):  # broadcasts; too short
        np.savez(tmp_path / "s.npz", samples=samples, labels=labels)
        argv = ["eval", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "ref.npz")]
        assert main([*argv, "--out", str(tmp_path / "e.json")]) == 2
        _one_line(capsys, "'labels' has shape", f"({len(labels)},) for 6 samples")
    assert not (tmp_path / "e.json").exists()


def test_n_reference_must_be_positive(tmp_path, capsys):
    samples = np.zeros((6, 1, 8, 8), np.float32)
    np.savez(tmp_path / "s.npz", samples=samples)
    argv = ["eval", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz")]
    assert main([*argv, "--n-reference", "-5"]) == 2  # was: every image but 5
    _one_line(capsys, "--n-reference must be >= 1, got -5")


def test_n_zero_is_named_as_such(run_dir, tmp_path, capsys):
    for command in (
        ["sample", str(run_dir), "--out", str(tmp_path / "x.npz")],
        ["eval", str(run_dir)],
    ):
        assert main([*command, "--n", "0", "--quiet"]) == 2
        err = _one_line(capsys, "--n must be >= 1, got 0")
        assert "--nproc" not in err  # was: "use --nproc 0 or fewer"
    assert not (tmp_path / "x.npz").exists()


# -- options accepted and then ignored -----------------------------------------------------------


def test_table_spacings_and_t_end_are_refused_where_they_would_be_ignored():
    flow, table = schedules.RectifiedFlowSchedule(), schedules.linear()
    for spacing in ("trailing", "leading", "linspace"):
        with pytest.raises(ConfigError, match=f"spacing {spacing} picks steps of a discrete"):
            timesteps(flow, 10, spacing)  # was: a uniform grid
        assert len(timesteps(table, 10, spacing)) == 11  # a table honours them
    for spacing in ("uniform", "quadratic", "trailing"):
        with pytest.raises(ConfigError, match=r"t_end .* logsnr and karras grids only"):
            timesteps(table, 10, spacing, t_end=0.2)  # was: t_end dropped
    # the default grid is the uniform one on both kinds (what "trailing" silently gave a flow)
    assert torch.equal(timesteps(flow, 10), timesteps(flow, 10, "uniform"))
    assert torch.equal(timesteps(table, 10), timesteps(table, 10, "trailing"))
    evenly = torch.linspace(flow.t_max, flow.t_min, 5, dtype=torch.float64)[:-1]
    assert torch.allclose(timesteps(flow, 4)[:-1], evenly)


def test_t_end_outside_its_grids_from_the_cli(run_dir, tmp_path, capsys):
    argv = ["sample", str(run_dir), "--out", str(tmp_path / "x.npz"), "--quiet"]
    assert main([*argv, "--spacing", "uniform", "--t-end", "0.3"]) == 2
    _one_line(capsys, "logsnr and karras grids only")
    assert not (tmp_path / "x.npz").exists()


def test_gif_without_prompts_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert main(["sample", str(run_dir), "--out", str(out), "--gif", "--quiet"]) == 2
    _one_line(capsys, "--gif", "leave out --gif")
    assert not out.exists()


IMAGE_FLAGS = (
    ["--metric", "fd_judge"],
    ["--reference", "mnist:test"],
    ["--judge", "j.safetensors"],
    ["--n-reference", "10"],
)


@pytest.mark.parametrize("extra", IMAGE_FLAGS)
def test_image_metric_flags_on_2d_points_are_refused(tmp_path, extra, capsys):
    np.savez(tmp_path / "p.npz", samples=np.zeros((20, 2), np.float32))
    out = tmp_path / "e.json"
    argv = ["eval", str(tmp_path / "p.npz"), "--dataset", "checkerboard", "--out", str(out)]
    assert main([*argv, *extra]) == 2
    _one_line(capsys, extra[0], "2-D points", "leave them out")
    assert not out.exists()
    assert main(argv) == 0  # the same file without them is measured
    assert "in_square" in json.loads(out.read_text())  # checkerboard's own metric


@pytest.mark.parametrize(
    ("name", "channels"), [("checkerboard", 1), ("checkerboard", 3), ("mnist", 2), ("mnist", 3)]
)
def test_data_channels_outside_imagefolder_is_refused(tmp_path, name, channels, request, capsys):
    argv = ["train", "--preset", "toy2d", "--runs", str(tmp_path / "runs"), "--name", "r"]
    sets = ["--set", f"data.name={name}", "--set", f"data.channels={channels}"]
    if name == "mnist":  # MNIST is grey: 2 or 3 channels would be silently ignored
        sets += ["--set", f"data.root={request.getfixturevalue('shared_data')}"]
    code = main([*argv, *FAST, *sets])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("difflab: error:") and "Traceback" not in err
    assert "applies to data.name=imagefolder only" in err
