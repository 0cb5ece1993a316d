"""Building blocks shared by the networks: sinusoidal embeddings of time and of coordinates, the
label check, and the two kernels that need a reduced-precision path on a CPU (GroupNorm and
attention)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.errors import ConfigError

REDUCED = (torch.bfloat16, torch.float16)
ATEN = torch.ops.aten


class _NCHWGroupNorm(torch.autograd.Function):
    """GroupNorm of a channels-last tensor by torch's NCHW kernels (statistics in fp32), with
    its output and its input gradient handed back channels-last: a gradient in the other layout
    would make every add it meets a slow strided one."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c = x.shape[:2]
        nchw = x.contiguous()
        y, mean, rstd = ATEN.native_group_norm(
            nchw, weight, bias, n, c, nchw[0, 0].numel(), groups, eps
        )
        ctx.save_for_backward(nchw, weight, mean, rstd)
        ctx.groups = groups
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        nchw, weight, mean, rstd = ctx.saved_tensors
        n, c = nchw.shape[:2]
        wanted = list(ctx.needs_input_grad[:3])  # x, weight, bias
        gx, gw, gb = ATEN.native_group_norm_backward(
            grad.contiguous(),
            nchw,
            mean,
            rstd,
            weight,
            n,
            c,
            nchw[0, 0].numel(),
            ctx.groups,
            wanted,
        )
        if gx is not None:
            gx = gx.contiguous(memory_format=torch.channels_last)
        return gx, gw, gb, None, None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (the same parameters, state and fp32 results) that stays fast in bf16 on a
    CPU. Torch's CPU kernels for channels-last bf16 input run several times slower than for the
    same tensor in NCHW, which helped make autocast training slower than fp32 (issue 18). A
    channels-last reduced-precision input with affine parameters is therefore normalised by the
    NCHW kernels (_NCHWGroupNorm); every other input takes nn.GroupNorm's own path.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype in REDUCED
            and x.dim() == 4
            and self.affine
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            return _NCHWGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims (q (..., T, d), k, v (..., L, d); mask
    broadcastable to (..., T, L), True = attend) -> (..., T, d).

    torch's scaled_dot_product_attention everywhere except for bf16/fp16 on a CPU, where its
    flash kernel is slow (its backward 15x the fp32 one at head dim 16) and the plain product
    runs on the matrix units: the scores are multiplied in the input's precision and the softmax
    taken in fp32. Under torch.func's transforms (MeanFlow's forward-mode JVP) the plain product
    too: SDPA's CPU flash kernel (and the fused GPU ones) have no forward-mode rule.
    """
    transformed = torch._C._functorch.is_functorch_wrapped_tensor(q)
    if not transformed and (q.device.type != "cpu" or q.dtype not in REDUCED):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


def check_labels(y: Tensor, num_classes: int) -> None:
    """Labels in [0, num_classes] (num_classes = null). On the CPU a clear error; on a GPU a
    device-side assert, because reading the answer back would stall every training step."""
    valid = ((y >= 0) & (y <= num_classes)).all()
    message = f"labels out of range [0, {num_classes}) (or {num_classes}, the null label)"
    if y.device.type != "cpu":
        torch._assert_async(valid, message)
    elif not bool(valid):
        raise ConfigError(f"{message}: got min {int(y.min())}, max {int(y.max())}")


def sinusoidal_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0, shift: int = 0
) -> Tensor:
    """Transformer-style embedding of t (B,) in [0, 1] -> (B, dim) (Vaswani et al. 2017, Sec. 3.5).

    t is multiplied by `scale` first so that t in [0, 1] spans the range DDPM's integer steps did.
    Frequency k of the dim // 2 is max_period^(-k / (dim // 2 - shift)): shift 0 is DDPM's and
    facebookresearch/DiT's spacing, shift 1 diffusers' DiT's (its downscale_freq_shift).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, device=t.device, dtype=torch.float32)
        / (half - shift)
    )
    args = (t.float() * scale)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a 2-layer MLP (DDPM's time embedding): (B,) -> (B, dim)."""

    def __init__(
        self, dim: int, sinusoid_dim: int | None = None, shift: int = 0, scale: float = 1000.0
    ):
        super().__init__()
        self.sinusoid_dim, self.shift = sinusoid_dim or dim, shift  # shift: sinusoidal_embedding's
        self.scale = scale  # sinusoidal_embedding's: t in [0, 1] times `scale`
        self.mlp = nn.Sequential(nn.Linear(self.sinusoid_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(
            sinusoidal_embedding(t, self.sinusoid_dim, scale=self.scale, shift=self.shift)
        )


class SecondTime(nn.Module):
    """The optional second time t2 (MeanFlow's interval t - r, a shortcut model's step size d),
    embedded like t by its own `TimeEmbedding` and added to t's embedding. A net built with
    second_time=False has no such module and refuses t2; one built with it reads t2 = None as 0
    (the instantaneous velocity: flow matching)."""

    def __init__(
        self, dim: int, sinusoid_dim: int | None = None, shift: int = 0, scale: float = 1000.0
    ):
        super().__init__()
        self.emb = TimeEmbedding(dim, sinusoid_dim, shift, scale)

    def forward(self, t2: Tensor | None, like: Tensor) -> Tensor:
        """The embedding (B, dim) of t2 (B,) or of zeros shaped like t (`like`) when t2 is None."""
        return self.emb(torch.zeros_like(like) if t2 is None else t2)


def add_second_time(emb: Tensor, second: SecondTime | None, t: Tensor, t2: Tensor | None) -> Tensor:
    """emb (t's embedding) plus t2's when the net has a second time input; t2 given to a net
    without one is refused (ValueError; losses check first and say which config flag)."""
    if second is None:
        if t2 is not None:
            raise ValueError("t2 given to a net built without a second time input (second_time)")
        return emb
    return emb + second(t2, t)


class FourierFeatures(nn.Module):
    """Coordinates x (B, D) -> [x, sin(2^k pi x), cos(2^k pi x)] for k = 0..K-1 (B, D (1 + 2K)).

    Plain MLPs are biased towards smooth functions (spectral bias); these features let them draw
    sharp edges such as a checkerboard's (Tancik et al. 2020, "Fourier features let networks learn
    high frequency functions").
    """

    def __init__(self, num_frequencies: int):
        super().__init__()
        self.register_buffer(
            "freqs", math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
        )

    def out_dim(self, in_dim: int) -> int:
        return in_dim * (1 + 2 * len(self.freqs))

    def forward(self, x: Tensor) -> Tensor:
        args = (x[..., None] * self.freqs).flatten(1)  # (B, D K)
        return torch.cat([x, torch.sin(args), torch.cos(args)], dim=1)
