"""Sharding plan: logical axes of each leaf -> DTensor placements on the storage mesh.

Storage mesh axes (dp_replicate, fsdp, tp):
  dp_replicate  Replicate (HSDP replicas)
  tp            Shard(d) where d is the "heads" or "mlp" axis of a double/single block leaf
                (q|k|v and fc1/linear1 column-parallel, proj/fc2/linear2 row-parallel):
                a compute split. Every other leaf (modulation - a quarter of the model -,
                refiner, embedders, norms, row-parallel biases) is computed whole on each
                tp rank but *stored* sharded over tp on a dim fsdp does not use, like a
                data axis, so tp ranks do not each keep a full copy with its AdamW state
  fsdp          Shard on the largest remaining dim (even split preferred); tiny leaves Replicate
Gathering for compute keeps the tp compute splits and replicates everything else;
gradients come back as Partial over the data axes (each rank's loss is a local sum over
the global count), so the backward of the gather is the FSDP reduce-scatter / HSDP
all-reduce. Over tp a stored-only shard's gradient is whole and equal on every tp rank
(the backward is a slice) unless the leaf's uses differ across tp ranks (Partial below).
"""

from __future__ import annotations

import re

from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor

from hvfunc.params import ParamSpec, Params, Spec
from parallel.mesh import Meshes

DATA_AXES = ("dp_replicate", "fsdp")
TP_AXES = ("heads", "mlp")
NEVER_SHARDED = ("lora",)  # a LoRA rank r: tiny, and every rank needs all of it for B(A x)
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.\d+\.")
# tp-replicated leaves whose uses differ across tp ranks: per-head norm weights see only
# this rank's heads, so their gradients are partial sums over tp. With sequence
# parallelism also every leaf that acts on split tokens outside the tp regions: the
# modulation of split streams, the final layer, biases added after a reduce-scatter.
# LoRA: the whole (tp-replicated) half of an adapter on a tp-split matmul sees only this rank's
# heads / MLP columns: A of a column-parallel layer, B of a row-parallel one.
_LORA_TP = (r"(^|\.)(img_attn_qkv|txt_attn_qkv|img_mlp\.fc1|txt_mlp\.fc1|linear1)\.lora_A$|"
            r"(^|\.)(img_attn_proj|txt_attn_proj|img_mlp\.fc2|txt_mlp\.fc2|linear2)\.lora_B$")
_TP_PARTIAL = re.compile(r"(q_norm|k_norm)\.weight$|" + _LORA_TP)
_SP_PARTIAL = re.compile(r"(q_norm|k_norm)\.weight$|(^|\.)(img_mod|modulation)\.linear\.|^final_layer\.|"
                         r"(^|\.)(img_attn_proj|img_mlp\.fc2|linear2)\.bias$|" + _LORA_TP)


def tp_dim(key: str, s: ParamSpec) -> int | None:
    """The dim split over tp, or None (only double/single block leaves are tp-sharded)."""
    if not _BLOCK.match(key):
        return None
    return next((d for d, a in enumerate(s.axes) if a in TP_AXES), None)


def _storage_dim(local: list[int], n: int, skip: int | None, axes: tuple[str | None, ...]) -> int | None:
    """The dim to shard n ways for storage: the largest one (an even split preferred) other than
    skip and the NEVER_SHARDED axes."""
    if n == 1:
        return None
    cands = [d for d in range(len(local)) if d != skip and local[d] >= n and axes[d] not in NEVER_SHARDED]
    even = [d for d in cands if local[d] % n == 0]
    return max(even or cands, key=lambda d: local[d], default=None)


def placements(key: str, s: ParamSpec, meshes: Meshes) -> tuple[Placement, ...]:
    fsdp, tp = meshes.size("fsdp"), meshes.size("tp")
    td = tp_dim(key, s) if tp > 1 else None
    local = [n // tp if d == td else n for d, n in enumerate(s.shape)]
    fd = _storage_dim(local, fsdp, td, s.axes)
    if td is None:  # not split for compute: store it split over tp anyway (another dim than fsdp's)
        td = _storage_dim(local, tp, fd, s.axes)
    return (Replicate(), Shard(fd) if fd is not None else Replicate(), Shard(td) if td is not None else Replicate())


def plan(spec: Spec, meshes: Meshes) -> dict[str, tuple[Placement, ...]]:
    return {k: placements(k, s, meshes) for k, s in spec.items()}


def tp_split(spec: Spec) -> frozenset[str]:
    """Block leaves whose tp shard is a compute split (kept split when gathered), named
    within their block ("img_attn_qkv.weight"): block functions see sub-trees."""
    return frozenset(_BLOCK.sub("", k) for k, s in spec.items() if tp_dim(k, s) is not None)


def shard(params: Params, plan_: dict[str, tuple[Placement, ...]], meshes: Meshes) -> Params:
    """Full tensors (identical on every rank) -> DTensors; each rank keeps its own shard, no comm."""
    return {k: distribute_tensor(v, meshes.storage, plan_[k], src_data_rank=None) for k, v in params.items()}


def gather_placements(name: str, leaf: DTensor, *, split: bool,
                      sp: bool = False) -> tuple[list[Placement], list[Placement]]:
    """(compute, gradient) placements of a leaf per storage mesh axis: replicated over the
    data axes with partial-sum gradients; over tp kept split if `split` (a tp compute split,
    see tp_split), else whole, its gradient whole or partial (_TP_PARTIAL / _SP_PARTIAL)."""
    compute, grads = [], []
    for a, p in zip(leaf.device_mesh.mesh_dim_names, leaf.placements):
        if a in DATA_AXES:
            compute.append(Replicate())
            grads.append(Partial())
        elif split:
            compute.append(p)
            grads.append(p)
        else:
            compute.append(Replicate())
            grads.append(Partial() if (_SP_PARTIAL if sp else _TP_PARTIAL).search(name) else Replicate())
    return compute, grads


def gather(name: str, leaf: Tensor, *, split: bool, sp: bool = False) -> Tensor:
    """A leaf for compute (gather_placements) as a DTensor redistribute. Autograd-aware.
    Compiled blocks gather with functional collectives instead (parallel.gather)."""
    if not isinstance(leaf, DTensor):
        return leaf
    compute, grads = gather_placements(name, leaf, split=split, sp=sp)
    return leaf.redistribute(placements=compute).to_local(grad_placements=grads)


def is_split(key: str, split: frozenset[str]) -> bool:
    """Whether leaf `key` (a whole-model or block-relative name) is a tp compute split."""
    return _BLOCK.sub("", key) in split


def gather_tree(params: Params, *, split: frozenset[str], sp: bool = False) -> Params:
    """Every leaf gathered for compute with DTensor redistributes, in the storage dtype: the
    reference that parallel.gather (training's gather: functional collectives, cast first)
    is tested against, and step.loss's default prepare. params: the whole tree or one
    block's sub-tree; split: tp_split(spec); sp: the layout uses sequence parallelism."""
    return {k: gather(k, v, split=is_split(k, split), sp=sp) for k, v in params.items()}


def full(params: Params) -> Params:
    """Whole tensors on every rank (for checks and export)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in params.items()}
