"""Provenance that never lies: what a file or row says about how samples were drawn (EMA or raw
weights, NFE, precision) is what happened. Each expected value is derived independently: the
weights loaded explicitly from the checkpoint, the network's calls counted, the autocast state
seen by the network itself."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from difflab import build, devices
from difflab.cli import main
from difflab.config import RunConfig, SampleConfig, apply_overrides, preset, use_ema_of
from difflab.evaluation.compare import compare_samplers
from difflab.evaluation.history import metric_rows
from difflab.evaluation.reconstruction import evaluate_reconstructions, psnr, reconstruct
from difflab.evaluation.sampled import TrainingEvaluator
from difflab.evaluation.toy2d import evaluate_toy
from difflab.flow.pairs import draw_pairs
from difflab.flow.straightness import straightness
from difflab.model import DataKind
from difflab.report.run import training_hooks
from difflab.runs import draw_samples, load_run
from difflab.training.checkpoint import latest_good_checkpoint, load_data_info, load_weights
from difflab.training.hooks import Hooks
from difflab.training.loop import train

TINY = [
    "model.mlp.width=16",
    "model.mlp.depth=1",
    "train.batch_size=64",
    "train.steps=12",
    "train.log_every=4",
    "train.checkpoint_every=12",
    "train.warmup_steps=0",
    "train.ema_decay=0.9",
    "train.time_limit_minutes=0",
]
# the run's own sampler: pc with 3 corrector calls and one predictor call a step
RAW_PC = ["sample.use_ema=false", "sample.sampler=pc", "sample.n_corrector=3", "sample.steps=4"]
RAW_PC += ["sample.n=64", "sample.batch_size=64", "sample.spacing=uniform"]


def _explicit(run_dir, which: str):
    """The run's model with its `which` ("ema" or "model") weights loaded by hand."""
    ckpt = latest_good_checkpoint(run_dir / "checkpoints")
    cfg = RunConfig.load(ckpt / "config.json")
    model = build.build_model(cfg, DataKind.from_info(load_data_info(ckpt)), torch.device("cpu"))
    load_weights(ckpt, model.net, which)
    model.net.eval()
    return model, cfg


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """A 2-D run whose config says sample.use_ema=false, trained with its evaluator on."""
    run_dir = tmp_path_factory.mktemp("runs") / "raw"
    extra = ["train.eval_every=12", "train.eval_n=64"]
    train(
        apply_overrides(preset("toy2d"), [*TINY, *RAW_PC, *extra]),
        run_dir,
        progress=False,
        hooks=training_hooks(),
    )
    return run_dir


def test_the_ema_and_raw_weights_of_the_run_differ(raw_run):
    """Otherwise every test below could not tell them apart."""
    scfg = RunConfig.load(raw_run / "config.json").sample
    ema, _ = _explicit(raw_run, "ema")
    raw, _ = _explicit(raw_run, "model")
    assert not torch.equal(ema.sample(scfg), raw.sample(scfg))


def test_use_ema_false_samples_and_records_the_raw_weights(raw_run, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(raw_run), "--out", str(out), "--quiet"]) == 0
    raw, cfg = _explicit(raw_run, "model")
    with np.load(out) as f:
        assert np.array_equal(f["samples"], raw.sample(cfg.sample).numpy())
        assert not bool(f["ema"]) and int(f["nfe"]) == (3 + 1) * 4
    assert load_run(raw_run).ema is False and load_run(raw_run, use_ema=True).ema is True


def test_raw_flag_on_an_ema_run_samples_and_records_the_raw_weights(raw_run, tmp_path):
    ema_run = tmp_path / "ema"
    train(apply_overrides(preset("toy2d"), TINY), ema_run, progress=False)
    argv = ["sample", str(ema_run), "--n", "32", "--steps", "3", "--sampler", "ddim"]
    for flags, which in (([], "ema"), (["--raw"], "model")):
        out = tmp_path / f"{which}.npz"
        assert main([*argv, *flags, "--out", str(out), "--quiet"]) == 0
        model, cfg = _explicit(ema_run, which)
        scfg = dataclasses.replace(cfg.sample, n=32, steps=3, sampler="ddim")
        with np.load(out) as f:
            assert np.array_equal(f["samples"], model.sample(scfg).numpy())
            assert bool(f["ema"]) == (which == "ema")


def test_eval_of_a_2d_run_samples_the_raw_weights_and_carries_the_nfe(raw_run, capsys):
    assert main(["eval", str(raw_run), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    raw, cfg = _explicit(raw_run, "model")
    expected = evaluate_toy(raw.sample(cfg.sample).numpy(), cfg.data.name)
    assert result["sliced_w2"] == expected["sliced_w2"]
    assert result["ema"] is False and result["nfe"] == 16 and result["sampler"] == "pc"
    assert result["seed"] == cfg.sample.seed and result["step"] == 12
    assert result["spacing"] == "uniform" and result["ms_per_sample"] > 0


def test_compare_loads_the_weights_the_run_names(raw_run):
    result = compare_samplers(raw_run, samplers=["pc"], nfes=[8], progress=False)
    (row,) = result["rows"]
    assert result["provenance"]["ema"] is False and (row["steps"], row["nfe"]) == (2, 8)
    raw, cfg = _explicit(raw_run, "model")
    scfg = dataclasses.replace(cfg.sample, steps=2)
    assert row["sliced_w2"] == evaluate_toy(raw.sample(scfg).numpy(), cfg.data.name)["sliced_w2"]


def test_the_training_time_metric_measures_and_records_the_raw_weights(raw_run):
    rows = [json.loads(line) for line in (raw_run / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r["eval"] for r in rows if "metric" in r.get("eval", {})]
    raw, cfg = _explicit(raw_run, "model")  # the step-12 checkpoint: the weights at the eval
    scfg = dataclasses.replace(cfg.sample, n=64, compile=False)
    assert row["sliced_w2"] == evaluate_toy(raw.sample(scfg).numpy(), cfg.data.name)["sliced_w2"]
    assert row["ema"] is False and row["nfe"] == 16 and row["seed"] == cfg.sample.seed


def test_the_final_evaluation_of_a_2d_run_carries_its_provenance(raw_run):
    from difflab.report.run import make_artefacts

    result = make_artefacts(raw_run, progress=False)
    assert (result["ema"], result["nfe"], result["steps"], result["step"]) == (False, 16, 4, 12)
    (raw_run / "eval.json").write_text(json.dumps(result))
    rows = metric_rows(raw_run)
    assert {r["metric"] for r in rows} >= {"sliced_w2"}
    assert not {"nfe", "seed", "step", "ms_per_sample"} & {r["metric"] for r in rows}
    assert all(r["nfe"] == 16 and r["ema"] is False for r in rows)


def test_an_autoencoder_evaluated_raw_says_raw(tmp_path, shared_data, capsys):
    cfg = apply_overrides(
        preset("mnist-ae"),
        [
            f"data.root={shared_data}",
            "model.autoencoder.base_channels=8",
            "model.autoencoder.channel_mults=1,2",
            "model.autoencoder.norm_groups=4",
            "model.autoencoder.mid_attention=false",
            "train.batch_size=4",
            "train.steps=3",
            "train.checkpoint_every=3",
            "train.autoencoder.discriminator=false",
            "train.autoencoder.feature_weight=0",
            "train.ema_decay=0.5",
            "train.time_limit_minutes=0",
        ],
    )
    train(cfg, tmp_path / "ae", progress=False)
    images = torch.rand(6, 1, 32, 32) * 2 - 1
    for use_ema, which in ((False, "model"), (True, "ema")):
        run = load_run(tmp_path / "ae", use_ema=use_ema)
        rows = evaluate_reconstructions(run, images, None, [], None, {})
        model, _ = _explicit(tmp_path / "ae", which)
        expected = float(psnr(images, reconstruct(model.net, images)).mean())
        (psnr_row,) = [r for r in rows if r["metric"] == "psnr"]
        assert psnr_row["ema"] is use_ema and psnr_row["value"] == expected
    # it samples and inpaints nothing: one line, exit 2, nothing written
    np.savez(tmp_path / "init.npz", samples=images.numpy())
    out = tmp_path / "out" / "s.npz"
    argv = ["sample", str(tmp_path / "ae"), "--out", str(out), "--quiet"]
    for extra in ([], ["--init", str(tmp_path / "init.npz"), "--mask", str(tmp_path / "init.npz")]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is an autoencoder run" in err[0], err
        assert not out.exists()


class AutocastSpy(torch.nn.Module):
    """The network as it is called: records the autocast dtype it runs under (None: off)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, set()

    def forward(self, *args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        self.seen.add(torch.get_autocast_dtype("cpu") if on else None)
        return self.net(*args, **kwargs)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bf16 units, as far as sample.precision=bf16 can tell (torch emulates bf16
    correctly elsewhere, so the numbers are real bf16 ones)."""
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)


def test_precision_reaches_the_network_through_every_sampling_path(tmp_path, bf16_cpu):
    flow = tmp_path / "flow"
    overrides = [*TINY, "sample.sampler=euler", "sample.steps=4", "sample.precision=bf16"]
    train(apply_overrides(preset("toy2d-flow"), overrides), flow, progress=False)
    run = load_run(flow)
    scfg = dataclasses.replace(run.cfg.sample, n=16, batch_size=16)
    cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train, eval_n=16))
    paths = {
        "Model.sample": lambda model: model.sample(scfg),
        "training-time metric": lambda model: TrainingEvaluator(cfg, model)(model),
        "straightness": lambda model: straightness(model, scfg, n=16, steps=4),
        "reflow pairs": lambda model: draw_pairs(
            dataclasses.replace(run, model=model), scfg, 16, chunk=16, progress=False
        ),
    }
    for name, draw in paths.items():
        spy = AutocastSpy(run.model.net)
        draw(run.model.with_net(spy))
        assert spy.seen == {torch.bfloat16}, name
    spy = AutocastSpy(run.model.net)
    run.model.with_net(spy).sample(dataclasses.replace(scfg, precision="fp32"))
    assert spy.seen == {None}


def test_training_grids_are_drawn_at_sample_precision(tmp_path, bf16_cpu):
    grids = []
    hooks = Hooks(grid=lambda x, path, model: grids.append(x) or path)
    overrides = [*TINY, "train.sample_every=12", "sample.precision=bf16", "sample.steps=3"]
    overrides += ["sample.sampler=ddim"]
    train(apply_overrides(preset("toy2d"), overrides), tmp_path / "r", progress=False, hooks=hooks)
    run = load_run(tmp_path / "r")
    assert use_ema_of(run.cfg.sample) and run.ema
    snap = dataclasses.replace(run.cfg.sample, n=2000, batch_size=64, compile=False)
    bf16 = draw_samples(run, snap, progress=False).numpy()
    fp32 = draw_samples(run, dataclasses.replace(snap, precision="fp32"), progress=False)
    assert np.array_equal(grids[-1], bf16) and not np.array_equal(grids[-1], fp32.numpy())


def test_the_sample_config_decides_ema_unless_told():
    assert use_ema_of(SampleConfig()) and not use_ema_of(SampleConfig(use_ema=False))
    assert use_ema_of(SampleConfig(use_ema=False), True) is True
    assert use_ema_of(SampleConfig(), False) is False
