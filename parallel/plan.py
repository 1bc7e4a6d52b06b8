"""Sharding plan: logical axes of each leaf -> DTensor placements on the storage mesh.

Storage mesh axes (dp_replicate, fsdp, tp):
  dp_replicate  Replicate (HSDP replicas)
  tp            Shard(d) where d is the "heads" or "mlp" axis of a double/single block leaf
                (q|k|v and fc1/linear1 column-parallel, proj/fc2/linear2 row-parallel);
                everything else Replicate (refiner, embedders, modulation, norms, biases
                of row-parallel layers)
  fsdp          Shard on the largest remaining dim (even split preferred); tiny leaves Replicate
Gathering for compute keeps tp and replicates the data axes; gradients come back as
Partial over the data axes (each rank's loss is a local sum over the global count), so
the backward of the gather is the FSDP reduce-scatter / HSDP all-reduce.
"""

from __future__ import annotations

import re

from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor

from hvfunc.params import ParamSpec, Params, Spec
from parallel.mesh import Meshes

DATA_AXES = ("dp_replicate", "fsdp")
TP_AXES = ("heads", "mlp")
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.\d+\.")
# tp-replicated leaves whose uses differ across tp ranks: per-head norm weights see only
# this rank's heads, so their gradients are partial sums over tp. With sequence
# parallelism also every leaf that acts on split tokens outside the tp regions: the
# modulation of split streams, the final layer, biases added after a reduce-scatter.
_TP_PARTIAL = re.compile(r"(q_norm|k_norm)\.weight$")
_SP_PARTIAL = re.compile(r"(q_norm|k_norm)\.weight$|(^|\.)(img_mod|modulation)\.linear\.|^final_layer\.|"
                         r"(^|\.)(img_attn_proj|img_mlp\.fc2|linear2)\.bias$")


def tp_dim(key: str, s: ParamSpec) -> int | None:
    """The dim split over tp, or None (only double/single block leaves are tp-sharded)."""
    if not _BLOCK.match(key):
        return None
    return next((d for d, a in enumerate(s.axes) if a in TP_AXES), None)


def placements(key: str, s: ParamSpec, meshes: Meshes) -> tuple[Placement, ...]:
    fsdp, tp = meshes.size("fsdp"), meshes.size("tp")
    td = tp_dim(key, s) if tp > 1 else None
    local = [n // tp if d == td else n for d, n in enumerate(s.shape)]
    cands = [d for d in range(len(local)) if d != td and local[d] >= fsdp]
    even = [d for d in cands if local[d] % fsdp == 0]
    fd = max(even or cands, key=lambda d: local[d], default=None) if fsdp > 1 else None
    return (Replicate(), Shard(fd) if fd is not None else Replicate(), Shard(td) if td is not None else Replicate())


def plan(spec: Spec, meshes: Meshes) -> dict[str, tuple[Placement, ...]]:
    return {k: placements(k, s, meshes) for k, s in spec.items()}


def shard(params: Params, plan_: dict[str, tuple[Placement, ...]], meshes: Meshes) -> Params:
    """Full tensors (identical on every rank) -> DTensors; each rank keeps its own shard, no comm."""
    return {k: distribute_tensor(v, meshes.storage, plan_[k], src_data_rank=None) for k, v in params.items()}


def gather(name: str, leaf: Tensor, *, sp: bool = False) -> Tensor:
    """A leaf for compute: replicated over the data axes, still split over tp. Autograd-aware."""
    if not isinstance(leaf, DTensor):
        return leaf
    axes = leaf.device_mesh.mesh_dim_names
    compute, grads = [], []
    for a, p in zip(axes, leaf.placements):
        if a in DATA_AXES:
            compute.append(Replicate())
            grads.append(Partial())
        else:
            compute.append(p)
            partial = (_SP_PARTIAL if sp else _TP_PARTIAL).search(name)
            grads.append(Partial() if isinstance(p, Replicate) and partial else p)
    return leaf.redistribute(placements=compute).to_local(grad_placements=grads)


def gather_tree(params: Params, *, sp: bool = False) -> Params:
    """Every leaf gathered for compute (graphs.precision casts after this, so gradients are
    reduced in the storage dtype, fp32). sp: the layout uses sequence parallelism."""
    return {k: gather(k, v, sp=sp) for k, v in params.items()}


def full(params: Params) -> Params:
    """Whole tensors on every rank (for checks and export)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in params.items()}
