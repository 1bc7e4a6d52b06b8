"""The per-block FSDP gather of training on plain tensors (functional collectives when traced).

`plan.gather` gathers with a DTensor redistribute; torch 2.13 fails on that inside a
compiled, fully checkpointed region (AOTAutograd saves the DeviceMesh for the backward:
"expected all tensors_saved_with_vc_check to be Tensors, got [..., DeviceMesh]"). So
a compiled block leaves DTensor before its graph: `shards` takes each leaf's local shard
(`to_local`; its backward makes the leaf's gradient a DTensor with the leaf's own
placements) and a static `Layout`, and `gather`, inside the compiled and checkpointed
block, rebuilds the compute leaf with functional collectives - graph nodes that the
recompute replays - following the same rules (plan.gather_placements), per mesh axis:

  Shard,     gradient partial  all-gather; backward reduce-scatter (sum)   data axes, tp partial
  Shard,     gradient whole    all-gather; backward this rank's slice       tp stored-only
  Replicate, gradient partial  identity; backward all-reduce (sum)          dp_replicate, tiny leaves
  kept as stored               nothing                                      tp compute splits
Uneven shards (torch.chunk sizes: ceil(size / ranks) each, the last ones smaller or
empty) are zero-padded to that chunk before the all-gather and trimmed after it; the
padding's backward drops the padded rows of the gradient. Leaves are cast to their
compute dtype before the gather (bf16 moves half the bytes of fp32, as FSDP2's
param_dtype) and their gradients back to the storage dtype before any reduction, so
gradients are summed in fp32 exactly as with a cast after an fp32 gather. Eager blocks
(and the leaves outside the blocks) take the same path with blocking c10d collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from graphs.precision import Precision, compute_dtypes
from hvfunc.lora import scaled
from hvfunc.params import Params
from parallel import plan

# renamed *_single in torch 2.13 (functional and c10d); the old names warn there (FutureWarning) and
# are the only ones on 2.11 - 2.12
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
_all_gather_c10d = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_c10d = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_reduce = funcol.all_reduce


# Traced (compiled blocks): functional collectives, graph nodes whose waits the compiler
# places. Eager: the blocking c10d calls on fresh contiguous buffers. (Eager funcol on gloo
# corrupted the heap now and then - "malloc(): unaligned tcache chunk detected", 2 of ~30
# multi-rank CPU runs - even with an immediate wait; the blocking calls never did.)


def _pg(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


def _all_gather_on(y: Tensor, dim: int, a: Axis) -> Tensor:
    if torch.compiler.is_compiling():
        return _all_gather(y.contiguous(), dim, a.group)
    x = y.movedim(dim, 0).contiguous()
    out = x.new_empty((a.ranks * x.shape[0], *x.shape[1:]))
    _all_gather_c10d(out, x, group=_pg(a.group))
    return out.movedim(0, dim).contiguous()  # the layout funcol returns (same matmul roundings)


def _reduce_scatter_on(g: Tensor, dim: int, a: Axis) -> Tensor:
    if torch.compiler.is_compiling():
        return _reduce_scatter(g.contiguous(), "sum", dim, a.group)
    x = g.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // a.ranks, *x.shape[1:]))
    _reduce_scatter_c10d(out, x, group=_pg(a.group))
    return out.movedim(0, dim).contiguous()  # the layout funcol returns (same matmul roundings)


def _all_reduce_on(g: Tensor, a: Axis) -> Tensor:
    if torch.compiler.is_compiling():
        return _all_reduce(g.contiguous(), "sum", a.group)
    out = g.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=_pg(a.group))
    return out


class Axis(NamedTuple):
    """One collective of a leaf's gather: a storage mesh axis with work to do."""

    group: str  # process group name (funcol takes names: constants in the graph)
    ranks: int
    rank: int  # this rank's index in the group
    dim: int | None  # the tensor dim sharded over the axis; None: replicated
    size: int  # the whole size of that dim (0 when replicated)
    sums: bool  # gradients are partial sums over the axis (else whole and equal on every rank)


Layout = tuple[Axis, ...]


def _gather_axis(y: Tensor, a: Axis) -> Tensor:
    """Forward of one axis: all-gather on a.dim (uneven shards padded, then trimmed)."""
    if a.dim is None:
        return y
    chunk = -(-a.size // a.ranks)
    if pad := chunk - y.shape[a.dim]:
        y = F.pad(y, [0, 0] * (y.ndim - 1 - a.dim) + [0, pad])
    y = _all_gather_on(y, a.dim, a)
    return y if chunk * a.ranks == a.size else y.narrow(a.dim, 0, a.size)


def _reduce_axis(g: Tensor, a: Axis, local: int) -> Tensor:
    """Backward of one axis: the gradient of this rank's `local` rows on a.dim."""
    if a.dim is None:
        return _all_reduce_on(g, a) if a.sums else g
    chunk = -(-a.size // a.ranks)
    if pad := chunk * a.ranks - a.size:
        g = F.pad(g, [0, 0] * (g.ndim - 1 - a.dim) + [0, pad])
    if a.sums:
        g = _reduce_scatter_on(g, a.dim, a)
    else:
        g = g.narrow(a.dim, a.rank * chunk, chunk)
    return g if local == chunk else g.narrow(a.dim, 0, local)


class _GatherLeaf(torch.autograd.Function):
    """Cast to the compute dtype, then gather over each axis of the layout in order.
    Backward: the gradient back in the storage dtype first, so every reduction (reduce-
    scatter, all-reduce) sums fp32, then each axis in reverse order. As cast-after-gather
    bit for bit, with half the gather traffic in bf16."""

    @staticmethod
    def forward(ctx, x: Tensor, layout: Layout, dtype: torch.dtype) -> Tensor:
        ctx.layout, ctx.dtype, ctx.local = layout, x.dtype, []
        y = x.to(dtype)
        for a in layout:
            ctx.local.append(0 if a.dim is None else y.shape[a.dim])
            y = _gather_axis(y, a)
        return y.view_as(y) if y is x else y

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.to(ctx.dtype)
        for a, local in zip(reversed(ctx.layout), reversed(ctx.local)):
            g = _reduce_axis(g, a, local)
        return g, None, None


def gather(local: Params, layouts: dict[str, Layout], dtypes: dict[str, torch.dtype] | None = None) -> Params:
    """Local shards -> compute leaves in `dtypes` (default: as stored), with functional
    collectives only (traceable by dynamo, fullgraph). Leaves without a layout are only cast."""
    out = {}
    for k, x in local.items():
        dtype = (dtypes or {}).get(k, x.dtype)
        out[k] = _GatherLeaf.apply(x, layouts[k], dtype) if layouts.get(k) else x.to(dtype)
    return out


def layout(name: str, leaf: DTensor, *, split: bool, sp: bool = False) -> Layout:
    """How `gather` rebuilds one DTensor leaf for compute (arguments as plan.gather)."""
    compute, grads = plan.gather_placements(name, leaf, split=split, sp=sp)
    mesh = leaf.device_mesh
    used = [i for i in range(mesh.ndim) if mesh.size(i) > 1]
    dims = [leaf.placements[i].dim for i in used if leaf.placements[i].is_shard()]
    if len(set(dims)) < len(dims) or any(not (leaf.placements[i].is_replicate() or type(leaf.placements[i]) is Shard)
                                         for i in used):
        raise ValueError(f"{name}: storage placements {leaf.placements} on mesh {mesh.mesh_dim_names} cannot be "
                         f"gathered in a compiled block (only Replicate, and Shard on a dim no other axis shards)")
    axes = []
    for i in used:
        p, c, g = leaf.placements[i], compute[i], grads[i]
        if c == p and not g.is_partial():
            continue  # a tp compute split, or replicated with whole gradients: nothing to do
        ax = Axis(mesh.get_group(i).group_name, mesh.size(i), mesh.get_local_rank(i), None, 0, g.is_partial())
        axes.append(ax if p.is_replicate() else ax._replace(dim=p.dim, size=leaf.shape[p.dim]))
    return tuple(axes)


def shards(params: Params, *, split: frozenset[str], sp: bool = False) -> tuple[Params, dict[str, Layout]]:
    """Outside the compiled region: every DTensor leaf's local shard (differentiable) and
    its layout; other leaves pass through. split: plan.tp_split(spec); sp: the parallel
    layout uses sequence parallelism."""
    local, layouts = {}, {}
    for k, v in params.items():
        if isinstance(v, DTensor):
            layouts[k] = layout(k, v, split=plan.is_split(k, split), sp=sp)
            v = v.to_local()
        local[k] = v
    return local, layouts


@dataclass(frozen=True)
class BlockGather:
    """`prepare` of DTensor leaves for graphs.blocks.make_blocks(dtensor_params=True) and the
    leaves outside the blocks: `shards` (outside a compiled block) and `gather` (inside)
    split the work; called directly it does both, eagerly. Leaves are gathered in their
    compute dtype under `policy` (graphs.precision; None: as stored)."""

    split: frozenset[str]
    """plan.tp_split(spec)"""
    sp: bool = False
    """The parallel layout uses sequence parallelism."""
    policy: Precision | None = None
    """Compute dtypes of the gathered leaves (None: the storage dtype)."""
    lora_scale: float = 1.0
    """alpha / r of the tree's LoRA adapters, folded into their gathered `lora_B` (hvfunc.lora.scaled):
    a Python constant of the compute, never a leaf, so DCP, the plan and the optimizer never see it."""

    def __call__(self, params: Params) -> Params:
        return self.gather(*self.shards(params))

    def shards(self, params: Params) -> tuple[Params, dict[str, Layout]]:
        return shards(params, split=self.split, sp=self.sp)

    def gather(self, local: Params, layouts: dict[str, Layout]) -> Params:
        out = gather(local, layouts, None if self.policy is None else compute_dtypes(local, self.policy))
        return scaled(out, self.lora_scale)
