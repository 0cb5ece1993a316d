"""The model seams: one Model per run, conditioners, codecs and loss objects with targets."""

import dataclasses

import pytest
import torch

from difflab import build
from difflab.codecs import Identity
from difflab.conditioners import ClassLabels, Unconditional
from difflab.config import ConfigError, SampleConfig, apply_overrides, preset
from difflab.diffusion.loss_base import Loss
from difflab.diffusion.losses import DiffusionLoss
from difflab.diffusion.prediction import Denoiser
from difflab.diffusion.schedules import CosineSchedule
from difflab.model import DataKind, Model, RunKind
from difflab.samplers import SAMPLERS
from difflab.training.checkpoint import load_state, load_weights
from difflab.training.loop import train
from difflab.training.parts import build_parts

SMALL = [
    "model.mlp.width=32",
    "model.mlp.depth=1",
    "train.batch_size=64",
    "train.log_every=5",
    "train.warmup_steps=0",
    "train.lr_schedule=constant",
    "train.steps=12",
    "train.checkpoint_every=6",
]


def test_class_labels_own_dropout_requests_and_balance():
    labels = ClassLabels(3, dropout=0.5)
    y = torch.zeros(1000, dtype=torch.long)
    dropped = labels.train_condition(y, torch.Generator().manual_seed(0), "cpu")
    assert set(dropped.tolist()) == {0, 3} and 0.45 < (dropped == 3).float().mean() < 0.55
    assert labels.balanced(7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert labels.request(6, per_class=True).tolist() == [0, 0, 1, 1, 2, 2]
    assert labels.request(2, class_label=2).tolist() == [2, 2]
    with pytest.raises(ValueError, match="out of range"):
        labels.request(2, class_label=3)
    with pytest.raises(ValueError, match="--class and --per-class"):
        Unconditional().request(2, per_class=True)


class SequenceConditioner:
    """A throw-away conditioner whose condition is a sequence of embeddings (B, L, D), as text
    will be: nothing outside it and its network knows what the condition is."""

    conditional, class_names = True, ()

    def __init__(self, null: torch.Tensor):
        self.null = null  # (L, D): "the empty prompt"

    def check_guidance(self, scale):
        assert scale >= 0

    def request(self, n, seed=0, **_):
        return torch.randn((n, *self.null.shape), generator=torch.Generator().manual_seed(seed))

    def null_like(self, cond):
        return self.null.expand_as(cond)

    def cat(self, a, b):
        return torch.cat([a, b])


def _sequence_net(x, t, cond):  # (B, 2), (B,), (B, L, D) -> (B, 2): depends on the condition
    return 0.1 * x + cond.mean(dim=(1, 2))[:, None]


def test_a_sequence_condition_goes_through_the_one_sampling_path():
    schedule = CosineSchedule()
    conditioner = SequenceConditioner(torch.zeros(4, 8))
    model = Model(
        _sequence_net,
        schedule,
        Denoiser(_sequence_net, schedule, "eps"),
        conditioner,
        Identity(),
        RunKind("diffusion", DataKind((2,)), "text"),
    )
    scfg = SampleConfig(sampler="ddim", steps=5, n=6, batch_size=4, seed=2, guidance=1.0)
    cond = conditioner.request(6, seed=5)
    conditional = model.sample(scfg, cond=cond)
    guided = model.sample(dataclasses.replace(scfg, guidance=3.0), cond=cond)
    unconditional = model.sample(dataclasses.replace(scfg, guidance=0.0), cond=cond)
    assert conditional.shape == (6, 2) and not torch.allclose(conditional, unconditional)
    # the guided eps is affine in w, and DDIM is linear in eps: the endpoints extrapolate
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))


def test_build_model_is_the_one_place_a_model_is_made():
    cfg = apply_overrides(preset("toy2d"), SMALL)
    model = build.build_model(cfg, DataKind((2,), 3, ("a", "b", "c")))
    assert isinstance(model.conditioner, ClassLabels) and model.conditioner.null_label == 3
    assert model.kind.info() == {"shape": [2], "num_classes": 3, "class_names": ["a", "b", "c"]}
    assert DataKind.from_info(model.kind.info()) == model.kind.data and not model.kind.is_image
    assert isinstance(build.build_model(cfg, DataKind((2,))).conditioner, Unconditional)
    with pytest.raises(ConfigError, match=r"unknown train\.loss 'nope'; choose one of diffusion"):
        build_parts(apply_overrides(cfg, ["train.loss=nope"]))


@pytest.mark.parametrize("schedule", ["linear", "edm"])
def test_the_dry_run_accepts_every_sampler_a_diffusion_model_can_use(schedule):
    """check_sample's dry run must refuse nothing a real draw accepts: every registered
    sampler but the consistency one and a family's own (meanflow, shortcut), on a discrete
    table and in continuous EDM time; those refuse a diffusion model in one line."""
    sets = ["diffusion.schedule=edm", "diffusion.num_steps=0", "diffusion.prediction=edm"]
    cfg = apply_overrides(preset("toy2d"), SMALL + (sets if schedule == "edm" else []))
    model = build.build_model(cfg, DataKind((2,)))
    for name, info in SAMPLERS.items():
        if info.family:
            with pytest.raises(ConfigError, match=f"train.loss={info.family}"):
                model.check_sample(SampleConfig(sampler=name, steps=1), dry_run=True)
        elif name != "consistency":
            spacing = "karras" if schedule == "edm" else "trailing"
            model.check_sample(SampleConfig(sampler=name, steps=8, spacing=spacing), dry_run=True)
    with pytest.raises(ConfigError, match="needs a consistency model"):
        model.check_sample(SampleConfig(sampler="consistency", steps=1), dry_run=True)


@pytest.mark.parametrize(
    "name, family, condition, codec",
    [
        ("toy2d", "diffusion", "none", "identity"),
        ("toy2d-flow", "flow", "none", "identity"),
        ("toy2d-ct", "consistency", "none", "identity"),
        ("mnist", "diffusion", "classes", "identity"),
        ("mnist-cd", "consistency", "classes", "identity"),
        ("mnist-ae", "autoencoder", "none", "identity"),
        ("mnist-latent", "diffusion", "classes", "latent"),
        ("mnist-text", "diffusion", "text", "identity"),
        ("toy2d-meanflow", "meanflow", "none", "identity"),
        ("toy2d-shortcut", "shortcut", "none", "identity"),
    ],
)
def test_the_run_kind_is_decided_once_from_the_config_and_the_data(name, family, condition, codec):
    """Each preset's kind is what its documentation says it is; the data part is data.json's
    record, and a text run takes no class labels (its conditioner names classes itself)."""
    cfg = preset(name)
    points, images = DataKind((2,)), DataKind((1, 28, 28), 10 * cfg.data.class_conditional)
    data = points if name.startswith("toy2d") else images  # as build.data_kind records it
    kind = build.run_kind(cfg, data)
    assert (kind.family, kind.condition, kind.codec) == (family, condition, codec)
    assert kind.data == data and kind.is_image == (data is images)
    assert kind.channels == (1 if data is images else None)
    assert kind.conditional == (condition != "none") and kind.text == (condition == "text")
    assert kind.consistency == (family == "consistency") and kind.latent == (codec == "latent")
    with pytest.raises(ValueError, match="rectified"):
        RunKind("rectified", data)  # a family is added to model.FAMILIES first


@pytest.mark.parametrize(
    "name, overrides, teacher, distils, state, target",
    [
        ("toy2d", [], False, False, False, None),
        ("toy2d-ct", ["train.loss=ct"], False, False, False, "ema"),  # an EMA at mu(k)
        ("toy2d-ct", ["train.loss=ict"], False, False, False, 0.0),  # a stop-gradient copy
        ("toy2d-ect", ["consistency.init_from_teacher=true"], True, False, False, 0.0),
        ("toy2d-ect", ["consistency.init_from_teacher=false"], False, False, False, 0.0),
        ("toy2d-cd", ["consistency.target_ema=0.5"], True, True, False, 0.5),
        ("mnist-ae", [], False, False, True, None),
    ],
)
def test_every_loss_declares_what_it_needs_from_the_trainer(
    name, overrides, teacher, distils, state, target
):
    """The trainer asks a loss (loss_base.Loss), never probes it: a teacher run (ECT only when
    it starts from one; CD always, and its solver step), trainable state (the autoencoder's
    discriminator) and a target network, as consistency_losses.py's table says."""
    cfg = apply_overrides(preset(name), overrides)
    loss = build.build_loss(cfg, build.build_schedule(cfg.diffusion))
    assert isinstance(loss, Loss)
    assert (loss.needs_teacher, loss.distils, loss.has_state) == (teacher, distils, state)
    decay = loss.target_decay(0)
    assert 0 < decay < 1 if target == "ema" else decay == target
    assert loss.log_row(0) if name != "toy2d" and not state else loss.log_row(0) == {}


class CopyTargetLoss(DiffusionLoss):
    """The diffusion loss plus a pull towards a target network: a stop-gradient copy of the
    online network (decay 0) or an EMA of it, as consistency losses declare."""

    decay = 0.0

    def target_decay(self, step):
        return self.decay

    def __call__(self, model, x0, cond, *, noise, step, target=None):
        loss, t = super().__call__(model, x0, cond, noise=noise, step=step)
        pairs = zip(model.net.parameters(), target.parameters(), strict=True)
        pull = sum((p - q).pow(2).sum() for p, q in pairs)
        return loss + 0.1 * pull, t


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_the_trainer_keeps_checkpoints_and_resumes_a_loss_target(tmp_path, monkeypatch, decay):
    monkeypatch.setattr(CopyTargetLoss, "decay", decay)

    def make(cfg, schedule):
        return CopyTargetLoss(build.build_loss_spec(cfg.diffusion, schedule), schedule)

    monkeypatch.setitem(build.LOSSES, "target_test", make)
    cfg = apply_overrides(preset("toy2d"), [*SMALL, "train.loss=target_test"])
    straight = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=6)
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    target_a, target_b = load_state(straight)["target"], load_state(resumed)["target"]
    assert all(torch.equal(target_a[k], target_b[k]) for k in target_a)
    parts = build_parts(cfg)  # the online weights at the end
    load_weights(straight, parts.net, "model")
    online = parts.net.state_dict()
    same = all(torch.equal(online[k], target_a[k]) for k in online)
    assert same == (decay == 0.0)  # a copy follows the online net exactly; an EMA lags
