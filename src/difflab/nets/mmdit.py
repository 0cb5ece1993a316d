"""MMDiT, a DiT that reads text jointly: net(x_t (B, C, H, W), t (B,), cond) -> (B, C, H, W).

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
(SD3; Sec. 4, Fig. 2): the image's patch tokens and the prompt's tokens keep two streams, each
with its own weights (adaLN modulation, QKV and output projections, MLP), but every block runs
ONE attention over both sequences concatenated, so image tokens read the text and text tokens
read the image. The pooled text vector joins the time embedding in the condition c that
modulates both streams. The final layer un-patchifies the image tokens only.

`cond` is whatever the run's text conditioner makes (conditioners/text.py): character ids of the
built-in CharEncoder, trained with this net, or a frozen encoder's token states (nets/text.py).
The text encoder turns it into (context (B, L, D_text), mask (B, L), True = a real token).

Choices, each for a reason:
- padded text positions are masked out as keys, for both streams' queries, and left out of the
  pooled vector: padding a prompt with more empty positions changes nothing about the image
  (image keys are always there, so no query row is ever entirely masked);
- the last block's text stream is SD3's `context_pre_only`: it only gives keys and values (no
  queries, output projection or MLP), as nothing reads its output; so every parameter gets a
  gradient (DDP needs no unused-parameter search);
- the text keeps no extra positions: the CharEncoder embeds positions, MiniLM's states carry
  them;
- DiT's adaLN-Zero start (nets/dit.py) holds for both streams: every modulation Linear starts at
  zero, so its gates are zero and every block is the identity on the image tokens (and, but for
  the last, on the text tokens); with the zero output layer the fresh net predicts 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.errors import ConfigError
from difflab.nets.dit import NORM_EPS, DiT, RMSNorm, mlp, modulate
from difflab.nets.layers import attention
from difflab.nets.text import pooled

TEXT_MODES = ("", "joint")  # model.dit.text: no text, or MMDiT's joint attention


class Stream(nn.Module):
    """One modality's weights in a joint block: adaLN modulation, QKV (with optional RMS q/k
    norm), the attention's output projection and an MLP. `keys_only` (the last block's text):
    modulation of the attention input only (shift, scale) and keys and values only."""

    def __init__(self, width, heads, mlp_ratio, dropout, qk_norm, keys_only=False):
        super().__init__()
        self.heads, self.keys_only = heads, keys_only
        parts = 2 if keys_only else 3  # (keys, values) or (queries, keys, values)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.modulation = nn.Linear(width, (2 if keys_only else 6) * width)  # zero at init
        self.qkv = nn.Linear(width, parts * width)
        self.q_norm = RMSNorm(width // heads, eps=NORM_EPS) if qk_norm and not keys_only else None
        self.k_norm = RMSNorm(width // heads, eps=NORM_EPS) if qk_norm else None
        if not keys_only:
            self.proj = nn.Linear(width, width)
            self.dropout = nn.Dropout(dropout)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
            self.mlp = mlp(width, int(width * mlp_ratio), dropout)

    def qkv_heads(self, h: Tensor, c: Tensor):
        """Tokens h (B, N, D), condition c (B, D) -> (q | None, k, v), each (B, heads, N, D /
        heads), and the six (or two) modulation vectors (B, D)."""
        B, N, D = h.shape
        mods = self.modulation(c).chunk(2 if self.keys_only else 6, dim=1)
        x = modulate(self.norm1(h), mods[0], mods[1])
        heads = self.qkv(x).reshape(B, N, -1, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (None, *heads) if self.keys_only else heads
        if self.k_norm is not None:
            k = self.k_norm(k)
            q = q if q is None else self.q_norm(q)
        return (q, k, v), mods

    def finish(self, h: Tensor, out: Tensor, mods) -> Tensor:
        """The gated residuals: h (B, N, D) plus its attention output out (B, N, D), then the
        modulated MLP."""
        _, _, gate1, shift2, scale2, gate2 = mods
        h = h + gate1[:, None] * self.dropout(self.proj(out))
        return h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2))


class JointBlock(nn.Module):
    """An MMDiT block: both streams' queries attend to the image tokens and the real text
    tokens together (one softmax), then each stream finishes with its own weights.
    `recorder`, when set (report/attention.py), is called with (q, k, key mask) before
    attention: the image's queries first, then the text's (none in the last block)."""

    recorder = None  # unset: nothing is recorded and nothing is computed for it

    def __init__(self, width, heads, mlp_ratio, dropout, qk_norm, last=False):
        super().__init__()
        self.image = Stream(width, heads, mlp_ratio, dropout, qk_norm)
        self.text = Stream(width, heads, mlp_ratio, dropout, qk_norm, keys_only=last)

    def forward(self, h: Tensor, s: Tensor, c: Tensor, mask: Tensor):
        """Image tokens h (B, T, D), text tokens s (B, L, D), condition c (B, D), mask (B, L)
        -> (h, s), s None after the last block."""
        B, T, D = h.shape
        (q, k, v), mods = self.image.qkv_heads(h, c)
        (q_text, k_text, v_text), mods_text = self.text.qkv_heads(s, c)
        if q_text is not None:
            q = torch.cat([q, q_text], dim=2)  # (B, heads, T + L, D / heads)
        k, v = torch.cat([k, k_text], dim=2), torch.cat([v, v_text], dim=2)
        image_keys = torch.ones(B, T, dtype=torch.bool, device=mask.device)
        keys = torch.cat([image_keys, mask], dim=1)[:, None, None, :]  # (B, 1, 1, T + L)
        if self.recorder is not None:
            self.recorder(q, k, keys)
        out = attention(q, k, v, keys).transpose(1, 2).reshape(B, -1, D)  # (B, T [+ L], D)
        h = self.image.finish(h, out[:, :T], mods)
        s = None if q_text is None else self.text.finish(s, out[:, T:], mods_text)
        return h, s


class MMDiT(DiT):
    """DiT with SD3's joint text attention (module doc); knows no schedule.

    Args:
        in_channels, input_size, width, depth, heads, mlp_ratio, patch_size, dropout, qk_norm
            (both streams), checkpointing, out_channels: as DiT's.
        text_encoder: the run's text module (nets/text.py): cond -> (context (B, L, D_text),
            mask (B, L)); a CharEncoder is trained with the net, so checkpointed and EMA'd with it.
    """

    def __init__(self, in_channels: int, input_size: tuple[int, int], *, text_encoder, **dit):
        super().__init__(in_channels, input_size, num_classes=0, **dit)
        width, context_dim = self.patch_embed.out_features, text_encoder.context_dim
        self.context_embed = nn.Linear(context_dim, width)  # text tokens into the text stream
        # the pooled text into the condition, as SD3's pooled projection: Linear, SiLU, Linear
        self.pooled_embed = nn.Sequential(
            nn.Linear(context_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        nn.init.xavier_uniform_(self.context_embed.weight)
        nn.init.zeros_(self.context_embed.bias)
        for layer in (self.pooled_embed[0], self.pooled_embed[2]):  # as the time MLP
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.text_encoder = text_encoder  # last, so that it keeps its own initialisation

    def _make_blocks(self, depth, width, heads, mlp_ratio, dropout, qk_norm) -> nn.ModuleList:
        return nn.ModuleList(
            JointBlock(width, heads, mlp_ratio, dropout, qk_norm, last=i == depth - 1)
            for i in range(depth)
        )

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """x_t (B, C, H, W), t (B,) in [0, 1], cond (B, L) ids or (B, L, D_text) token states
        (the empty prompt is the null condition) -> (B, C_out, H, W)."""
        if cond is None:
            raise ValueError("an MMDiT needs its text condition (token ids or token states)")
        context, mask = self.text_encoder(cond)  # (B, L, D_text), (B, L)
        h = self._patch_tokens(x_t)  # (B, T, D)
        s = self.context_embed(context)  # (B, L, D)
        c = F.silu(self.time_emb(t) + self.pooled_embed(pooled(context, mask)))  # (B, D)
        for block in self.blocks:
            h, s = self._run(block, h, s, c, mask)
        return self._unpatch_tokens(h, c)


def dit_net(
    in_channels: int, input_size: tuple[int, int], num_classes: int, text_encoder, text="", **dit
) -> DiT:
    """The transformer model.dit describes: a DiT (labels or none) or, with text="joint", an
    MMDiT reading `text_encoder`'s prompts; `dit` holds DiTConfig's other fields. Messages
    start with the field's name (build.py prefixes `model.dit.`)."""
    if text not in TEXT_MODES:
        raise ConfigError(f"text={text!r} is not a text mode; choose joint (MMDiT) or leave it out")
    if text == "joint" and text_encoder is None:
        raise ConfigError(
            "text=joint reads prompts, but this run has no text: set data.text_conditional=true "
            "(captioned data) or leave model.dit.text out"
        )
    if text == "joint" and dit.get("second_time"):
        raise ConfigError(
            "text=joint (an MMDiT) has no second time input yet (model.second_time): use "
            "model.name=unet for a MeanFlow or shortcut run on text"
        )
    if text == "joint":
        return MMDiT(in_channels, input_size, text_encoder=text_encoder, **dit)
    if text_encoder is not None:
        raise ConfigError(
            "text must be joint for a run on text (a DiT has no cross-attention): set "
            "model.dit.text=joint (MMDiT)"
        )
    return DiT(in_channels, input_size, num_classes=num_classes, **dit)
