"""The per-block FSDP gather as functional collectives on plain tensors, for compiled blocks.

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
padding's backward drops the padded rows of the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from hvfunc.params import Params
from parallel import plan

# renamed in torch 2.13; the old names still exist (deprecated) on 2.11 - 2.13
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


class Axis(NamedTuple):
    """One collective of a leaf's gather: a storage mesh axis with work to do."""

    group: str  # process group name (funcol takes names: constants in the graph)
    ranks: int
    rank: int  # this rank's index in the group
    dim: int | None  # the tensor dim sharded over the axis; None: replicated
    size: int  # the whole size of that dim (0 when replicated)
    sums: bool  # gradients are partial sums over the axis (else whole and equal on every rank)


Layout = tuple[Axis, ...]


class _SumGrad(torch.autograd.Function):
    """Identity; backward all-reduces (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: str) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return funcol.all_reduce(g.contiguous(), "sum", ctx.group), None


class _Gather(torch.autograd.Function):
    """All-gather on dim; backward reduce-scatters (sums) the gradient or, when it is whole
    and equal on every rank, takes this rank's chunk of it (no collective)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: str, rank: int, sums: bool) -> Tensor:
        ctx.dim, ctx.group, ctx.rank, ctx.chunk, ctx.sums = dim, group, rank, x.shape[dim], sums
        return _all_gather(x.contiguous(), dim, group)

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.sums:
            g = _reduce_scatter(g.contiguous(), "sum", ctx.dim, ctx.group)
        else:
            g = g.narrow(ctx.dim, ctx.rank * ctx.chunk, ctx.chunk)
        return g, None, None, None, None


def _gather_axis(x: Tensor, a: Axis) -> Tensor:
    if a.dim is None:
        return _SumGrad.apply(x, a.group)
    chunk = -(-a.size // a.ranks)
    if pad := chunk - x.shape[a.dim]:
        x = F.pad(x, [0, 0] * (x.ndim - 1 - a.dim) + [0, pad])
    y = _Gather.apply(x, a.dim, a.group, a.rank, a.sums)
    return y if chunk * a.ranks == a.size else y.narrow(a.dim, 0, a.size)


def gather(local: Params, layouts: dict[str, Layout]) -> Params:
    """Local shards -> compute leaves, with functional collectives only (traceable by
    dynamo, fullgraph). Leaves without a layout pass through."""
    out = {}
    for k, x in local.items():
        for a in layouts.get(k, ()):
            x = _gather_axis(x, a)
        out[k] = x
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
    """`prepare` of DTensor block leaves for graphs.blocks.make_blocks(dtensor_params=True):
    called directly it gathers eagerly (plan.gather_tree); `shards` (outside) and `gather`
    (inside) split the same work around a compiled block. `then` runs on the gathered
    leaves (the precision cast, graphs.precision)."""

    split: frozenset[str]
    """plan.tp_split(spec)"""
    sp: bool = False
    """The parallel layout uses sequence parallelism."""
    then: Callable[[Params], Params] = field(default=lambda p: p)

    def __call__(self, params: Params) -> Params:
        return self.then(plan.gather_tree(params, split=self.split, sp=self.sp))

    def shards(self, params: Params) -> tuple[Params, dict[str, Layout]]:
        return shards(params, split=self.split, sp=self.sp)

    def gather(self, local: Params, layouts: dict[str, Layout]) -> Params:
        return self.then(gather(local, layouts))
