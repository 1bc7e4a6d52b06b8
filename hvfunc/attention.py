"""Attention backends behind one function type, `AttnFn`.

    attn(q, k, v, kv_len) -> o        q, k, v, o: [B, L, N, K]; kv_len: [B] int or None

Tokens are laid out [video | valid text | padding text]. `kv_len[b]` counts sample b's
valid prefix: upstream packs that prefix as one varlen sequence and the padding as a
second one, so outputs at valid positions only ever see valid keys. Every backend
gives the same outputs at valid positions (padding rows are don't-care; nothing valid
reads them). `kv_len=None` means every token is valid.

No backend builds a dense [L, L] mask: SDPA gets a [B, 1, 1, L] key mask (only when
lengths differ), varlen backends get cumulative lengths.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class AttnFn(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor | None) -> Tensor: ...


def sdpa(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor | None) -> Tensor:
    """torch SDPA (flash / memory-efficient / CPU kernels); a key mask only if lengths differ."""
    mask = None
    if kv_len is not None:
        L = k.shape[1]
        mask = (torch.arange(L, device=k.device)[None, :] < kv_len[:, None])[:, None, None, :]  # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def cu_seqlens(kv_len: Tensor | None, B: int, L: int, device: torch.device) -> Tensor:
    """Upstream's packing as cumulative boundaries [2B + 1] (int32): per sample [valid], [padding]."""
    lens = torch.full((B,), L, dtype=torch.int32, device=device) if kv_len is None else kv_len.to(torch.int32)
    ends = torch.arange(1, B + 1, dtype=torch.int32, device=device) * L
    bounds = torch.stack([ends - L + lens, ends], dim=1).flatten()
    return torch.cat([torch.zeros(1, dtype=torch.int32, device=device), bounds])


VarlenFn = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> Tensor:
    """flash_attn_varlen_func's contract on [T, N, K] tokens, one SDPA per segment (tests, CPU)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            seg = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]
            out[s:e] = F.scaled_dot_product_attention(*seg)[0].transpose(0, 1)
    return out


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> Tensor:
    from flash_attn import flash_attn_varlen_func  # optional GPU dependency

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)


def varlen(fn: VarlenFn | None = None) -> AttnFn:
    """Upstream's exact packing: the [B, L] tokens are viewed as B*L varlen tokens (no copy)."""
    fn = fn or _flash_varlen

    def attn(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor | None) -> Tensor:
        B, L, N, K = q.shape
        cu = cu_seqlens(kv_len, B, L, q.device)
        o = fn(q.reshape(B * L, N, K), k.reshape(B * L, N, K), v.reshape(B * L, N, K), cu, L)
        return o.reshape(B, L, N, K)

    return attn


BACKENDS: dict[str, Callable[[], AttnFn]] = {
    "sdpa": lambda: sdpa,
    "flash-varlen": varlen,
}


def get(name: str) -> AttnFn:
    """Backend by name, with a clear error when its package is missing. Device-specific
    backends (Ascend) live in graphs.backends, which also resolves these names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    needs = {"flash-varlen": "flash_attn"}.get(name)
    if needs and importlib.util.find_spec(needs) is None:
        raise ValueError(f"attention backend {name!r} needs the package {needs!r}, which is not installed")
    return BACKENDS[name]()
