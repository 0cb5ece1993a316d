import importlib.util
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import needs
from difflab.config import ConfigError, apply_overrides, preset
from difflab.data.toy2d import sample_toy2d
from difflab.evaluation.toy2d import sliced_wasserstein2
from difflab.report.run import training_hooks
from difflab.runs import draw_samples, load_run
from difflab.training.checkpoint import CheckpointError, latest_good_checkpoint, list_checkpoints
from difflab.training.logging import _scalars, read_metrics
from difflab.training.loop import train

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
SMALL = [
    "model.mlp.width=64",
    "model.mlp.depth=2",
    "train.batch_size=256",
    "train.log_every=10",
    "train.warmup_steps=20",
    "sample.sampler=ddpm",
    "sample.steps=100",
    "sample.n=2000",
]


def _cfg(*extra):
    return apply_overrides(preset("toy2d"), [*SMALL, *extra])


def test_training_lowers_the_loss_and_moves_samples_to_the_data(tmp_path):
    cfg = _cfg(
        "train.steps=300",
        "train.checkpoint_every=300",
        "train.ema_decay=0.99",
        "train.sample_every=150",
    )
    train(cfg, tmp_path / "run", progress=False, hooks=training_hooks())
    for step in (150, 300):  # scatters from fixed noise during training
        assert (tmp_path / "run" / "samples" / f"grid-step-{step}.png").stat().st_size > 1000
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]  # v-loss keeps a large irreducible part
    for key in (
        "loss_by_t",
        "grad_norm",
        "param_norm",
        "lr",
        "ema_decay",
        "examples_per_s",
        "peak_memory_mb",
    ):
        assert key in rows[-1]
    run = load_run(tmp_path / "run")
    samples = draw_samples(run, cfg.sample, progress=False)
    truth = sample_toy2d("checkerboard", 2000, torch.Generator().manual_seed(99))
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(98))
    assert sliced_wasserstein2(samples, truth) < 0.25 * sliced_wasserstein2(noise, truth)


def _weights(ckpt):
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")


@pytest.mark.parametrize("extra", [[], ["train.grad_accum=2", "model.mlp.dropout=0.1"]])
def test_resume_is_bitwise_exact(tmp_path, extra):
    cfg = _cfg("train.steps=40", "train.checkpoint_every=10", *extra)
    straight = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=20)  # "crash" after step 20
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    for a, b in zip(_weights(straight), _weights(resumed), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = _cfg("train.steps=20", "train.checkpoint_every=10", "train.keep_checkpoints=3")
    train(cfg, tmp_path / "r", progress=False)
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-10", "step-20"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="step-20.*model.safetensors"):
        assert latest_good_checkpoint(tmp_path / "r" / "checkpoints") == ckpts[0]
    # a half-written temporary folder from a crash is ignored
    (tmp_path / "r" / "checkpoints" / ".tmp-step-30-1").mkdir()
    with pytest.warns(UserWarning):
        train(cfg, tmp_path / "r", resume=True, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "r" / "checkpoints")] == [
        "step-10",
        "step-20",
    ]


def test_all_corrupt_or_mismatched_config_is_refused(tmp_path):
    cfg = _cfg("train.steps=10", "train.checkpoint_every=10")
    train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match=r"model\.mlp\.width"):
        train(
            apply_overrides(cfg, ["model.mlp.width=32"]),
            tmp_path / "r",
            resume=True,
            progress=False,
        )
    train(
        apply_overrides(cfg, ["train.steps=12"]), tmp_path / "r", resume=True, progress=False
    )  # may grow
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-10", ignore_errors=True)
    for p in list_checkpoints(tmp_path / "r" / "checkpoints"):
        (p / "manifest.json").write_text(json.dumps({"sha256": {}}))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="corrupt"):
        latest_good_checkpoint(tmp_path / "r" / "checkpoints")


def test_bad_train_config_writes_nothing(tmp_path):
    for bad in (
        ["train.steps=-1"],
        ["train.batch_size=10", "train.grad_accum=3"],
        ["data.name=spiral"],
        ["diffusion.beta_end=2"],
        ["diffusion.prediction=score"],
    ):
        with pytest.raises(ConfigError):
            train(_cfg(*bad), tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists(), bad


def test_time_limit_stops_with_a_checkpoint_and_resume_continues(tmp_path):
    cfg = _cfg("train.steps=30", "train.checkpoint_every=100", "train.time_limit_minutes=1e-6")
    with pytest.warns(UserWarning, match="time_limit_minutes reached after step 1"):
        ckpt = train(cfg, tmp_path / "r", progress=False)
    assert ckpt.name == "step-1"
    done = train(
        apply_overrides(cfg, ["train.time_limit_minutes=0"]),
        tmp_path / "r",
        resume=True,
        progress=False,
    )
    assert done.name == "step-30"


def test_best_checkpoint_follows_the_metric_and_survives_pruning_and_resume(tmp_path):
    cfg = _cfg("train.steps=60", "train.checkpoint_every=10", "train.keep_checkpoints=1")
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=30)
    train(cfg, run, resume=True, progress=False)
    rows = {r["step"]: r["loss_smoothed"] for r in read_metrics(run / "metrics.jsonl")}
    best_step = min(rows, key=rows.get)  # checkpoints every 10 steps = every logged row
    best = run / "checkpoints" / "best"
    info = json.loads((best / "best.json").read_text())
    assert info == {"metric": "loss_smoothed", "value": rows[best_step], "step": best_step}
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-60"]
    assert load_run(run, checkpoint="best").step == best_step
    if best_step != 60:  # the best copy holds its own weights, not the newest ones
        a, b = (load_file(p / "ema.safetensors") for p in (best, run / "checkpoints/step-60"))
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_best_metric_must_be_logged(tmp_path):
    cfg = _cfg("train.steps=10", "train.checkpoint_every=10", "train.best_metric=fid")
    with pytest.raises(ConfigError, match="best_metric='fid' is not logged"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@needs("tensorboard", HAS_TENSORBOARD, "pip install -e '.[tensorboard]'")
def test_tensorboard_mirrors_every_logged_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg("train.steps=20", "train.checkpoint_every=20", "train.tensorboard=true")
    train(cfg, tmp_path / "run", progress=False)
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events)).Reload()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [10, 20]  # train.log_every=10
    logged = [(e.step, e.value) for e in board.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert {"loss_by_t/0", "grad_norm", "lr"} <= set(board.Tags()["scalars"])


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    cfg = _cfg("train.steps=20", "train.checkpoint_every=20", "train.tensorboard=true")
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_metrics_rows_flatten_to_tensorboard_scalars():
    row = {"step": 5, "loss": 0.5, "loss_by_t": [0.1, None], "eval": {"fd": 2.0}, "ok": True}
    assert dict(_scalars(row)) == {"loss": 0.5, "loss_by_t/0": 0.1, "eval/fd": 2.0}


@pytest.mark.parametrize(
    "extra",
    [
        ["diffusion.schedule=vp", "diffusion.prediction=eps"],
        ["diffusion.schedule=ve", "diffusion.prediction=eps", "diffusion.weighting=snr"],
        [
            "diffusion.schedule=edm",
            "diffusion.prediction=edm",
            "diffusion.t_sampling=lognormal",
            "sample.sampler=heun",
        ],
        ["diffusion.schedule=cosine", "diffusion.prediction=edm", "sample.sampler=dpmpp_2m"],
    ],
    ids=["vp-sde", "ve-ncsn", "edm", "cosine-edm-precond"],
)
def test_continuous_time_training_runs_through_the_same_trainer(tmp_path, extra):
    cfg = _cfg(
        "diffusion.num_steps=0",
        "train.steps=80",
        "train.checkpoint_every=80",
        "sample.spacing=karras",
        "sample.steps=10",
        *extra,
    )
    train(cfg, tmp_path / "run", progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss_smoothed"] < rows[0]["loss"]
    run = load_run(tmp_path / "run")
    x = draw_samples(run, run.cfg.sample, progress=False)
    assert x.shape == (2000, 2) and torch.isfinite(x).all()
    # Started at the prior (N(0, I) on VP, sigma_max 50 on VE), ended on the data's scale: all
    # of the data lies in the square [-1, 1]^2, of N(0, I) noise (x_T of VP, what a sampler that
    # did nothing returns) a fraction (2 Phi(1) - 1)^2 = 0.466, of an untrained eps-model's
    # samples none (measured: 0 of 2000 on VP and VE; x0_hat = (x_t - sigma eps_hat) / alpha
    # amplifies its errors). Measured at 80 steps: 0.81 vp, 0.83 ve, 0.77 edm, 0.92 cosine-edm;
    # 0.15 above noise is 14 standard deviations of noise's fraction at n = 2000. (An untrained
    # EDM-preconditioned net already lands near the data's scale, through c_skip: there the loss
    # above is what shows training.)
    noise_inside = math.erf(1 / math.sqrt(2)) ** 2
    inside = float(((x >= -1) & (x <= 1)).all(dim=1).double().mean())
    assert inside > noise_inside + 0.15, (inside, noise_inside)


def test_meaningless_combinations_are_refused(tmp_path):
    for extra, message in (
        (["diffusion.schedule=ve", "diffusion.num_steps=0"], "variance-preserving"),  # v on VE
        (["diffusion.schedule=edm"], "num_steps=0"),  # EDM has no table
        (
            [
                "diffusion.schedule=edm",
                "diffusion.num_steps=0",
                "diffusion.prediction=eps",
                "diffusion.target=v",
            ],
            "v-space loss",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            train(_cfg("train.steps=5", *extra), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_grids_and_training_time_metrics_need_the_reports_hooks(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.sample_every=5 needs the report's hooks"):
        train(_cfg("train.steps=10", "train.sample_every=5"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_judge_is_asked_of_the_losss_declaration_not_its_name():
    from difflab import build
    from difflab.diffusion.loss_base import Loss
    from difflab.training.hooks import NO_HOOKS, Hooks, judge_for

    class Wants(Loss):
        wants_judge = True

    cfg = preset("toy2d")  # a diffusion loss by name: only the declaration counts
    assert judge_for(Loss(), cfg, NO_HOOKS) is None
    with pytest.raises(ConfigError, match=r"^[^\n]*needs the report's hooks[^\n]*$"):
        judge_for(Wants(), cfg, NO_HOOKS)
    assert judge_for(Wants(), cfg, Hooks(judge=lambda c: ("judge", c.preset))) == (
        "judge",
        "toy2d",
    )
    # the autoencoder's loss declares it exactly when its feature term is on
    for weight in (0.0, 0.5):
        ae = apply_overrides(preset("mnist-ae"), [f"train.autoencoder.feature_weight={weight}"])
        loss = build.build_loss(ae, build.build_schedule(ae.diffusion))
        assert loss.wants_judge == (weight > 0)
