"""DiT, a transformer on patches: net(x_t (B, C, H, W), t (B,), y (B,) | None) -> (B, C, H, W).

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (Sec. 3.2, Fig. 3): x_t is cut
into p x p patches, each patch a token (a linear map of its p * p * C values) plus a fixed 2-D
sin-cos position; a stack of transformer blocks follows, each modulated by adaLN-Zero from the
time embedding plus the label embedding; a final adaLN layer maps every token back to its patch.

adaLN-Zero: every block regresses shift, scale and gate vectors from the condition c (one Linear
gives all six: attention's and the MLP's), normalises its tokens without learned affine weights,
applies (1 + scale) and shift, and multiplies the attention's or MLP's output by the gate before
the residual add. That Linear starts at zero, so the gates are zero and every block is exactly
the identity at init, as is the last layer's output (zero too): the untrained net is the
identity map from the patch embedding to the output layer and predicts 0, and each block learns
to add its part on top. The paper found this identity start (in the spirit of zero-initialising
each residual branch's last layer, Goyal et al. 2017) clearly better than cross-attention,
in-context tokens or adaLN without the zero start (Fig. 5).

Choices beyond the paper, each for a reason:
- the time sinusoid uses diffusers' frequency spacing (sinusoidal_embedding's shift=1), so a
  difflab DiT maps onto diffusers' DiTTransformer2DModel exactly (share/dit_keys.py): no linear
  layer can absorb a change of frequencies;
- optional RMS normalisation of queries and keys per head (`qk_norm`; SD3, Esser et al. 2024,
  Sec. 5.3.2), which keeps attention logits bounded in long or bf16 training;
- any patch size dividing the input grid, rectangular grids, and dropout after the attention
  projection and inside the MLP (where diffusers puts it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from difflab.errors import ConfigError
from difflab.nets.layers import SecondTime, TimeEmbedding, add_second_time, attention, check_labels

TIME_FREQUENCIES = 256  # sinusoid channels of t before the time MLP (DiT's and diffusers')
NORM_EPS = 1e-6  # every LayerNorm of DiT


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H / p)(W / p), p p C): tokens in row-major patch order, each patch's
    values ordered (row in patch, column in patch, channel), the layout DiT's output uses."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: Tensor, p: int, grid: tuple[int, int]) -> Tensor:
    """(B, h w, p p C) -> (B, C, h p, w p): the inverse of patchify for a grid of (h, w) patches."""
    B, _, D = tokens.shape
    h, w = grid
    x = tokens.reshape(B, h, w, p, p, D // (p * p))  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, h * p, w * p)


def sincos_positions(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D positions (h w, dim) of a grid of (h, w) tokens in row-major order (MAE's, as
    DiT uses): the first dim / 2 channels encode the token's column, the other half its row,
    each as [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim / 4)), k < dim / 4.
    Computed in float64 and rounded once, as diffusers does."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )

    def encode(pos: Tensor) -> Tensor:  # (h w,) -> (h w, dim / 2)
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: normalised tokens h (B, T, D) scaled by 1 + scale and shifted, per example (B, D)."""
    return h * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that casts its weight to a bf16 / fp16 input's type: with an fp32 weight torch
    leaves its fused kernel for a slow one."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and torch's SDPA (through
    layers.attention, which keeps bf16 on a CPU fast); optional RMS q/k norm per head.
    `recorder`, when set (report/attention.py), is called with (q, k, None) before attention."""

    recorder = None  # unset: nothing is recorded and nothing is computed for it

    def __init__(self, width: int, heads: int, dropout: float, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: all queries, then keys, then values
        self.q_norm = RMSNorm(width // heads, eps=NORM_EPS) if qk_norm else None
        self.k_norm = RMSNorm(width // heads, eps=NORM_EPS) if qk_norm else None
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        B, T, D = h.shape
        qkv = self.qkv(h).reshape(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, D / heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.recorder is not None:
            self.recorder(q, k, None)
        out = attention(q, k, v)  # (B, heads, T, D / heads)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(B, T, D)))


def mlp(width: int, hidden: int, dropout: float) -> nn.Sequential:
    """A transformer's MLP, (..., width) -> (..., width): GELU (tanh form, as DiT) between two
    Linears, dropout on the hidden units."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.GELU(approximate="tanh"),
        nn.Dropout(dropout),
        nn.Linear(hidden, width),
    )


class DiTBlock(nn.Module):
    """Attention then an MLP, each pre-normalised, modulated and gated by adaLN-Zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, qk_norm: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.attn = SelfAttention(width, heads, dropout, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = mlp(width, hidden, dropout)
        # One Linear regresses all six vectors (shift, scale, gate for attention, then for the
        # MLP). It starts at zero: gates 0, so the block starts as the identity (module doc).
        self.modulation = nn.Linear(width, 6 * width)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        """h (B, T, D) tokens, c (B, D) the condition after SiLU -> (B, T, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        h = h + gate1[:, None] * self.attn(modulate(self.norm1(h), shift1, scale1))
        return h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2))


def _validate(grid_size, width, depth, heads, mlp_ratio, patch_size, dropout):
    """ConfigError for arguments that cannot be built; each message starts with the argument's
    name (build.py prefixes `model.dit.`)."""
    sizes = {"width": width, "depth": depth, "heads": heads, "patch_size": patch_size}
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if width % heads:
        raise ConfigError(
            f"width={width} is not divisible by heads={heads}; choose a width that is a "
            f"multiple of the heads (e.g. {heads * max(1, round(width / heads / 4)) * 4})"
        )
    if width % 4:
        raise ConfigError(f"width={width} must be a multiple of 4 (the 2-D sin-cos positions)")
    if not mlp_ratio > 0 or not 0.0 <= dropout < 1.0:
        raise ConfigError(
            f"mlp_ratio must be > 0 and dropout in [0, 1), got {mlp_ratio}, {dropout}"
        )
    H, W = grid_size
    if H % patch_size or W % patch_size:
        fits = [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]
        raise ConfigError(
            f"patch_size={patch_size} does not divide the {H}x{W} input grid (the image, or "
            f"a latent's grid); choose one of {', '.join(map(str, fits))}"
        )


class DiT(nn.Module):
    """A class-conditional Diffusion Transformer (Peebles & Xie 2023); knows no schedule.

    Args:
        in_channels: channels C of x_t (image or latent).
        input_size: (H, W) of x_t; the positions are fixed for this grid.
        width: token width D (DiT's hidden size); a multiple of 4 and of `heads`.
        depth: transformer blocks.
        heads: attention heads (D / heads channels each).
        mlp_ratio: the MLP's hidden width is int(mlp_ratio * D).
        patch_size: p; must divide H and W. T = (H / p)(W / p) tokens.
        dropout: after each attention projection and inside each MLP.
        qk_norm: RMS-normalise queries and keys per head (SD3).
        num_classes: 0 = unconditional; > 0 adds a label embedding with num_classes + 1 rows,
            index num_classes being the null label used when y is None (classifier-free
            guidance trains one net for both).
        checkpointing: recompute each block's activations in the backward pass (Chen et al.
            2016): much less memory for about a third more compute; training only.
        out_channels: channels of the output (default in_channels).
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: tuple[int, int] = (32, 32),
        width: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: int = 2,
        dropout: float = 0.0,
        qk_norm: bool = False,
        num_classes: int = 0,
        checkpointing: bool = False,
        out_channels: int | None = None,
        second_time: bool = False,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        _validate(input_size, width, depth, heads, mlp_ratio, patch_size, dropout)
        p, out_channels = patch_size, out_channels or in_channels
        self.patch_size, self.num_classes, self.checkpointing = p, num_classes, checkpointing
        self.grid = (input_size[0] // p, input_size[1] // p)
        self.patch_embed = nn.Linear(p * p * in_channels, width)  # DiT's strided conv, as a Linear
        self.register_buffer("positions", sincos_positions(width, self.grid), persistent=False)
        self.time_emb = TimeEmbedding(width, TIME_FREQUENCIES, shift=1, scale=time_scale)
        self.label_emb = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.blocks = self._make_blocks(depth, width, heads, mlp_ratio, dropout, qk_norm)
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.out_modulation = nn.Linear(width, 2 * width)  # shift, scale of the final layer
        self.out = nn.Linear(width, p * p * out_channels)
        # t2 (MeanFlow's t - r, a shortcut's d) beside t; made last, so nets without it are the same
        self.second_time = second_time
        self.time2_emb = None
        self._initialise()
        if second_time:  # after the rest is drawn: the other weights are those of a plain DiT
            self.time2_emb = SecondTime(width, TIME_FREQUENCIES, shift=1, scale=time_scale)
            for layer in (self.time2_emb.emb.mlp[0], self.time2_emb.emb.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def _initialise(self) -> None:
        """DiT's initialisation: Xavier-uniform Linears with zero biases (the patch embedding
        too, as its conv flattened), N(0, 0.02) label and time-MLP weights, and zeros for every
        adaLN modulation and the output Linear (adaLN-Zero: identity blocks, a zero output)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.label_emb is not None:
            nn.init.normal_(self.label_emb.weight, std=0.02)
        for layer in (self.time_emb.mlp[0], self.time_emb.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [m for name, m in self.named_modules() if name.endswith("modulation")]
        for layer in [*zeroed, self.out]:  # every block's modulation, and the final layer's
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _make_blocks(self, depth, width, heads, mlp_ratio, dropout, qk_norm) -> nn.ModuleList:
        return nn.ModuleList(
            DiTBlock(width, heads, mlp_ratio, dropout, qk_norm) for _ in range(depth)
        )

    def _condition(
        self, t: Tensor, y: Tensor | None, batch: int, t2: Tensor | None = None
    ) -> Tensor:
        """c = time embedding (t and t2) + label embedding (B, D); y None: the null label."""
        emb = add_second_time(self.time_emb(t), self.time2_emb, t, t2)
        if self.label_emb is None:
            if y is not None:
                raise ValueError("y given to an unconditional net (num_classes=0); pass y=None")
            return emb
        if y is None:
            y = torch.full((batch,), self.num_classes, device=t.device, dtype=torch.long)
        else:
            check_labels(y, self.num_classes)
        return emb + self.label_emb(y)

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, *, t2: Tensor | None = None
    ) -> Tensor:
        """x_t (B, C, H, W), t (B,) in [0, 1], y (B,) int labels (num_classes = null) or None,
        t2 (B,) the second time (nets built with second_time) -> (B, C_out, H, W)."""
        h = self._patch_tokens(x_t)  # (B, T, D)
        c = F.silu(self._condition(t, y, x_t.shape[0], t2))  # (B, D), SiLU once for every block
        for block in self.blocks:
            h = self._run(block, h, c)
        return self._unpatch_tokens(h, c)

    def _patch_tokens(self, x_t: Tensor) -> Tensor:
        """x_t (B, C, H, W) -> its patches embedded, plus their positions (B, T, D)."""
        p = self.patch_size
        grid = (x_t.shape[-2] // p, x_t.shape[-1] // p)
        if grid != self.grid or x_t.shape[-2] % p or x_t.shape[-1] % p:
            size = f"{self.grid[0] * p}x{self.grid[1] * p}"
            raise ValueError(f"this DiT was built for {size} inputs, got {tuple(x_t.shape[-2:])}")
        h = self.patch_embed(patchify(x_t, p))  # (B, T, D)
        return h + self.positions.to(h.dtype)

    def _run(self, block: nn.Module, *args):
        """block(*args), recomputed in the backward pass when checkpointing a training step."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _unpatch_tokens(self, h: Tensor, c: Tensor) -> Tensor:
        """The final adaLN layer: tokens h (B, T, D), condition c (B, D) -> (B, C_out, H, W)."""
        shift, scale = self.out_modulation(c).chunk(2, dim=1)
        h = self.out(modulate(self.norm_out(h), shift, scale))  # (B, T, p p C_out)
        return unpatchify(h, self.patch_size, self.grid)
