"""Attention maps of transformer runs (report/attention.py): the nets' recorder hook captures
probability rows of the right shapes (padded text keys at zero, uniform when queries and keys
are zero), changes nothing it watches, and `difflab plot` draws the figures of a tiny DiT run
and a tiny MMDiT run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.conditioners.encoders import CharTokenizer
from difflab.nets.dit import DiT
from difflab.nets.mmdit import MMDiT
from difflab.nets.text import CharEncoder
from difflab.report.attention import (
    ATTENTION_TS,
    attention_modules,
    query_tokens,
    record_attention,
)
from test_dit import TINY as DIT_TINY
from test_mmdit import TINY as MMDIT_TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(net: torch.nn.Module, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def test_dit_maps_are_probability_rows_and_recording_changes_nothing():
    torch.manual_seed(0)
    net = DiT(1, (8, 8), width=32, depth=3, heads=2, patch_size=2, num_classes=3).eval()
    _perturb(net)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    plain = net(x, t, y)
    outputs = []
    maps = record_attention(net, lambda: outputs.append(net(x, t, y)))
    assert torch.equal(outputs[0], plain)  # the hook only watches
    assert all(m.recorder is None for m in attention_modules(net))  # and is taken off again
    assert len(maps) == 3 and all(m.shape == (2, 16, 16) for m in maps)  # (B, T, T) per block
    for m in maps:
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 16))
    assert not torch.allclose(maps[0][0], maps[0][1])  # each example its own map
    with torch.no_grad():  # queries and keys all zero: every token attends uniformly
        for block in net.blocks:
            block.attn.qkv.weight[:64].zero_()
            block.attn.qkv.bias[:64].zero_()
    for m in record_attention(net, lambda: net(x, t, y)):
        torch.testing.assert_close(m, torch.full((2, 16, 16), 1 / 16))


def test_mmdit_maps_cover_image_and_real_text_keys_only():
    torch.manual_seed(0)
    tokenizer = CharTokenizer(12)
    encoder = CharEncoder(tokenizer.vocab_size, 16, 1, 2, 12)
    net = MMDiT(1, (8, 8), text_encoder=encoder, width=32, depth=2, heads=2, patch_size=2)
    _perturb(net.eval())
    ids, _ = tokenizer.encode(["a seven", "the digit 3"])  # 8 and 12 real tokens of 12
    maps = record_attention(net, lambda: net(torch.randn(2, 1, 8, 8), torch.rand(2), ids))
    # the first block's text tokens query too; the last block's only give keys and values
    assert [m.shape for m in maps] == [(2, 16 + 12, 16 + 12), (2, 16, 16 + 12)]
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
        assert (m[0, :, 16 + 8 :] == 0).all()  # padded keys get nothing
        assert (m[0, :, 16:24] > 0).all() and (m[1, :, 16:] > 0).all()


def test_query_tokens_are_distinct_and_on_the_grid():
    assert query_tokens((4, 4)) == [10, 0, 2]
    assert query_tokens((1, 1)) == [0]
    assert all(0 <= q < 8 * 2 for q in query_tokens((2, 8)))


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripes")
    for name, axis in (("h", 0), ("v", 1)):
        (root / name).mkdir()
        for k in range(4):
            stripes = ((np.arange(28) // (2 + k % 3)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 28, axis=1 - axis)
            Image.fromarray(img).save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def shades(tmp_path_factory):
    root = tmp_path_factory.mktemp("shades")
    rows = []
    for name, value in {"black": 0, "white": 255}.items():
        Image.fromarray(np.full((20, 20), value, np.uint8)).save(root / f"{name}.png")
        rows.append(json.dumps({"file_name": f"{name}.png", "text": f"a {name} square"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _train_and_plot(tmp_path, preset, root, tiny) -> tuple:
    runs = tmp_path / "runs"
    sets = [x for s in (f"data.root={root}", *tiny) for x in ("--set", s)]
    argv = ["train", "--preset", preset, "--runs", str(runs), "--name", "r", "--quiet"]
    assert main([*argv, "--no-finish", *sets]) == 0
    assert main(["plot", str(runs / "r"), "--quiet"]) == 0
    with np.load(runs / "r" / "samples" / "attention.npz") as f:
        return runs / "r", {k: f[k] for k in f.files}


def test_difflab_plot_draws_a_dit_runs_attention(stripes, tmp_path):
    run, a = _train_and_plot(tmp_path, "mnist-dit", stripes, DIT_TINY)
    K, T = len(ATTENTION_TS), (32 // 4) ** 2  # 32x32 images in 4x4 patches
    assert a["maps"].shape == (K, 2, T, T) and a["text"].shape == (K, 2, T, 0)
    np.testing.assert_allclose(a["maps"].sum(-1), 1.0, rtol=1e-5)
    assert a["image"].shape == (1, 32, 32) and tuple(a["grid"]) == (8, 8)
    assert (run / "plots" / "attention.png").stat().st_size > 0
    assert not (run / "plots" / "attention_text.png").exists()


def test_difflab_plot_draws_an_mmdit_runs_text_attention(shades, tmp_path):
    run, a = _train_and_plot(tmp_path, "imagefolder", shades, MMDIT_TINY)
    K, T = len(ATTENTION_TS), (16 // 4) ** 2
    L = len(a["tokens"])  # the empty prompt (no captions name classes): the start token
    assert L >= 1 and a["text"].shape == (K, 2, T, L)
    # image queries split one softmax between image and real text keys
    np.testing.assert_allclose(a["maps"].sum(-1) + a["text"].sum(-1), 1.0, rtol=1e-5)
    assert (run / "plots" / "attention.png").exists()
    assert (run / "plots" / "attention_text.png").stat().st_size > 0
