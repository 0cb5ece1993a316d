"""End to end through the command line, as a user would run it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from difflab.cli import main

FAST = [
    "--set",
    "model.mlp.width=32",
    "--set",
    "model.mlp.depth=1",
    "--set",
    "train.steps=30",
    "--set",
    "train.batch_size=128",
    "--set",
    "train.log_every=10",
    "--set",
    "train.checkpoint_every=15",
    "--set",
    "sample.sampler=ddpm",
    "--set",
    "sample.steps=10",
    "--set",
    "sample.n=300",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    assert (
        main(["train", "--preset", "toy2d", "--runs", str(runs), "--name", "r", "--quiet", *FAST])
        == 0
    )
    return runs / "r"


def test_train_writes_a_complete_run_directory(run_dir):
    for name in (
        "config.json",
        "metrics.jsonl",
        "eval.json",
        "samples/samples.npz",
        "samples/trajectory.npz",
    ):
        assert (run_dir / name).is_file(), name
    for name in (
        "scatter.png",
        "forward.png",
        "reverse.gif",
        "trajectories.png",
        "loss.png",
        "loss_by_t.png",
    ):
        assert (run_dir / "plots" / name).stat().st_size > 1000, name
    result = json.loads((run_dir / "eval.json").read_text())
    with np.load(run_dir / "samples" / "samples.npz") as f:
        x = f["samples"]  # (300, 2): eval.json measures these, the run's own samples
    # kept squares of the checkerboard, counted here without difflab: (x + 1) * 2 lands in
    # [0, 4)^2 and the unit cell (i, j) there is kept when i + j is even
    cell = np.floor((x.astype(np.float64) + 1) * 2)
    kept = ((cell >= 0) & (cell < 4)).all(axis=1) & (cell.sum(axis=1) % 2 == 0)
    assert result["n"] == 300 and result["in_square"] == pytest.approx(kept.mean(), abs=1e-12)
    assert result["in_square_true"] == 1.0  # the data's own fresh samples all lie in a square


def test_sample_then_eval_an_npz(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert (
        main(
            [
                "sample",
                str(run_dir),
                "--sampler",
                "ddpm",
                "--steps",
                "20",
                "--n",
                "50",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    with np.load(out) as f:
        assert f["samples"].shape == (50, 2) and f["samples"].dtype == np.float32
        assert str(f["sampler"]) == "ddpm" and int(f["steps"]) == 20
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", "checkerboard", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 50 and "sliced_w2" in result and "in_square" in result


def test_sampling_is_reproducible_from_the_cli(run_dir, tmp_path):
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for path, bs in zip(paths, ("7", "64"), strict=True):
        main(
            [
                "sample",
                str(run_dir),
                "--n",
                "20",
                "--steps",
                "10",
                "--batch-size",
                bs,
                "--out",
                str(path),
                "--quiet",
            ]
        )
    with np.load(paths[0]) as a, np.load(paths[1]) as b:
        # the same noise; only BLAS rounding (which differs between batch shapes) may differ,
        # slightly amplified by this barely trained network; another seed differs by O(1)
        np.testing.assert_allclose(a["samples"], b["samples"], rtol=0, atol=2e-3)


def test_plot_rebuilds_figures_from_the_directory(run_dir, capsys):
    (run_dir / "plots" / "scatter.png").unlink()
    assert main(["plot", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "plots" / "scatter.png").is_file()


def test_resume_mismatch_and_extension(run_dir, capsys):
    assert (
        main(
            [
                "train",
                "--resume",
                str(run_dir),
                "--set",
                "model.mlp.width=64",
                "--quiet",
                "--no-finish",
            ]
        )
        == 2
    )
    assert "model.mlp.width" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "train.steps=-5"], "train.steps must be >= 1"),
        (["train", "--set", "data.name=spiral"], "unknown dataset 'spiral'"),
        (["train", "--set", "diffusion.beta_end=1.5"], "beta"),
        (["train", "--set", "train.lrr=1"], "no such config key"),
        (["train", "--preset", "imagenet"], "unknown preset"),
        (["sample", "no/such/run", "--out", "x.npz"], "does not exist"),
        (["plot", "no/such/run"], "does not exist"),
        (["eval", "missing.npz", "--dataset", "checkerboard"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--quiet"] if argv[0] != "eval" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error:") and message in err and "Traceback" not in err
    if argv[0] == "train":
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("sample.sampler=ddimm", "unknown sampler 'ddimm'"),
        ("sample.spacing=sideways", "unknown timestep spacing"),
        ("sample.steps=0", "steps must be an integer >= 1"),
        ("sample.n=0", "sample.n (--n) must be >= 1"),
        ("sample.precision=fp8", "sample.precision must be one of"),
        ("sample.guidance=2", "unconditional model"),
        ("sample.variance=mid", "unknown DDPM variance"),  # checked by the sampler itself
        ("sample.shift=0", "sample.shift must be > 0"),
    ],
)
def test_sample_settings_are_checked_before_training(setting, message, tmp_path, capsys):
    """A bad sample.* value stops `train` before step 1 (not after the whole run, in the
    final sampling), with one line and nothing left in --runs."""
    argv = ["train", "--runs", str(tmp_path / "runs"), "--name", "r", "--quiet"]
    assert main([*argv, "--set", "train.steps=1000000", setting]) == 2
    err = capsys.readouterr().err
    assert err.count("difflab: error:") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_every_sample_problem_in_one_message(tmp_path, capsys):
    argv = ["train", "--runs", str(tmp_path), "--quiet", "--set", "sample.sampler=ddimm"]
    assert main([*argv, "sample.n=0", "sample.precision=fp8"]) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in ("unknown sampler", "sample.n", "sample.precision"))


def test_bad_sampler_options(run_dir, tmp_path, capsys):
    for extra, message in (
        (["--sampler", "lms"], "unknown sampler"),
        (["--steps", "0"], "steps"),
        (["--steps", "5000"], "at most 1000"),
        (["--sampler", "heun", "--spacing", "karras", "--steps", "5000"], "at most 1000"),
        (["--sampler", "dpmpp_2m", "--spacing", "sideways"], "unknown timestep spacing"),
        (["--sampler", "unipc", "--order", "7"], "order"),
        (["--n", "0"], "--n"),
    ):
        assert (
            main(["sample", str(run_dir), "--out", str(tmp_path / "x.npz"), "--quiet", *extra]) == 2
        )
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_unknown_option_exits_2_through_the_console_script():
    proc = subprocess.run(
        [sys.executable, "-m", "difflab", "train", "--bogus"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_eval_compare_sweeps_samplers_and_budgets(run_dir, tmp_path, capsys):
    out = tmp_path / "compare.json"
    args = ["eval", str(run_dir), "--compare", "--nfe", "3,6", "--samplers", "ddim,heun"]
    assert main([*args, "--grids", "karras", "--n", "300", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    got = {(r["sampler"], r["nfe"]) for r in result["rows"]}
    assert got == {("ddim", 3), ("ddim", 6), ("heun", 3), ("heun", 5)}  # Heun: 2 n - 1 <= budget
    assert all(r["spacing"] == "karras" and r["n"] == 300 for r in result["rows"])
    assert result["provenance"]["seed"] == 1 and (run_dir / "plots" / "compare.png").exists()
    assert "sliced_w2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nfe", "0"], "--nfe needs integers >= 1"),
        (["--nfe", "ten"], "comma-separated integers"),
        (["--samplers", "ddim,lms"], "unknown sampler(s) lms"),
    ],
)
def test_eval_compare_bad_input(run_dir, extra, message, capsys):
    assert main(["eval", str(run_dir), "--compare", "--quiet", "--n", "50", *extra]) == 2
    assert message in capsys.readouterr().err
