"""Parameter specs: one `ParamSpec` per leaf, the single source of truth.

A param tree is a flat `dict[str, Tensor]` with dotted keys. Its spec says each leaf's
shape, the logical axis of every dim (what `parallel/` maps to mesh placements) and how
to initialise it. `init` materialises a tree, `abstract` builds it on the meta device
(plan the 13B model with no memory), `sub` cuts out one block's leaves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Params = dict[str, Tensor]

# Logical axes (a dim's meaning, used by sharding plans):
#   embed   model width D            heads  N*K (q/k/v/o features, heads contiguous)
#   qkv     the 3 of fused q|k|v     mlp    MLP hidden M
#   mod     modulation outputs       head_dim K (qk norm weights)
#   text/pooled/freq/channels/out    input or output widths that are never sharded


@dataclass(frozen=True)
class Init:
    """How a leaf starts: zeros, ones, normal(0, scale) or uniform(-scale, scale)."""

    kind: Literal["zeros", "ones", "normal", "uniform"]
    scale: float = 0.0


ZEROS, ONES = Init("zeros"), Init("ones")


def linear_default(fan_in: int) -> Init:
    """torch.nn.Linear's default (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)), also its bias."""
    return Init("uniform", 1.0 / math.sqrt(fan_in))


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Init

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


Spec = dict[str, ParamSpec]


def linear_spec(prefix: str, d_out: int, d_in: int, axes: tuple[str | None, str | None], *,
                bias: bool = True, init: Init | None = None, bias_init: Init | None = None) -> Spec:
    """Specs of one linear layer `prefix.weight` [d_out, d_in] (+ `prefix.bias` [d_out])."""
    out = {f"{prefix}.weight": ParamSpec((d_out, d_in), axes, init or linear_default(d_in))}
    if bias:
        out[f"{prefix}.bias"] = ParamSpec((d_out,), axes[:1], bias_init or init or linear_default(d_in))
    return out


def init(spec: Spec, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> Params:
    """Materialise a tree from its spec, leaf by leaf in spec order (deterministic per generator)."""
    return {k: t.to(device=device, dtype=dtype) for k, t in init_leaves(spec, generator=generator)}


def init_leaves(spec: Spec, *, generator: torch.Generator | None = None) -> Iterator[tuple[str, Tensor]]:
    """(key, fp32 CPU leaf) in spec order, the values of `init`, one leaf alive at a time
    (sharded training keeps only its shard of each: no rank ever holds the whole model)."""
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    for key, s in spec.items():
        t = torch.empty(s.shape, dtype=torch.float32)  # draw in fp32 on CPU: same values on every device
        if s.init.kind == "zeros":
            t.zero_()
        elif s.init.kind == "ones":
            t.fill_(1.0)
        elif s.init.kind == "normal":
            t.normal_(0.0, s.init.scale, generator=generator)
        elif s.init.kind == "uniform":
            t.uniform_(-s.init.scale, s.init.scale, generator=generator)
        else:
            raise ValueError(f"{key}: unknown init kind {s.init.kind!r}")
        yield key, t


def abstract(spec: Spec, *, dtype: torch.dtype = torch.bfloat16) -> Params:
    """The tree on the meta device: shapes and dtypes, no storage."""
    return {k: torch.empty(s.shape, dtype=dtype, device="meta") for k, s in spec.items()}


def count(tree: Spec | Params) -> int:
    """Number of scalar parameters in a spec or a tree."""
    return sum(math.prod(v.shape) for v in tree.values())


def sub(params: Params, prefix: str) -> Params:
    """Leaves under `prefix` (e.g. "double_blocks.3."), with the prefix stripped."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def check_tree(params: Params, spec: Spec, *, what: str = "params") -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped leaf."""
    missing = sorted(set(spec) - set(params))
    unexpected = sorted(set(params) - set(spec))
    shapes = sorted(f"{k}: got {tuple(params[k].shape)}, expected {spec[k].shape}"
                    for k in set(spec) & set(params) if tuple(params[k].shape) != spec[k].shape)
    if missing or unexpected or shapes:
        lines = [f"{what} do not match the model spec:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise ValueError("\n".join(lines))
