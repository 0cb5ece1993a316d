"""Attention maps of a transformer run (DiT, MMDiT): where one sample's image tokens look, and
for MMDiT which image tokens read each word of the prompt, at a few noise levels.

The network's attention modules (nets/dit.py's SelfAttention, nets/mmdit.py's JointBlock) carry
an optional `recorder`; set, it receives each block's queries and keys (and key mask), from
which `AttentionRecorder` forms softmax(q k^T / sqrt(d)) averaged over heads. A run whose net
has no such module (a U-Net) records nothing.

Artefact samples/attention.npz:
    ts        (K,) the noise levels t of one sample's x_t = alpha(t) x0 + sigma(t) eps
    image     (C, H, W) that sample (decoded), in [-1, 1]
    grid      (2,) the grid of image tokens (h, w); T = h w
    maps      (K, depth, T, T) image queries' attention to image keys, per block
    text      (K, depth, T, L) image queries' attention to the prompt's L real tokens (MMDiT;
              L = 0 otherwise)
    tokens    (L,) the prompt's tokens (word pieces, or characters of the built-in encoder)
Figures: plots/attention.png (per noise level: the sample, the attention each token receives,
and where a few query tokens look, averaged over blocks) and, for MMDiT,
plots/attention_text.png (per noise level and prompt token: the image tokens that read it).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difflab.files import savez_atomically
from difflab.report.figure import subplots
from difflab.runs import draw_samples, load_run
from difflab.samplers import Recorder

ATTENTION_TS = (0.9, 0.5, 0.2, 0.05)  # noise levels shown, from almost noise to almost clean
MAX_TOKENS_SHOWN = 12  # prompt tokens in the text figure


class AttentionRecorder:
    """A recorder for the networks' attention modules: keeps each call's attention
    probabilities averaged over heads, (B, T_q, T_k) float32 on the CPU, in call order."""

    def __init__(self):
        self.maps: list[Tensor] = []

    def __call__(self, q: Tensor, k: Tensor, mask: Tensor | None) -> None:
        """q (B, heads, T_q, d), k (B, heads, T_k, d), mask broadcastable to (B, heads, T_q,
        T_k) with True = attend, or None."""
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        self.maps.append(scores.softmax(dim=-1).mean(dim=1).detach().cpu())


def attention_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `net` that take a `recorder`, in block order ([] for a U-Net)."""
    return [m for m in net.modules() if hasattr(m, "recorder")]


def record_attention(net: torch.nn.Module, call) -> list[Tensor]:
    """Run `call()` (a forward pass through `net`) and return every block's attention maps
    (B, T_q, T_k), one per attention module in block order."""
    recorder, modules = AttentionRecorder(), attention_modules(net)
    for m in modules:
        m.recorder = recorder
    try:
        with torch.no_grad():
            call()
    finally:
        for m in modules:
            m.recorder = None
    return recorder.maps


def token_names(encoder, prompt: str) -> list[str]:
    """The tokens the text encoder makes of `prompt`, as the net sees them (real ones only)."""
    if hasattr(encoder, "tokenizer"):  # MiniLM: word pieces between [CLS] and [SEP]
        tokenizer = encoder.tokenizer
        ids = tokenizer(prompt, truncation=True, max_length=encoder.max_tokens)["input_ids"]
        return tokenizer.convert_ids_to_tokens(ids)
    chars = list(" ".join(prompt.lower().split()))  # the built-in CharTokenizer
    return ["<start>", *chars][: encoder.max_tokens]


def make_attention_artefacts(run_dir: Path) -> Path | None:
    """samples/attention.npz of one sample of the run (module doc); None for a net without
    attention recorders."""
    run = load_run(run_dir)
    net, model = run.model.net, run.model
    if not attention_modules(net):
        return None
    tokens: list[str] = []
    if model.kind.text:
        prompt = model.conditioner.default_prompts(1)[0]
        cond = model.conditioner.prompts([prompt])
        tokens = token_names(model.conditioner.encoder, prompt)
    else:
        cond = model.conditioner.request(1, class_label=0) if model.kind.conditional else None
    scfg = dataclasses.replace(run.cfg.sample, n=1, batch_size=1)
    states = Recorder(every=10**9, max_items=1)  # keeps the final state: x0 in the net's space
    image = draw_samples(run, scfg, labels=cond, progress=False, recorder=states)
    x0 = states.final.to(model.device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(scfg.seed))
    cond = cond.to(model.device) if cond is not None else None
    T = net.grid[0] * net.grid[1]
    maps, text = [], []
    for t_value in ATTENTION_TS:
        t = torch.full((1,), t_value, device=model.device)
        alpha, sigma = model.denoiser.alpha_sigma(t, x0)
        x_t = alpha * x0 + sigma * eps.to(model.device)
        blocks = record_attention(net, lambda: model.denoiser(x_t, t, cond))  # noqa: B023
        maps.append(np.stack([b[0, :T, :T].numpy() for b in blocks]))
        text.append(np.stack([b[0, :T, T : T + len(tokens)].numpy() for b in blocks]))
    path = run_dir / "samples" / "attention.npz"
    savez_atomically(
        path,
        ts=np.array(ATTENTION_TS),
        image=image[0].numpy(),
        grid=np.array(net.grid),
        maps=np.stack(maps),
        text=np.stack(text),
        tokens=np.array(tokens, dtype=str),
    )
    return path


def _show_image(ax, image: np.ndarray) -> None:
    """An image (C, H, W) in [-1, 1] on `ax`, grey for one channel."""
    x = np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1)
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray" if x.shape[-1] == 1 else None)


def query_tokens(grid: tuple[int, int]) -> list[int]:
    """Three query tokens of a (h, w) grid: the centre, a corner and the middle of the top row
    (row-major indices), without repeats."""
    h, w = grid
    picks = [(h // 2) * w + w // 2, 0, (w // 2)]
    return list(dict.fromkeys(picks))


def plot_attention(run_dir: Path) -> list[Path]:
    """plots/attention.png and, for MMDiT, plots/attention_text.png from samples/attention.npz
    (module doc); [] when the run has none."""
    source = run_dir / "samples" / "attention.npz"
    if not source.exists():
        return []
    with np.load(source, allow_pickle=False) as f:
        a = {k: f[k] for k in f.files}
    grid = (int(a["grid"][0]), int(a["grid"][1]))
    maps = a["maps"].mean(axis=1)  # (K, T, T): averaged over blocks
    queries = query_tokens(grid)
    K = len(a["ts"])
    fig, axes = subplots(
        K, 2 + len(queries), figsize=(2 * (2 + len(queries)), 2 * K), squeeze=False
    )
    for row, t in enumerate(a["ts"]):
        _show_image(axes[row, 0], a["image"])
        axes[row, 0].set_ylabel(f"t = {t:g}")
        axes[row, 1].imshow(maps[row].sum(axis=0).reshape(grid), cmap="viridis")
        for col, q in enumerate(queries, start=2):
            axes[row, col].imshow(maps[row, q].reshape(grid), cmap="viridis")
            axes[row, col].plot(q % grid[1], q // grid[1], "r+", markersize=10)
    axes[0, 0].set_title("sample")
    axes[0, 1].set_title("attention received")
    for col, q in enumerate(queries, start=2):
        axes[0, col].set_title(f"query token {q}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("image tokens' attention, mean over heads and blocks")
    fig.tight_layout()
    paths = [run_dir / "plots" / "attention.png"]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(paths[0])
    if len(a["tokens"]):
        paths.append(_plot_text(a, grid, run_dir / "plots" / "attention_text.png"))
    return paths


def _plot_text(a: dict, grid: tuple[int, int], path: Path) -> Path:
    """Per noise level (rows) and prompt token (columns): how much each image token attends to
    that token, averaged over heads and blocks."""
    tokens = [str(x) for x in a["tokens"][:MAX_TOKENS_SHOWN]]
    text = a["text"].mean(axis=1)  # (K, T, L)
    K, n = len(a["ts"]), len(tokens)
    fig, axes = subplots(K, n, figsize=(1.6 * n, 1.6 * K), squeeze=False)
    for row, t in enumerate(a["ts"]):
        axes[row, 0].set_ylabel(f"t = {t:g}")
        for col, token in enumerate(tokens):
            axes[row, col].imshow(text[row, :, col].reshape(grid), cmap="viridis")
            if row == 0:
                axes[row, col].set_title(token)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("text-to-image attention per prompt token, mean over heads and blocks")
    fig.tight_layout()
    fig.savefig(path)
    return path
