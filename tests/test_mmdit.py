"""MMDiT (nets/mmdit.py, model.dit.text=joint): the adaLN-Zero start for both streams, padding
masked out of the joint attention, prompts that move with their rows, batch independence,
guidance with the empty prompt as null through Model.sample, a tiny text run trained and resumed
through the real trainer with the built-in char encoder, and the refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab import build
from difflab.cli import main
from difflab.conditioners.encoders import CharTokenizer
from difflab.config import ConfigError, apply_overrides, preset
from difflab.model import DataKind
from difflab.nets.mmdit import MMDiT
from difflab.nets.text import CharEncoder, FrozenContext
from difflab.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: a second thread only waits

SMALL = dict(width=32, depth=3, heads=2, patch_size=2)
TOKENS = 24


def _perturb(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Every parameter off its (partly zero) init, so every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def _char_net(perturbed=True, **options) -> tuple[MMDiT, CharTokenizer]:
    torch.manual_seed(0)
    tokenizer = CharTokenizer(TOKENS)
    encoder = CharEncoder(tokenizer.vocab_size, 16, 1, 2, TOKENS)
    net = MMDiT(1, (8, 8), text_encoder=encoder, **{**SMALL, **options})
    if perturbed:
        _perturb(net)
    return net.eval(), tokenizer


def _frozen_net() -> MMDiT:
    torch.manual_seed(0)
    net = MMDiT(1, (8, 8), text_encoder=FrozenContext(12), qk_norm=True, **SMALL)
    _perturb(net)
    return net.eval()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fresh_mmdit_outputs_zero_and_every_block_is_the_identity(qk_norm):
    net, tokenizer = _char_net(perturbed=False, qk_norm=qk_norm)
    ids, _ = tokenizer.encode(["a seven", "", "the digit 3"])
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    assert torch.equal(net(x, t, ids), torch.zeros_like(x))
    h, s, c = torch.randn(3, 16, 32), torch.randn(3, TOKENS, 32), torch.randn(3, 32)
    mask = ids != 0
    for i, block in enumerate(net.blocks):
        h_out, s_out = block(h, s, c, mask)
        assert torch.equal(h_out, h)  # the image stream starts as the identity
        last = i == len(net.blocks) - 1
        assert s_out is None if last else torch.equal(s_out, s)  # the last gives keys only
    _perturb(net)  # the same checks fail once the modulation is not zero
    assert not torch.equal(net.blocks[0](h, s, c, mask)[0], h)
    assert net(x, t, ids).abs().min() > 0


def test_every_parameter_learns():
    """No unused weights (DDP needs none): the last block's text stream has keys and values
    only, and every other weight reaches the loss."""
    net, tokenizer = _char_net(qk_norm=True)
    ids, _ = tokenizer.encode(["a seven", "one"])
    net.train()(torch.randn(2, 1, 8, 8), torch.rand(2), ids).square().sum().backward()
    idle = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert idle == []
    last = net.blocks[-1].text
    assert last.q_norm is None and last.qkv.out_features == 2 * 32 and not hasattr(last, "mlp")


def test_padding_a_prompt_does_not_change_the_image_output():
    net, tokenizer = _char_net(qk_norm=True)
    ids, _ = tokenizer.encode(["a seven", "the digit three"])  # (2, 24): real tokens, then 0s
    short = ids[:, :16]  # the same prompts with 8 fewer padding positions
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.no_grad():
        full, cut = net(x, t, ids), net(x, t, short)
        torch.testing.assert_close(full, cut, atol=1e-6, rtol=1e-6)
        unmasked = ids.clone()
        unmasked[:, 20:] = 5  # real tokens where the padding was: now the output moves
        assert not torch.allclose(net(x, t, unmasked), full, atol=1e-3)
    frozen = _frozen_net()  # a frozen encoder's padding: token states exactly zero
    states = torch.zeros(2, 10, 12)
    states[0, :3], states[1, :6] = torch.randn(3, 12), torch.randn(6, 12)
    with torch.no_grad():
        padded = torch.cat([states, torch.zeros(2, 7, 12)], dim=1)
        torch.testing.assert_close(frozen(x, t, padded), frozen(x, t, states), atol=1e-6, rtol=0)


def test_swapping_two_prompts_swaps_the_outputs():
    net, tokenizer = _char_net()
    ids, _ = tokenizer.encode(["a handwritten seven", "one"])
    swapped = ids.flip(0)
    x, t = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1), torch.full((2,), 0.4)  # rows alike
    with torch.no_grad():
        out, out_swapped = net(x, t, ids), net(x, t, swapped)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # the prompts matter
    torch.testing.assert_close(out_swapped, out.flip(0), atol=1e-6, rtol=1e-6)


def test_output_is_independent_of_the_batch():
    net, tokenizer = _char_net(qk_norm=True, dropout=0.1)  # eval: dropout off
    ids, _ = tokenizer.encode(["a seven", "", "the digit 3, by hand", "x" * 30, "one"])
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    with torch.no_grad():
        together = net(x, t, ids)
        for i in range(5):
            alone = net(x[i : i + 1], t[i : i + 1], ids[i : i + 1])
            torch.testing.assert_close(alone[0], together[i], atol=1e-6, rtol=1e-6)


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        net, tokenizer = _char_net(checkpointing=checkpointing)
        ids, _ = tokenizer.encode(["a seven", "one"])
        net.train()(torch.ones(2, 1, 8, 8), torch.tensor([0.2, 0.7]), ids).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


TINY = [
    "data.name=imagefolder",
    "data.text_conditional=true",
    "data.image_size=16",
    "data.channels=1",
    "model.name=dit",
    "model.dit.text=joint",
    "model.dit.width=32",
    "model.dit.depth=2",
    "model.dit.heads=2",
    "model.dit.patch_size=4",
    "model.dit.qk_norm=true",
    "model.text.encoder=char",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.max_tokens=24",
    "train.precision=fp32",
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.time_limit_minutes=0",
    "sample.steps=3",
    "sample.n=4",
    "sample.batch_size=4",
]
SHADES = {"black": 0, "grey": 128, "white": 255}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three flat images, black / grey / white, captioned by their shade (metadata.jsonl)."""
    root = tmp_path_factory.mktemp("shades")
    rows = []
    for name, value in SHADES.items():
        Image.fromarray(np.full((20, 20), value, np.uint8)).save(root / f"{name}.png")
        rows.append(json.dumps({"file_name": f"{name}.png", "text": f"a {name} square"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _cfg(folder, *extra):
    return apply_overrides(preset("imagefolder"), [f"data.root={folder}", *TINY, *extra])


def _sets(folder, *extra):
    return [x for s in (f"data.root={folder}", *TINY, *extra) for x in ("--set", s)]


def test_a_text_mmdit_trains_resumes_bit_for_bit_and_samples(folder, tmp_path):
    cfg = _cfg(folder, "model.dit.dropout=0.1")
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "halves", progress=False, stop_after=2)
    halves = train(cfg, tmp_path / "halves", resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(whole / name), load_file(halves / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    weights = load_file(whole / "model.safetensors")
    assert "text_encoder.tokens.weight" in weights  # the char encoder trains with the net
    assert "blocks.0.text.qkv.weight" in weights and "blocks.1.text.mlp.0.weight" not in weights
    assert weights["blocks.0.image.modulation.weight"].abs().max() > 0  # the zero start moved
    out = tmp_path / "s.npz"
    argv = ["sample", str(tmp_path / "whole"), "--steps", "2", "--n", "2", "--quiet"]
    assert main([*argv, "--prompt", "a white square", "--guidance", "2", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (2, 1, 16, 16) and np.isfinite(f["samples"]).all()


def test_guidance_with_the_empty_prompt_as_null_through_model_sample(folder):
    cfg = _cfg(folder)
    model = build.build_model(cfg, DataKind((1, 16, 16), 0, ()))
    _perturb(model.net)
    model.net.eval()
    prompts, empty = (
        model.conditioner.prompts(["a white square"] * 3),
        model.conditioner.prompts([""] * 3),
    )

    def draw(cond, guidance):
        scfg = apply_overrides(cfg, [f"sample.guidance={guidance}", "sample.n=3"]).sample
        return model.sample(scfg, cond=cond)

    with torch.no_grad():
        unconditional = draw(empty, 1.0)
        torch.testing.assert_close(draw(prompts, 0.0), unconditional, atol=0, rtol=0)
        conditional = draw(prompts, 1.0)
        guided = draw(prompts, 3.0)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the prompt matters
    assert not torch.allclose(guided, conditional, atol=1e-3) and torch.isfinite(guided).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("data.text_conditional=false",),
            "model.dit.text=joint reads prompts, but this run has no text",
        ),
        (("model.dit.text=",), "model.dit.text must be joint for a run on text"),
        (("model.dit.text=cross",), "model.dit.text='cross' is not a text mode"),
        (("model.dit.heads=3",), "model.dit.width=32 is not divisible by heads=3"),
    ],
)
def test_bad_mmdit_input_exits_2_and_writes_nothing(folder, tmp_path, capsys, extra, message):
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "bad", "--quiet"]
    assert main([*argv, *_sets(folder, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (runs / "bad").exists()


def test_the_diffusers_dit_mapping_refuses_joint_text():
    from difflab.share.dit_keys import NoEquivalent, transformer_config

    model = apply_overrides(preset("mnist-dit"), ["model.dit.text=joint"]).model
    with pytest.raises(NoEquivalent, match="joint text attention"):
        transformer_config(model, (1, 32, 32), 0)
    with pytest.raises(ConfigError, match="no text"):
        build.build_net(model, (1, 32, 32), 10)


def test_the_mnist_sd3_preset_builds_an_mmdit_on_the_latent_grid():
    """mnist-sd3's network on mnist-ae's 8x8x4 latents, fed MiniLM-shaped states (384-d; the
    encoder itself is not needed to build the net): 16 image tokens, 16 text positions."""
    cfg = preset("mnist-sd3")
    assert cfg.diffusion.t_sampling == "logit_normal" and cfg.diffusion.schedule == "rectified"
    assert cfg.model.text.encoder == "minilm" and cfg.data.text_conditional
    # the measured budget: with mnist-ae's 10-minute cap, the pipeline fits in 30 minutes
    assert preset("mnist-ae").train.time_limit_minutes + cfg.train.time_limit_minutes <= 30
    net = build.build_net(cfg.model, (4, 8, 8), 0, FrozenContext(384))
    assert isinstance(net, MMDiT) and net.grid == (4, 4) and len(net.blocks) == 6
    states = torch.zeros(2, cfg.model.text.max_tokens, 384)
    states[:, :5] = torch.randn(2, 5, 384)
    with torch.no_grad():
        assert net(torch.randn(2, 4, 8, 8), torch.rand(2), states).shape == (2, 4, 8, 8)
