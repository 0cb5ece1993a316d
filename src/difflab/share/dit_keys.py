"""difflab DiT weights <-> diffusers DiTTransformer2DModel weights, key by key (no pickles).

The two networks compute the same function (tests/test_dit.py checks it to 1e-5), but lay it out
differently:
- Patches: difflab embeds patchified tokens with a Linear (columns ordered row, column,
  channel within the patch); diffusers uses the equivalent strided conv (pos_embed.proj).
- Conditioning: difflab has one time MLP and one label table, shared by every block, as
  facebookresearch/DiT does; diffusers gives every block its own copy
  (transformer_blocks.i.norm1.emb) and the final layer reads block 0's. Export copies ours into
  each block; import takes block 0's and refuses blocks that differ.
- Attention: our fused qkv Linear is diffusers' to_q, to_k and to_v stacked (heads in the same
  order); the MLP and the six modulation vectors (shift, scale, gate of attention, then of the
  MLP) are in the same order on both sides.
- Labels: both tables have num_classes + 1 rows, the last the null label. An unconditional
  difflab DiT becomes num_embeds_ada_norm=0 with one zero row: class label 0 adds nothing.
- Time: both embed 256 sinusoids [cos, sin] of the timestep at frequencies
  10000^(-k / 127) (diffusers' downscale_freq_shift=1, which difflab's DiT adopts; the DiT paper's
  code divides by 128), then Linear, SiLU, Linear. difflab feeds t in [0, 1] and embeds t * 1000;
  diffusers embeds the timestep it is given. Calling diffusers with timestep t * 1000 (a float)
  gives the same numbers with the weights as they are (`one_step=False`). diffusers' pipelines
  call step i (t = i / 1000 in difflab) with timestep i - 1: `one_step=True` folds that one-step
  rotation of every (cos, sin) pair into the first time Linear, as share/keys.py does for the
  U-Net, so such an export is exact for a 1000-step table.
- diffusers' LayerNorm before the MLP takes norm_eps (1e-5 by default); DiT's is 1e-6 like the
  others, so `transformer_config` sets norm_eps=1e-6.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.config import ModelConfig
from difflab.share.keys import _rotated, step_rotation
from difflab.share.mapping import NoEquivalent

EMB = "norm1.emb"  # inside each diffusers block: its copy of the time and label embeddings
SHARED = {
    "time_emb.mlp.2": "timestep_embedder.linear_2",
    "label_emb": "class_embedder.embedding_table",
}
TIME_1 = ("time_emb.mlp.0", "timestep_embedder.linear_1")  # may absorb the one-step rotation
BLOCK = {
    "modulation": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.0": "ff.net.0.proj",
    "mlp.3": "ff.net.2",
}
PLAIN = {"patch_embed": "pos_embed.proj", "out_modulation": "proj_out_1", "out": "proj_out_2"}
QKV = ("to_q", "to_k", "to_v")


def transformer_config(model: ModelConfig, shape: tuple[int, ...], classes: int) -> dict:
    """DiTTransformer2DModel's arguments for difflab's DiT `model` on inputs of `shape`
    (C, H, W) with `classes` labels; NoEquivalent where diffusers has no such network."""
    if model.name != "dit":
        raise NoEquivalent(f"difflab's {model.name} network is not a DiT")
    d = model.dit
    channels, height, width = shape
    missing = [
        (d.qk_norm, "q/k normalisation (model.dit.qk_norm)"),
        (d.mlp_ratio != 4.0, f"MLP ratio other than 4 (model.dit.mlp_ratio={d.mlp_ratio})"),
        (height != width, f"non-square input ({height}x{width})"),
        (d.text == "joint", "joint text attention (model.dit.text=joint, MMDiT)"),
    ]
    for absent, what in missing:
        if absent:
            raise NoEquivalent(f"DiTTransformer2DModel has no {what}")
    return dict(
        num_attention_heads=d.heads,
        attention_head_dim=d.width // d.heads,
        in_channels=channels,
        out_channels=channels,
        num_layers=d.depth,
        dropout=d.dropout,
        attention_bias=True,
        sample_size=height,
        patch_size=d.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=classes,  # its table has classes + 1 rows, the last our null label
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # the LayerNorm before each MLP; diffusers' default is 1e-5
    )


def _patch_to_conv(weight: Tensor, p: int) -> Tensor:
    """(D, p p C) Linear over (row, column, channel) -> (D, C, p, p) conv."""
    return weight.reshape(weight.shape[0], p, p, -1).permute(0, 3, 1, 2).contiguous()


def _conv_to_patch(weight: Tensor) -> Tensor:
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def to_diffusers(
    state: dict[str, Tensor], model: ModelConfig, one_step: bool = False
) -> dict[str, Tensor]:
    """A difflab DiT state dict as DiTTransformer2DModel's (every key used exactly once).

    one_step: fold the rotation between difflab's step i and diffusers' timestep i - 1 into the
    first time Linear (for pipelines on a 1000-step table; see the module doc)."""
    d, left, out = model.dit, dict(state), {}
    blocks = [f"transformer_blocks.{i}" for i in range(d.depth)]
    shared = {}
    for ours, theirs in SHARED.items():
        for suffix in ("weight", "bias"):
            if f"{ours}.{suffix}" in left:
                shared[f"{theirs}.{suffix}"] = left.pop(f"{ours}.{suffix}")
    if "class_embedder.embedding_table.weight" not in shared:  # unconditional: one zero row
        width = shared["timestep_embedder.linear_2.weight"].shape[0]
        shared["class_embedder.embedding_table.weight"] = torch.zeros(1, width)
    w = left.pop(f"{TIME_1[0]}.weight")
    rotation = step_rotation(w.shape[1], shift=1)
    shared[f"{TIME_1[1]}.weight"] = _rotated(w, rotation) if one_step else w
    shared[f"{TIME_1[1]}.bias"] = left.pop(f"{TIME_1[0]}.bias")
    for block in blocks:
        out |= {f"{block}.{EMB}.{k}": v.clone() for k, v in shared.items()}
    for i, block in enumerate(blocks):
        for ours, theirs in BLOCK.items():
            for suffix in ("weight", "bias"):
                out[f"{block}.{theirs}.{suffix}"] = left.pop(f"blocks.{i}.{ours}.{suffix}")
        for suffix in ("weight", "bias"):
            parts = left.pop(f"blocks.{i}.attn.qkv.{suffix}").chunk(3)
            for name, part in zip(QKV, parts, strict=True):
                out[f"{block}.attn1.{name}.{suffix}"] = part.contiguous()
    for ours, theirs in PLAIN.items():
        for suffix in ("weight", "bias"):
            out[f"{theirs}.{suffix}"] = left.pop(f"{ours}.{suffix}").contiguous()
    patch = out["pos_embed.proj.weight"]
    out["pos_embed.proj.weight"] = _patch_to_conv(patch, d.patch_size)
    if left:
        raise NoEquivalent(f"difflab weights with no diffusers place: {', '.join(sorted(left))}")
    return out


def from_diffusers(
    state: dict[str, Tensor], model: ModelConfig, one_step: bool = False
) -> dict[str, Tensor]:
    """A DiTTransformer2DModel state dict as difflab's DiT's (the inverse of to_diffusers).

    Raises NoEquivalent when its blocks carry different embeddings (difflab's share one)."""
    d, left, out = model.dit, dict(state), {}
    blocks = [f"transformer_blocks.{i}" for i in range(d.depth)]
    prefix = f"{blocks[0]}.{EMB}."
    shared = {k[len(prefix) :]: left.pop(k) for k in list(left) if k.startswith(prefix)}
    for block in blocks[1:]:
        for k, v in shared.items():
            if not torch.equal(left.pop(f"{block}.{EMB}.{k}"), v):
                raise NoEquivalent(
                    f"{block} has its own {k}: difflab's DiT shares one time and label "
                    "embedding between its blocks"
                )
    for ours, theirs in SHARED.items():
        for suffix in ("weight", "bias"):
            if f"{theirs}.{suffix}" in shared:
                out[f"{ours}.{suffix}"] = shared.pop(f"{theirs}.{suffix}")
    unconditional = out["label_emb.weight"].shape[0] == 1  # num_embeds_ada_norm=0
    if unconditional and out["label_emb.weight"].any():
        raise NoEquivalent("an unconditional DiT's label table must be one row of zeros")
    if unconditional:
        del out["label_emb.weight"]
    w = shared.pop(f"{TIME_1[1]}.weight")
    rotation = step_rotation(w.shape[1], shift=1)
    out[f"{TIME_1[0]}.weight"] = _rotated(w, rotation.T) if one_step else w
    out[f"{TIME_1[0]}.bias"] = shared.pop(f"{TIME_1[1]}.bias")
    for i, block in enumerate(blocks):
        for ours, theirs in BLOCK.items():
            for suffix in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{suffix}"] = left.pop(f"{block}.{theirs}.{suffix}")
        for suffix in ("weight", "bias"):
            parts = [left.pop(f"{block}.attn1.{name}.{suffix}") for name in QKV]
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(parts)
    for ours, theirs in PLAIN.items():
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = left.pop(f"{theirs}.{suffix}").contiguous()
    out["patch_embed.weight"] = _conv_to_patch(out["patch_embed.weight"])
    if left or shared:
        extra = ", ".join(sorted([*left, *shared]))
        raise NoEquivalent(f"diffusers weights with no difflab place: {extra}")
    return out
