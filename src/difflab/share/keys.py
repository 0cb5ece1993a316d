"""difflab U-Net weights <-> diffusers UNet2DModel weights, key by key (no pickles).

`layout` lists, for a U-Net config, each difflab block prefix beside its diffusers prefix and
kind; ResBlocks and attention blocks rename their parts, attention splits our 1x1 qkv conv into
diffusers' to_q/to_k/to_v Linears. The time embedding's first Linear absorbs the one-step
rotation between difflab's embedded step i and diffusers' timestep i - 1 (see mapping.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.config import UNetConfig
from difflab.share.mapping import NoEquivalent

RES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "emb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}
PLAIN = {
    "conv_in": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "time_emb.mlp.2": "time_embedding.linear_2",
    "label_emb": "class_embedding",
}


def layout(u: UNetConfig) -> list[tuple[str, str, str]]:
    """(difflab prefix, diffusers prefix, kind) of every block; kind is res, attn or conv."""
    levels, nrb, attn = len(u.channel_mults), u.num_res_blocks, set(u.attention_levels)
    rows, k = [], 0
    for level in range(levels):
        for j in range(nrb):
            rows.append((f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if level in attn:
                rows.append((f"down.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level < levels - 1:
            rows.append((f"down.{k}.0", f"down_blocks.{level}.downsamplers.0.conv", "conv"))
            k += 1
    rows.append(("mid.0", "mid_block.resnets.0", "res"))
    if u.mid_attention:
        rows.append(("mid.1", "mid_block.attentions.0", "attn"))
    rows.append((f"mid.{2 if u.mid_attention else 1}", "mid_block.resnets.1", "res"))
    k = 0
    for up, level in enumerate(reversed(range(levels))):
        for i in range(nrb + 1):
            ours = f"up.{k}"
            rows.append((f"{ours}.0", f"up_blocks.{up}.resnets.{i}", "res"))
            n = 1
            if level in attn:
                rows.append((f"{ours}.1", f"up_blocks.{up}.attentions.{i}", "attn"))
                n = 2
            if level > 0 and i == nrb:
                rows.append((f"{ours}.{n}.1", f"up_blocks.{up}.upsamplers.0.conv", "conv"))
            k += 1
    return rows


def step_rotation(dim: int, shift: int = 0) -> Tensor:
    """M (dim, dim) float64 with emb(i) = M emb(i - 1) for difflab's [cos, sin] embedding (shift:
    its frequency spacing, nets.layers.sinusoidal_embedding's; 1 for the DiT)."""
    half = dim // 2
    w = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - shift))
    c, s, k = torch.cos(w), torch.sin(w), torch.arange(half)
    m = torch.zeros(dim, dim, dtype=torch.float64)
    m[k, k], m[k, half + k], m[half + k, k], m[half + k, half + k] = c, -s, s, c
    if dim % 2:
        m[-1, -1] = 1.0  # the zero pad
    return m


def _rotated(weight: Tensor, m: Tensor) -> Tensor:
    return (weight.double() @ m).to(weight.dtype)


TIME_1 = ("time_emb.mlp.0", "time_embedding.linear_1")  # absorbs the one-step rotation


def renames(u: UNetConfig) -> list[tuple[str, str]]:
    """(difflab prefix, diffusers prefix) of every tensor pair that is only renamed."""
    pairs = list(PLAIN.items())
    for ours, theirs, kind in layout(u):
        if kind == "res":
            pairs += [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in RES.items()]
        elif kind == "conv":
            pairs.append((ours, theirs))
        else:
            pairs.append((f"{ours}.norm", f"{theirs}.group_norm"))
    return pairs


def _attention_to_diffusers(left: dict, out: dict, ours: str, theirs: str) -> None:
    """Our 1x1 qkv conv (3C, C, 1, 1) -> to_q / to_k / to_v Linears; proj -> to_out.0."""
    for suffix in ("weight", "bias"):
        qkv = left.pop(f"{ours}.qkv.{suffix}")
        for name, part in zip(("to_q", "to_k", "to_v"), qkv.chunk(3), strict=True):
            out[f"{theirs}.{name}.{suffix}"] = part.reshape(part.shape[:2]).contiguous()
        proj = left.pop(f"{ours}.proj.{suffix}")
        out[f"{theirs}.to_out.0.{suffix}"] = proj.reshape(proj.shape[:2]).contiguous()


def _attention_from_diffusers(left: dict, out: dict, ours: str, theirs: str) -> None:
    """The inverse of _attention_to_diffusers."""
    for suffix in ("weight", "bias"):
        qkv = torch.cat([left.pop(f"{theirs}.{n}.{suffix}") for n in ("to_q", "to_k", "to_v")])
        proj = left.pop(f"{theirs}.to_out.0.{suffix}")
        if suffix == "weight":
            qkv, proj = qkv[:, :, None, None], proj[:, :, None, None]
        out[f"{ours}.qkv.{suffix}"], out[f"{ours}.proj.{suffix}"] = qkv, proj


def _convert(state: dict[str, Tensor], u: UNetConfig, to_theirs: bool) -> dict[str, Tensor]:
    """One walk of the key table in either direction (every key used exactly once)."""
    src, dst = (0, 1) if to_theirs else (1, 0)
    out, left = {}, dict(state)
    for pair in renames(u):
        for suffix in ("weight", "bias"):
            if f"{pair[src]}.{suffix}" in left:
                out[f"{pair[dst]}.{suffix}"] = left.pop(f"{pair[src]}.{suffix}").contiguous()
    w = left.pop(f"{TIME_1[src]}.weight")
    m = step_rotation(w.shape[1])
    out[f"{TIME_1[dst]}.weight"] = _rotated(w, m if to_theirs else m.T).contiguous()
    out[f"{TIME_1[dst]}.bias"] = left.pop(f"{TIME_1[src]}.bias")
    attention = _attention_to_diffusers if to_theirs else _attention_from_diffusers
    for ours, theirs, kind in layout(u):
        if kind == "attn":
            attention(left, out, ours, theirs)
    if left:
        which, other = ("difflab", "diffusers") if to_theirs else ("diffusers", "difflab")
        raise NoEquivalent(f"{which} weights with no {other} place: {', '.join(sorted(left))}")
    return out


def to_diffusers(state: dict[str, Tensor], u: UNetConfig) -> dict[str, Tensor]:
    """A difflab UNet state dict as UNet2DModel's (every key used exactly once)."""
    return _convert(state, u, to_theirs=True)


def from_diffusers(state: dict[str, Tensor], u: UNetConfig) -> dict[str, Tensor]:
    """A UNet2DModel state dict as difflab's UNet's (the inverse of to_diffusers)."""
    return _convert(state, u, to_theirs=False)
