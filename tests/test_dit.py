"""The DiT backbone (nets/dit.py): patch layout, the adaLN-Zero start, batch independence,
equality with diffusers' DiTTransformer2DModel under the key mapping (share/dit_keys.py), config
refusals, and a tiny class-conditional DiT trained and resumed through the real trainer."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab import build
from difflab.cli import main
from difflab.config import ConfigError, apply_overrides, preset
from difflab.nets.dit import DiT, patchify, sincos_positions, unpatchify
from difflab.training.loop import train

SMALL = dict(width=32, depth=2, heads=2, patch_size=2)


def _perturb(net: torch.nn.Module, scale: float = 0.05) -> None:
    """Every parameter off its (partly zero) init, so every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("size", [(8, 8), (28, 28), (8, 28)])
def test_patchify_round_trip_for_every_dividing_patch_size(size):
    H, W = size
    x = torch.randn(2, 3, H, W)
    for p in [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]:
        tokens = patchify(x, p)
        h, w = H // p, W // p
        assert tokens.shape == (2, h * w, p * p * 3)
        assert torch.equal(unpatchify(tokens, p, (h, w)), x), p
        # token (row i, column j) holds its patch as (row in patch, column in patch, channel)
        i, j = h - 1, w // 2
        patch = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
        assert torch.equal(tokens[:, i * w + j], patch.permute(0, 2, 3, 1).reshape(2, -1))


def test_positions_encode_column_then_row():
    pos = sincos_positions(16, (3, 5))  # (15, 16): w_0 = 1, so channel 0 is sin(column)
    cols, rows = torch.arange(15) % 5, torch.arange(15) // 5
    torch.testing.assert_close(pos[:, 0], torch.sin(cols.float()))
    torch.testing.assert_close(pos[:, 4], torch.cos(cols.float()))
    torch.testing.assert_close(pos[:, 8], torch.sin(rows.float()))


@pytest.mark.parametrize("options", [dict(), dict(qk_norm=True, patch_size=4, num_classes=10)])
def test_fresh_dit_outputs_zero_and_every_block_is_the_identity(options):
    torch.manual_seed(0)
    net = DiT(in_channels=1, input_size=(28, 28), **{**SMALL, **options})
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    y = torch.tensor([0, 9, 10]) if net.num_classes else None
    assert torch.equal(net(x, t, y), torch.zeros_like(x))
    h, c = torch.randn(3, net.grid[0] * net.grid[1], 32), torch.randn(3, 32)
    for block in net.blocks:
        assert torch.equal(block(h, c), h)
    _perturb(net)  # the same checks fail once the modulation is not zero
    assert not torch.equal(net.blocks[0](h, c), h) and net(x, t, y).abs().min() > 0


def test_output_is_independent_of_the_batch():
    torch.manual_seed(0)
    net = DiT(in_channels=2, input_size=(8, 12), num_classes=3, qk_norm=True, **SMALL).eval()
    _perturb(net)
    x, t, y = torch.randn(5, 2, 8, 12), torch.rand(5), torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        together = net(x, t, y)
        for i in range(5):
            alone = net(x[i : i + 1], t[i : i + 1], y[i : i + 1])
            torch.testing.assert_close(alone[0], together[i], atol=1e-6, rtol=1e-6)
        assert torch.equal(net(x, t, None), net(x, t, torch.full((5,), 3)))  # None = null label


def test_checkpointing_gives_the_same_gradients():
    nets = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = DiT(in_channels=1, input_size=(8, 8), checkpointing=checkpointing, **SMALL)
        _perturb(net)
        net(torch.ones(2, 1, 8, 8), torch.tensor([0.2, 0.7])).square().sum().backward()
        nets.append(net)
    for a, b in zip(*(n.parameters() for n in nets), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("classes", [3, 0])
def test_mapped_weights_give_diffusers_the_same_network(classes):
    """Random weights everywhere (a zero-initialised layer would hide a mapping error): the
    class-conditional DiT and diffusers' DiTTransformer2DModel agree to 1e-5 in fp32, fed the
    same effective timestep (difflab's t, diffusers' t * 1000) and, with the one-step rotation
    folded in, difflab's step i = 1000 t against diffusers' pipeline timestep i - 1."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev extra")
    from difflab.share.dit_keys import from_diffusers, to_diffusers, transformer_config

    cfg = apply_overrides(
        preset("mnist-dit"),
        ["model.dit.width=32", "model.dit.depth=2", "model.dit.heads=2", "model.dit.patch_size=2"],
    )
    torch.manual_seed(0)
    net = build.build_net(cfg.model, (4, 8, 8), classes).eval()
    _perturb(net)
    x = torch.randn(3, 4, 8, 8)
    y = torch.tensor([0, 2, 3]) if classes else None  # 3 = the null label
    labels = y if classes else torch.zeros(3, dtype=torch.long)  # row 0: zeros, no class
    for one_step, steps in ((False, torch.tensor([0.37, 500.0, 999.5])), (True, [1, 500, 1000])):
        steps = torch.as_tensor(steps, dtype=torch.float32)
        theirs_t = steps - 1 if one_step else steps
        theirs = diffusers.DiTTransformer2DModel(
            **transformer_config(cfg.model, (4, 8, 8), classes)
        )
        weights = to_diffusers(net.state_dict(), cfg.model, one_step=one_step)
        theirs.load_state_dict(weights, strict=True)  # no key missing, none left over
        with torch.no_grad():
            ours = net(x, steps / 1000, y)
            out = theirs.eval()(x, timestep=theirs_t, class_labels=labels).sample
        assert float((ours - out).abs().max()) < 1e-5 * float(ours.abs().max()), one_step
        back = from_diffusers(theirs.state_dict(), cfg.model, one_step=one_step)
        assert back.keys() == net.state_dict().keys()
        for k, v in net.state_dict().items():
            torch.testing.assert_close(back[k], v, atol=1e-6 if one_step else 0, rtol=0)


def test_what_diffusers_cannot_hold_is_refused():
    from difflab.share.dit_keys import NoEquivalent, from_diffusers, to_diffusers
    from difflab.share.dit_keys import transformer_config as config

    model = preset("mnist-dit").model
    for override, needle in (("qk_norm", True), ("mlp_ratio", 2.0)):
        bad = apply_overrides(preset("mnist-dit"), [f"model.dit.{override}={needle}"]).model
        with pytest.raises(NoEquivalent, match=override):
            config(bad, (1, 32, 32), 10)
    with pytest.raises(NoEquivalent, match="non-square"):
        config(model, (1, 32, 16), 10)
    with pytest.raises(NoEquivalent, match="not a DiT"):
        config(preset("mnist").model, (1, 32, 32), 10)
    qk = apply_overrides(preset("mnist-dit"), ["model.dit.qk_norm=true"]).model
    state = build.build_net(qk, (1, 8, 8), 10).state_dict()
    with pytest.raises(NoEquivalent, match="q_norm"):
        to_diffusers(state, qk)
    plain = build.build_net(model, (1, 8, 8), 10).state_dict()
    theirs = to_diffusers(plain, model)
    theirs["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"] += 1
    with pytest.raises(NoEquivalent, match="shares one time and label embedding"):
        from_diffusers(theirs, model)


@pytest.mark.parametrize(
    ("override", "shape", "message"),
    [
        ("model.dit.patch_size=3", (1, 32, 32), "model.dit.patch_size=3 does not divide the 32x32"),
        ("model.dit.patch_size=4", (4, 6, 6), "choose one of 1, 2, 3, 6"),  # a latent grid
        ("model.dit.heads=5", (1, 32, 32), "model.dit.width=192 is not divisible by heads=5"),
        ("model.dit.width=30", (1, 32, 32), "model.dit.width=30 must be a multiple of 4"),
        ("model.dit.depth=0", (1, 32, 32), "model.dit.depth must be >= 1"),
    ],
)
def test_bad_dit_configs_are_one_line_config_errors(override, shape, message):
    cfg = apply_overrides(preset("mnist-dit"), [override])
    with pytest.raises(ConfigError, match=message) as caught:
        build.build_net(cfg.model, shape, 10)
    assert "\n" not in str(caught.value)


TINY = [
    "data.name=imagefolder",
    "data.channels=1",
    "data.image_size=32",
    "model.dit.width=32",
    "model.dit.depth=2",
    "model.dit.heads=2",
    "model.dit.patch_size=4",
    "train.precision=fp32",
    "train.batch_size=8",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.time_limit_minutes=0",
    "sample.steps=4",
    "sample.n=4",
    "sample.batch_size=4",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """MNIST-shaped data: two classes of 28x28 grey images ('h': horizontal stripes, 'v':
    vertical), resized by data.image_size to the 32x32 the mnist presets train at."""
    root = tmp_path_factory.mktemp("digits")
    for name, axis in (("h", 0), ("v", 1)):
        (root / name).mkdir()
        for k in range(6):
            stripes = ((np.arange(28) // (2 + k % 3)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 28, axis=1 - axis)
            Image.fromarray(img).save(root / name / f"{k}.png")
    return root


def _sets(folder, *extra):
    return [x for s in (f"data.root={folder}", *TINY, *extra) for x in ("--set", s)]


def test_difflab_trains_and_samples_a_tiny_dit(folder, tmp_path):
    runs = tmp_path / "runs"
    argv = [
        "train",
        "--preset",
        "mnist-dit",
        "--runs",
        str(runs),
        "--name",
        "d",
        "--quiet",
        "--no-finish",
    ]
    assert main([*argv, *_sets(folder)]) == 0
    weights = load_file(runs / "d" / "checkpoints" / "step-6" / "model.safetensors")
    assert "blocks.1.attn.qkv.weight" in weights and "positions" not in weights  # fixed, derived
    assert weights["blocks.0.modulation.weight"].abs().max() > 0  # the zero start has moved
    out = tmp_path / "s.npz"
    argv = ["sample", str(runs / "d"), "--n", "4", "--per-class", "--guidance", "2", "--steps", "3"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (4, 1, 32, 32) and f["labels"].tolist() == [0, 0, 1, 1]
        assert np.isfinite(f["samples"]).all()


def test_dit_resume_is_bitwise_exact(folder, tmp_path):
    sets = [f"data.root={folder}", *TINY, "model.dit.dropout=0.1", "model.dit.qk_norm=true"]
    cfg = apply_overrides(preset("mnist-dit"), [*sets, "model.dit.checkpointing=true"])
    a = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=3)
    b = train(cfg, tmp_path / "b", resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_bad_dit_config_exits_2_and_writes_nothing(folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "mnist-dit", "--runs", str(runs), "--name", "bad", "--quiet"]
    for override, message in (
        ("model.dit.patch_size=5", "model.dit.patch_size=5 does not divide the 32x32"),
        ("model.dit.heads=3", "model.dit.width=32 is not divisible by heads=3"),
    ):
        assert main([*argv, *_sets(folder, override)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (runs / "bad").exists()


def test_dit_weights_under_a_unet_config_are_one_clear_line(folder, tmp_path, capsys):
    """A DiT's checkpoint met by a U-Net config, through the two doors that build the network
    from a config other than the run's own: a checkpoint whose config.json was edited (and its
    manifest rewritten, else the checksum refuses it first), and train.init_from."""
    import json

    from difflab.files import sha256_file

    runs = tmp_path / "runs"
    argv = ["train", "--preset", "mnist-dit", "--runs", str(runs), "--name", "d", "--quiet"]
    sets = _sets(folder, "train.steps=2", "train.checkpoint_every=2")
    assert main([*argv, "--no-finish", *sets]) == 0
    ckpt = runs / "d" / "checkpoints" / "step-2"
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["name"] = "unet"
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"]["config.json"] = sha256_file(ckpt / "config.json")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "s.npz"
    needle = "are a DiT's (model.name=dit) but the config builds a U-Net (model.name=unet)"
    for argv in (
        ["sample", str(runs / "d"), "--n", "2", "--steps", "2", "--out", str(out), "--quiet"],
        [
            "train",
            "--preset",
            "mnist",
            "--runs",
            str(runs),
            "--name",
            "u",
            "--quiet",
            *_sets(folder, f"train.init_from={ckpt}"),
        ],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert "state_dict" not in err and "Missing key" not in err
    assert not out.exists()
