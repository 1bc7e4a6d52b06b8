"""fp8 weight storage: block linears stored as float8_e4m3fn with an fp32 scale per output
row, and the `prepare` stage that upcasts them to the compute dtype (weight-only: the
matmuls stay in the compute dtype). The one opt-in approximation of the prepare chain.

What is stored in fp8: the 2-D / 3-D `.weight` leaves of double and single blocks (q|k|v
[3, N*K, D], proj, fc1/fc2, modulation, linear1/linear2 [D_out, D_in]). Norms (1-D),
biases, embedders, the token refiner and the final layer stay in the compute dtype.
Each quantized `<stem>.weight` gets a sibling leaf `<stem>.weight_scale` [..., D_out, 1]
fp32, the row's amax / 448 (448: e4m3fn's largest finite value); `dequantize` consumes it.

Error bound (per element, round-to-nearest into e4m3: 3 mantissa bits). With s the row's
scale, x = w / s, |x| <= 448 by construction:
  normal range |x| >= 2^-6:    |x - q(x)| <= 2^-4 |x|   (half an ulp, 2^-3 apart)
  subnormal range |x| < 2^-6:  |x - q(x)| <= 2^-10      (half the spacing 2^-9)
so |w - s q(w / s)| <= 2^-4 |w| + s 2^-10. Upcasting s q to a compute dtype with unit
roundoff u (fp32 2^-24, bf16 2^-8) adds u |s q| <= u (1 + 2^-4) |w| + u s 2^-10. For a
linear y_j = sum_k W_jk x_k the weight error alone moves the output by at most
  |y_j - y'_j| <= d sum_k |W_jk| |x_k| + e_j sum_k |x_k|,
  d = 2^-4 + u (1 + 2^-4),  e_j = (1 + u) s_j 2^-10          (`linear_bound`; tested)
(the matmul's own rounding in the compute dtype comes on top, as it does for any weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hvfunc.params import Params

FP8 = getattr(torch, "float8_e4m3fn", None)  # torch >= 2.1 on every backend we use (2.11-2.13 here)
E4M3_MAX = 448.0
SCALE = "_scale"  # `<stem>.weight` -> `<stem>.weight_scale`
REL = 2.0**-4  # half an ulp of e4m3 relative to a normal value
FLOOR = 2.0**-10  # half the subnormal spacing 2^-9, in units of the row scale
BLOCKS = ("double_blocks.", "single_blocks.")


def require() -> None:
    if FP8 is None:
        raise ValueError(f"--memory.fp8-weights needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")


def is_block_linear(name: str, v: Tensor) -> bool:
    """A weight stored in fp8: a 2-D / 3-D `.weight` of a double or single block."""
    return name.startswith(BLOCKS) and name.endswith(".weight") and v.ndim in (2, 3)


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., D_out, D_in] -> (e4m3 values, fp32 scale [..., D_out, 1] = row amax / 448; 1 for zero rows)."""
    require()
    w32 = w.float()
    amax = w32.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (w32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale  # clamp: amax / scale may round above 448


def dequantize_leaf(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * scale).to(dtype)


def quantize_tree(params: Params) -> Params:
    """The tree with its block linears in fp8 (+ their scale leaves); every other leaf as it is."""
    out = {}
    for k, v in params.items():
        if is_block_linear(k, v):
            out[k], out[k + SCALE] = quantize(v)
        else:
            out[k] = v
    return out


def dequantize(params: Params, dtype: torch.dtype | dict[str, torch.dtype]) -> Params:
    """The prepare stage: fp8 leaves with a scale -> `dtype` (or dtype[name]: training's per-leaf
    compute dtypes); scale leaves dropped (traceable)."""
    def to(k: str) -> torch.dtype:
        return dtype[k] if isinstance(dtype, dict) else dtype

    return {k: dequantize_leaf(v, params[k + SCALE], to(k)) if k + SCALE in params else v
            for k, v in params.items() if not k.endswith(".weight" + SCALE)}


def dequantizer(dtype: torch.dtype):
    """`dequantize` as a one-argument prepare (graphs.blocks.make_blocks(prepare=...))."""
    return lambda p: dequantize(p, dtype)


def linear_bound(w: Tensor, scale: Tensor, x: Tensor, u: float) -> Tensor:
    """Per output, the bound of the module docstring on |W x - deq(q(W)) x| (fp64; x [..., D_in],
    W [..., D_out, D_in] -> [..., D_out], batch dims of W first)."""
    d = REL + u * (1 + REL)
    e = (1 + u) * scale.double().squeeze(-1).unsqueeze(-2) * FLOOR  # [..., 1, D_out]
    xa = x.double().abs()
    return d * xa @ w.double().abs().transpose(-1, -2) + e * xa.sum(-1, keepdim=True)
