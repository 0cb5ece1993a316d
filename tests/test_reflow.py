"""Reflow end to end: resumable, reproducible pairs, the reflow run, straightness, OT coupling,
and the bad input of issue 12 (one clear message, exit code 2, nothing written)."""

import json

import numpy as np
import pytest
import torch

import difflab
from difflab.cli import main
from difflab.config import apply_overrides, preset
from difflab.data.pairs import PairStream, read_pairs
from difflab.flow.pairs import draw_pairs
from difflab.flow.straightness import default_paths, straightness
from difflab.runs import load_run
from difflab.samplers import sample_dpmpp_2m, timesteps
from difflab.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = [
    "model.mlp.width=32",
    "model.mlp.depth=1",
    "train.steps=30",
    "train.batch_size=128",
    "train.log_every=10",
    "train.checkpoint_every=30",
    "sample.steps=4",
    "sample.n=300",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(apply_overrides(preset("toy2d-flow"), TINY), root / "flow", progress=False)
    train(apply_overrides(preset("toy2d"), TINY), root / "diffusion", progress=False)
    return root


def _pairs_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("chunk-*.npz"))}


def test_pairs_are_reproducible_and_resume_after_a_kill(runs):
    run = load_run(runs / "flow")
    folder = draw_pairs(run, run.cfg.sample, 250, chunk=100, progress=False)
    first = _pairs_bytes(folder)
    assert sorted(first) == ["chunk-00000.npz", "chunk-00001.npz", "chunk-00002.npz"]
    # a kill between chunks and one during a write (its temporary file left behind)
    (folder / "chunk-00001.npz").unlink()
    (folder / "chunk-00002.npz").unlink()
    (folder / ".chunk-00002.npz.tmp-123").write_bytes(b"half")
    with pytest.raises(ValueError, match="run the same `difflab reflow` command again"):
        read_pairs(folder)
    assert draw_pairs(run, run.cfg.sample, 250, chunk=100, progress=False) == folder
    assert _pairs_bytes(folder) == first
    # each pair is (x_T, the sampler's endpoint from it)
    noise, x, labels, meta = read_pairs(folder)
    assert noise.shape == x.shape == (250, 2) and labels is None and meta["sampler"] == "dpmpp_2m"
    ts = timesteps(run.model.schedule, run.cfg.sample.steps, run.cfg.sample.spacing)
    torch.testing.assert_close(sample_dpmpp_2m(run.model.denoiser, noise, ts), x, atol=1e-5, rtol=0)
    stream = PairStream(folder, seed=0)
    xb, _ = stream.next_batch(7)
    idx = [int(np.flatnonzero((x == row).all(dim=1))[0]) for row in xb]
    assert torch.equal(stream.paired_noise, noise[idx])


def test_reflow_trains_on_the_pairs_and_reports_straightness(runs):
    argv = [
        "reflow",
        str(runs / "flow"),
        "--pairs",
        "200",
        "--chunk",
        "100",
        "--quiet",
        "--no-finish",
        "--set",
        "train.steps=20",
        "train.checkpoint_every=20",
    ]
    assert main(argv) == 0
    out = runs / "flow-reflow"
    summary = json.loads((out / "reflow.json").read_text())
    assert set(summary["straightness"]) == {"source", "reflow"}
    assert summary["straightness_paths"] == default_paths((2,)) > default_paths((1, 32, 32))
    assert all(v >= 0 for v in summary["straightness"].values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["diffusion"]["coupling"] == "reflow" and cfg["data"]["name"] == "checkerboard"
    assert cfg["train"]["init_from"].endswith("step-30") and cfg["data"]["pairs"]
    # a third round works the same way, on the reflow run
    argv[1], argv[2:2] = str(out), ["--name", "round3"]
    assert main(argv) == 0 and (runs / "round3" / "reflow.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reflow", "{diffusion}", "--pairs", "10"], "reflow needs a flow model"),
        (["reflow", "{flow}", "--pairs", "10", "--sampler", "ddpm"], "deterministic sampler"),
        (["reflow", "{flow}", "--pairs", "10", "--eta", "0.5"], "deterministic sampler"),
        (["sample", "{flow}", "--out", "{tmp}/x.npz", "--shift", "0"], "shift must be > 0"),
    ],
)
def test_bad_reflow_and_shift_input_is_refused(runs, tmp_path, capsys, argv, message):
    argv = [a.format(flow=runs / "flow", diffusion=runs / "diffusion", tmp=tmp_path) for a in argv]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (runs / "diffusion" / "reflow").exists() and not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["diffusion.coupling=ot", "train.batch_size=4096"], "at most 2048"),
        (["diffusion.prediction=v"], "affine flow path"),
        (["diffusion.coupling=reflow"], "data.pairs=FOLDER"),
    ],
)
def test_bad_flow_training_config_is_refused_and_writes_nothing(tmp_path, capsys, sets, message):
    argv = ["train", "--preset", "toy2d-flow", "--runs", str(tmp_path), "--name", "r", "--quiet"]
    assert main([*argv, "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_latent_run_refuses_data_dependent_couplings():
    # OT and reflow pair the stream's batch (pixels) with noise of the latents' shape
    from difflab.diffusion.couplings import check_coupling

    for name in ("ot", "reflow"):
        with pytest.raises(ValueError, match=r"coupling=independent with model\.codec"):
            check_coupling(name, 64, "pairs" if name == "reflow" else "", latent=True)
    assert check_coupling("independent", 64, latent=True) == "independent"


def test_ot_coupling_makes_a_trained_flow_straighter(tmp_path):
    # Tong et al. 2023: mini-batch OT pairs make the learned paths nearly straight. Same data,
    # seed, network and budget; straightness on the same 500 paths (measured:
    # 0.173 independent, 0.017 OT).
    values = {}
    for coupling in ("independent", "ot"):
        cfg = apply_overrides(
            preset("toy2d-flow"),
            [
                *TINY,
                "train.steps=150",
                "train.batch_size=256",
                "model.mlp.width=64",
                "train.checkpoint_every=150",
                f"diffusion.coupling={coupling}",
                "data.name=gaussians8",
            ],
        )
        train(cfg, tmp_path / coupling, progress=False)
        run = load_run(tmp_path / coupling)
        values[coupling] = straightness(run.model, run.cfg.sample, n=500, steps=50)[0]
    assert values["ot"] < 0.5 * values["independent"], values


@pytest.mark.slow  # ~30 s: every figure's sampling
def test_every_2d_figure_and_eval_compare_work_for_a_flow_run(runs, tmp_path):
    run_dir = runs / "flow"
    assert main(["plot", str(run_dir), "--resample", "--quiet"]) == 0
    for name in ("scatter.png", "reverse.gif", "trajectories.png", "forward.png", "loss.png"):
        assert (run_dir / "plots" / name).stat().st_size > 0, name
    out = tmp_path / "compare.json"
    args = ["eval", str(run_dir), "--compare", "--nfe", "2,4", "--samplers", "euler,heun,unipc"]
    assert main([*args, "--n", "300", "--quiet", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["spacing"] for r in rows} == {"uniform"} and len(rows) == 6
    assert (run_dir / "plots" / "compare.png").exists()


@pytest.mark.slow
def test_a_class_conditional_flow_run_draws_its_class_grid_and_guides(shared_data, tmp_path):
    sets = [
        f"data.root={shared_data}",
        "model.unet.base_channels=8",
        "model.unet.channel_mults=1,2",
        "model.unet.attention_levels=1",
        "model.unet.norm_groups=4",
        "train.steps=3",
        "train.batch_size=8",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "sample.n=20",
        "sample.steps=2",
        "train.threads=1",
        "sample.batch_size=20",
    ]
    argv = ["train", "--preset", "mnist-flow", "--runs", str(tmp_path), "--name", "m", "--quiet"]
    assert main([*argv, "--set", *sets]) == 0
    plots = tmp_path / "m" / "plots"
    assert (plots / "samples.png").exists() and (plots / "denoising.gif").exists()
    out = tmp_path / "x.npz"
    argv = ["sample", str(tmp_path / "m"), "--out", str(out), "--per-class", "--n", "20"]
    assert main([*argv, "--guidance", "2", "--quiet"]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (20, 1, 32, 32)
        assert np.bincount(f["labels"], minlength=10).tolist() == [2] * 10
    # Reflow pairs drawn with guidance 2 are guided: same noise and classes as unguided ones
    # (the pairs are deterministic), other endpoints, and the guidance recorded beside them.
    # Three steps teach the classes little (measured: the endpoints move by <= 6e-5), so the
    # test asks only that they move; a guidance that never reached the sampler moves nothing.
    for w in (1, 2):
        argv = ["reflow", str(tmp_path / "m"), "--pairs-only", "--pairs", "20", "--chunk", "20"]
        argv += ["--sampler", "euler", "--steps", "1", "--guidance", str(w), "--quiet"]
        assert main(argv) == 0
    (unguided,) = [p for p in (tmp_path / "m" / "reflow").iterdir() if "-w" not in p.name]
    noise, x1, labels, meta1 = read_pairs(unguided)
    noise2, x2, labels2, meta2 = read_pairs(unguided.with_name(f"{unguided.name}-w2"))
    assert labels is not None and np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert torch.equal(noise2, noise) and torch.equal(labels2, labels)
    assert (meta1["guidance"], meta2["guidance"]) == (1.0, 2.0)
    assert not torch.equal(x2, x1)


def test_the_api_reflow_is_the_cli_reflow(runs):
    """difflab.reflow draws the pairs and trains the weights `difflab reflow` does"""
    argv = ["reflow", str(runs / "flow"), "--pairs", "120", "--chunk", "60", "--name", "cli"]
    argv += ["--quiet", "--no-finish", "--set", "train.steps=10", "train.checkpoint_every=10"]
    assert main(argv) == 0
    run = difflab.reflow(
        runs / "flow",
        pairs=120,
        chunk=60,
        name="api",
        finish=False,
        progress=False,
        train__steps=10,
        train__checkpoint_every=10,
    )
    cli = load_run(runs / "cli")
    assert run.step == cli.step == 10 and run.cfg.data.pairs == cli.cfg.data.pairs
    mine, theirs = run.model.net.state_dict(), cli.model.net.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    summaries = [json.loads((runs / n / "reflow.json").read_text()) for n in ("api", "cli")]
    assert summaries[0]["straightness"] == summaries[1]["straightness"]


def test_reflow_of_a_weights_file_starts_from_its_weights_and_writes_nothing_beside_it(
    runs, tmp_path, monkeypatch
):
    """`difflab reflow FILE` (an `export --format ema` file, as `pretrained:NAME` is): the pairs
    and the reflow run go under runs/ (a shipped file lies in the package), the pairs start
    from the run's noise, and the reflow run starts from the file's upcast EMA weights."""
    from safetensors.torch import load_file

    from difflab.training.parts import build_parts

    shelf = tmp_path / "shelf"
    shelf.mkdir()
    weights = shelf / "flow.safetensors"
    assert main(["export", str(runs / "flow"), "--format", "ema", "--out", str(weights)]) == 0
    monkeypatch.chdir(tmp_path)
    argv = ["reflow", str(weights), "--pairs", "120", "--chunk", "60", "--quiet", "--no-finish"]
    assert main([*argv, "--set", "train.steps=10", "train.checkpoint_every=10"]) == 0
    assert sorted(p.name for p in shelf.iterdir()) == ["flow.safetensors"]
    out = tmp_path / "runs" / "flow-reflow"
    assert json.loads((out / "reflow.json").read_text())["straightness"]["reflow"] >= 0
    cfg = load_run(out).cfg
    assert cfg.train.init_from == str(weights.resolve())
    assert cfg.data.pairs.startswith(str(tmp_path / "runs" / "flow-pairs" / "reflow"))
    # the pairs are the run's, drawn with its EMA weights rounded to fp16 as the file holds them
    upcast = {k: v.float() for k, v in load_file(weights).items()}
    run = load_run(runs / "flow")
    run.model.net.load_state_dict(upcast)
    own = draw_pairs(run, run.cfg.sample, 120, chunk=60, progress=False, home=tmp_path / "own")
    (noise, x, *_), (own_noise, own_x, *_) = read_pairs(cfg.data.pairs), read_pairs(own)
    assert torch.equal(noise, own_noise) and torch.equal(x, own_x)
    # the reflow run's first weights are the file's, upcast
    parts = build_parts(cfg)
    assert all(torch.equal(parts.net.state_dict()[k], upcast[k]) for k in upcast)
