"""Numerical primitives of the DiT: linears (with unmerged LoRA adapters when the tree holds
them), norms, modulation, timestep features, 3D RoPE.

Shapes: B batch, L tokens, N heads, K head dim, D width, r LoRA rank.
Precision: RMSNorm and RoPE compute in fp32 and cast back (as upstream does); the
timestep sinusoid is fp32 and cast to the weight dtype by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_down(x: Tensor, p: dict[str, Tensor], stem: str) -> Tensor | None:
    """A LoRA adapter's down-projection u = x @ A.T [.., r] when the tree holds `stem.lora_A`, else None."""
    A = p.get(f"{stem}.lora_A")
    return None if A is None else F.linear(x.to(A.dtype), A)


def lora_up(y: Tensor, u: Tensor | None, p: dict[str, Tensor], stem: str) -> Tensor:
    """y + u @ B.T for `stem.lora_B` [out, r] (y unchanged without an adapter).

    B is taken as given: the scale alpha / r is folded into the compute leaf of B by whoever
    builds the compute tree (hvfunc.lora.scaled), so the primitives carry no per-module constant."""
    B = p.get(f"{stem}.lora_B")
    if u is None or B is None:
        return y
    return y + F.linear(u.to(B.dtype), B).to(y.dtype)


def linear(x: Tensor, p: dict[str, Tensor], name: str, u: Tensor | None = None) -> Tensor:
    """`x @ W.T + b` for leaves `name.weight` / `name.bias` (fused q|k|v leaves: `qkv`), plus the
    adapter `name.lora_B @ (name.lora_A @ x)` when the tree holds one; `u`: a down-projection
    computed already (an A shared with another leaf, as linear1's).

    The input is cast to the weight's dtype: a precision policy may keep some leaves fp32."""
    w, b = p[f"{name}.weight"], p.get(f"{name}.bias")
    y = F.linear(x.to(w.dtype), w, b)
    return lora_up(y, lora_down(x, p, name) if u is None else u, p, name)


class _QKV(torch.autograd.Function):
    """q, k, v [B, L, N*K] from the fused [3, N*K, D] weight, as three GEMMs into three
    buffers: views of one [B, L, 3*N*K] output would keep all of it alive while the qk
    norms hold q and k for the backward (v's third too). The backward takes the three
    gradients one at a time (dx accumulates, dW fills its thirds in place), so no
    [B, L, 3*N*K] gradient or [3, N*K, D]-per-part weight-gradient buffer is assembled."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(F.linear(x, w[i], None if b is None else b[i]) for i in range(3))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, b = inputs
        # x is needed only for the weight gradient: a frozen weight (LoRA) keeps no copy of it
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        ctx.has_bias, ctx.x_shape = b is not None, x.shape

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, w = ctx.saved_tensors
        x2 = None if x is None else x.reshape(-1, x.shape[-1])
        gx = None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        gb = w.new_zeros(w.shape[:2]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        for i, g in enumerate(grads):
            if g is None:
                continue
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[0]:  # accumulated in place: one [B*L, D] buffer
                gx = g2 @ w[i] if gx is None else gx.addmm_(g2, w[i])
            if gw is not None:
                gw[i] = g2.t() @ x2
            if gb is not None:
                gb[i] = g2.sum(0)
        return (None if gx is None else gx.view(ctx.x_shape)), gw, gb


def qkv(x: Tensor, p: dict[str, Tensor], name: str, head_dim: int,
        u: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, L, N, K] of the fused `name` ([3, N*K, D] weight, N local under tp), plus the
    adapter (one A [r, D], B [3, N*K, r]: each part adds u @ B[i].T); `u` as in `linear`."""
    w, b = p[f"{name}.weight"], p.get(f"{name}.bias")
    q, k, v = _QKV.apply(x.to(w.dtype), w, b)
    if (B := p.get(f"{name}.lora_B")) is not None:
        u = lora_down(x, p, name) if u is None else u
        if u is not None:
            q, k, v = (t + F.linear(u.to(B.dtype), B[i]).to(t.dtype) for i, t in enumerate((q, k, v)))
    return tuple(t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))


def matmul(x: Tensor, w: Tensor) -> Tensor:
    """`x @ w.T` in w's dtype (row-parallel matmuls whose bias is added after the tp reduction)."""
    return F.linear(x.to(w.dtype), w)


def layer_norm(x: Tensor, eps: float = 1e-6, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Upstream RMSNorm: normalise in fp32, cast back to x's dtype, then scale."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.type_as(x) * weight


def modulate(x_BLD: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    return x_BLD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


def gate(x_BLD: Tensor, y_BLD: Tensor, gate_BD: Tensor) -> Tensor:
    """Gated residual `x + gate * y` (no tanh, as upstream)."""
    return x_BLD + y_BLD * gate_BD.unsqueeze(1)


def split_first(fn: Callable[..., Tensor], first: int, tokens: tuple[Tensor, ...],
                mod: tuple[Tensor, ...], mod_first: tuple[Tensor, ...] | None) -> Tensor:
    """fn(*tokens, *mod), except that the leading `first` tokens use `mod_first`.

    I2V token_replace: latent frame 0's tokens (the clean image) get the modulation of
    t=0. `first` counts those tokens in this rank's slice (0 when it holds none).
    """
    if mod_first is None or first == 0:
        return fn(*tokens, *mod)
    head = fn(*(t[:, :first] for t in tokens), *mod_first)
    tail = fn(*(t[:, first:] for t in tokens), *mod)
    return torch.cat([head, tail], dim=1)


def timestep_embedding(t_B: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoid [B, dim] in fp32, laid out [cos, sin] (upstream's TimestepEmbedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def mlp_embed(x: Tensor, p: dict[str, Tensor], first: str, second: str) -> Tensor:
    """Linear -> SiLU -> Linear (TimestepEmbedder, MLPEmbedder, TextProjection)."""
    return linear(F.silu(linear(x, p, first)), p, second)


def rope_freqs(sizes: tuple[int, int, int], dims: tuple[int, int, int], theta: float,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """3D RoPE tables cos, sin [L, K/2] (fp32) for a (t, h, w) token grid in t-h-w order.

    Axis i uses dims[i] channels: freqs 1/theta^(arange(0, d, 2)/d) times the grid
    position; the axes are concatenated (t first), one angle per channel pair.
    """
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in sizes), indexing="ij")
    angles = []
    for pos, d in zip(grids, dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device)[: d // 2] / d)
        angles.append(pos.reshape(-1, 1) * freqs[None])
    ang = torch.cat(angles, dim=1)
    return ang.cos(), ang.sin()


def apply_rope(x_BLNK: Tensor, cos_LH: Tensor, sin_LH: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x0, x1) -> (x0 c - x1 s, x0 s + x1 c) in fp32.

    The interleaved (complex) convention, not NeoX's half split. H = K / 2.
    """
    B, L, N, K = x_BLNK.shape
    x = x_BLNK.float().reshape(B, L, N, K // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos_LH[:, None], sin_LH[:, None]  # [L, 1, H] broadcasts over B and N
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.reshape(B, L, N, K).type_as(x_BLNK)
