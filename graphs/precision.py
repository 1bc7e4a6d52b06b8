"""Precision policy in one place: which dtype each leaf is computed in.

Storage (master weights, optimizer state, gradient reduction) stays fp32; sharded leaves
are cast before they are gathered (parallel.gather: half the traffic in bf16), with a
backward that returns their gradients to fp32 before the reduce-scatter. The model itself
keeps fp32 where upstream does (RMSNorm and RoPE math, the timestep sinusoid, the masked
text mean): see hvfunc.ops. Leaves matching `fp32_leaves` stay fp32 for compute too (e.g.
the modulation, the most precision-sensitive per-sample path, if a run wants it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from hvfunc.params import Params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Compute dtype of the gathered weights."""

    compute: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Compute dtype of every leaf not matched by fp32_leaves (upstream runs the DiT in bf16)."""
    fp32_leaves: str = ""
    """Regex of leaf names kept fp32 for compute (empty: none), e.g. "(_mod|modulation)\\\\.linear"."""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute]


def compute_dtypes(names, policy: Precision) -> dict[str, torch.dtype]:
    """The compute dtype of each leaf name under the policy."""
    keep = re.compile(policy.fp32_leaves) if policy.fp32_leaves else None
    return {k: torch.float32 if keep is not None and keep.search(k) else policy.dtype for k in names}


def cast(params: Params, policy: Precision) -> Params:
    """Leaves in their compute dtype (a differentiable cast: gradients come back in the storage dtype)."""
    dtypes = compute_dtypes(params, policy)
    return {k: v.to(dtypes[k]) for k, v in params.items()}
