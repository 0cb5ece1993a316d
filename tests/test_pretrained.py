"""Pretrained runs in the package (`pretrained:NAME`): the shipped toy2d model samples the
checkerboard it was judged on, the API and the CLI read it alike, unknown or missing names are
one line, `difflab pretrained build` round-trips, and the files travel as package data."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from safetensors.torch import load_file

import difflab
from conftest import SMALL_TOY, train_here
from difflab import pretrained
from difflab.cli import main
from difflab.config import ConfigError, apply_overrides, preset
from difflab.evaluation.toy2d import in_square_fraction
from difflab.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
shipped = pytest.mark.skipif(
    "toy2d" not in pretrained.available(), reason="pretrained:toy2d is not shipped"
)


def _recorded(record: dict, metric: str) -> dict:
    return next(r for r in record["metrics"] if r["metric"] == metric)


@shipped
def test_pretrained_toy2d_samples_the_checkerboard_it_was_judged_on():
    """2,000 samples at the shipped defaults land in the kept squares as often as the record
    says of its 20,000 (within 4 binomial standard errors), far above noise's 0.5."""
    run = difflab.load("pretrained:toy2d", device="cpu")
    recorded = _recorded(pretrained.record(pretrained.file_of("toy2d")), "in_square")
    defaults = run.cfg.sample
    assert (recorded["sampler"], recorded["steps"]) == (defaults.sampler, defaults.steps)
    samples = run.sample(2000, progress=False)
    fraction = in_square_fraction(samples.tensor)
    p = recorded["value"]
    assert p > 0.9
    assert abs(fraction - p) < 4 * math.sqrt(p * (1 - p) / 2000)


@shipped
def test_api_cli_and_eval_read_pretrained_alike(tmp_path, capsys):
    out = tmp_path / "x.npz"
    argv = ["sample", "pretrained:toy2d", "--n", "64", "--seed", "5", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    samples = difflab.load("pretrained:toy2d").sample(64, seed=5, progress=False)
    with np.load(out) as f:
        assert np.array_equal(f["samples"], samples.tensor.numpy())
    assert main(["eval", "pretrained:toy2d", "--n", "300", "--quiet", "--json"]) == 0
    assert '"in_square"' in capsys.readouterr().out


def test_a_shipped_run_compares_samplers_with_its_plot_beside_the_json(tmp_path, capsys):
    """`eval pretrained:toy2d --compare`: the rows of its sampler sweep; the plot goes beside
    --out (OUT.png), never into the package; without --out there is no plot."""
    out = tmp_path / "c.json"
    argv = ["eval", "pretrained:toy2d", "--compare", "--samplers", "ddim", "--nfe", "2,8"]
    package = sorted(pretrained.file_of("toy2d").parent.iterdir())
    assert main([*argv, "--n", "300", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["sampler"], r["nfe"]) for r in result["rows"]] == [("ddim", 2), ("ddim", 8)]
    assert result["rows"][1]["in_square"] > result["rows"][0]["in_square"]
    assert result["plot"] == str(out.with_suffix(".png")) and out.with_suffix(".png").is_file()
    capsys.readouterr()
    assert main([*argv, "--n", "300", "--quiet", "--json"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n") :])["plot"] is None
    assert sorted(pretrained.file_of("toy2d").parent.iterdir()) == package


def test_unknown_or_missing_names_are_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.npz"
    assert main(["sample", "pretrained:nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown pretrained run 'pretrained:nope'" in err
    for name in pretrained.available():
        assert f"pretrained:{name}" in err
    assert not out.exists()
    monkeypatch.setattr(pretrained, "FOLDER", tmp_path)  # an install that ships none
    with pytest.raises(ConfigError, match=r"pretrained:mnist is not shipped.*available: none"):
        difflab.load("pretrained:mnist")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    cfg = apply_overrides(preset("toy2d"), [*SMALL_TOY, "train.steps=4"])
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train_here(cfg, run_dir)
    return run_dir


def test_build_from_a_trained_run_round_trips(tiny_run, tmp_path, capsys):
    """fp16 weights equal to the run's EMA weights in fp16, the shipped sampling defaults in
    its config, the metrics measured at them in its record; list shows them."""
    out = tmp_path / "toy.safetensors"
    argv = ["pretrained", "build", "toy2d", "--run", str(tiny_run), "--out", str(out)]
    assert main([*argv, "--n", "400", "--steps", "6", "--quiet"]) == 0
    run, shipped_run = load_run(tiny_run, use_ema=True), load_run(out)
    weights = load_file(out)
    for k, v in run.model.net.state_dict().items():
        assert weights[k].dtype == torch.float16 and torch.equal(weights[k], v.half())
    defaults = {**pretrained.SAMPLING["toy2d"], "steps": 6}
    for key, value in defaults.items():
        assert getattr(shipped_run.cfg.sample, key) == value, key
    record = pretrained.record(out)
    assert record["preset"] == "toy2d" and record["train_steps"] == 4
    assert record["train_minutes"] > 0 and record["sampling"]["steps"] == 6
    row = _recorded(record, "in_square")
    assert (row["n_generated"], row["sampler"], row["steps"]) == (400, "dpmpp_2m", 6)
    assert 0 <= row["value"] <= 1 and _recorded(record, "sliced_w2")["value"] > 0


def test_build_refuses_a_run_of_another_preset(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["pretrained", "build", "mnist", "--run", str(tiny_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trained from preset 'toy2d'" in err and "'mnist'" in err and not out.exists()
    assert main(["pretrained", "build", "cifar", "--out", str(out)]) == 2
    assert "the known ones are toy2d, mnist, mnist-flow, mnist-ect" in capsys.readouterr().err


def test_pretrained_files_are_package_data():
    """A wheel carries every shipped file: pyproject's package data names them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["difflab.pretrained"]
    folder = ROOT / "src" / "difflab" / "pretrained"
    assert (folder / "__init__.py").is_file()  # a package, so find_packages takes it
    for path in folder.glob("*.safetensors"):
        assert any(fnmatch.fnmatch(path.name, g) for g in globs), path.name
        assert path.stem in pretrained.PRESETS, path.name
    assert any(fnmatch.fnmatch("mnist.safetensors", g) for g in globs)


@shipped
def test_list_shows_names_sizes_and_metrics(capsys):
    assert main(["pretrained", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(pretrained.PRESETS)
    toy = next(line for line in lines if line.startswith("pretrained:toy2d "))
    assert " MB" in toy and "in_square" in toy


@pytest.mark.parametrize("name", ["mnist", "mnist-flow", "mnist-ect"])
def test_shipped_digits_sample_at_the_recorded_settings_and_cost(name):
    """Ten digits, one per class, drawn at a shipped file's own defaults: the sampler, steps
    and guidance its record was judged at, and the network calls per sample it recorded
    (counted as the nets run), on 1,000 judged samples."""
    from difflab.evaluation.sampled import timed_samples

    if name not in pretrained.available():
        pytest.skip(f"pretrained:{name} is not shipped")
    run = load_run(f"pretrained:{name}", device="cpu")
    record = pretrained.record(pretrained.file_of(name))
    row = _recorded(record, "accuracy")
    scfg = run.cfg.sample
    assert (row["sampler"], row["steps"], row["guidance"]) == (
        scfg.sampler,
        scfg.steps,
        scfg.guidance,
    )
    assert row["n_generated"] == 1000 and record["preset"] == pretrained.PRESETS[name]
    scfg = dataclasses.replace(scfg, n=10, batch_size=10)
    samples, timing = timed_samples(run, scfg, torch.arange(10))
    assert samples.shape == (10, 1, 32, 32) and samples.abs().max() <= 1
    assert timing["net_calls"] == row["net_calls"]
