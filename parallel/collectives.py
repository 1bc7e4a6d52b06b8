"""Collectives with the gradients they need, written as DTensor placement changes.

tp_copy / tp_sum are Megatron's f / g: identity-forward all-reduce-backward before a
column-parallel matmul, all-reduce-forward identity-backward after a row-parallel one
(not funcol.all_reduce, whose backward all-reduces again). With sequence parallelism they
become all-gather / reduce-scatter over the token dim for the split tokens. Ulysses moves video tokens
<-> heads with all-to-all over cp; text is replicated over cp, so each rank takes its
own slice of text heads and the text output is all-gathered over heads (its backward,
a reduce-scatter, sums the text-stream gradient contributions of all cp ranks).
Shapes: B batch, L video tokens, S text tokens, N heads, K head dim.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from hvfunc.attention import AttnFn
from hvfunc.dit import TPHooks


# renamed in torch 2.13; the old name still exists (deprecated) on 2.11 - 2.13
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def tp_copy(x: Tensor, mesh: DeviceMesh) -> Tensor:
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def tp_sum(x: Tensor, mesh: DeviceMesh) -> Tensor:
    d = DTensor.from_local(x, mesh, [Partial()], run_check=False)
    return d.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Replicate()])


def tp_hooks(mesh: DeviceMesh) -> TPHooks:
    """Megatron TP (no sequence parallelism): every stream is replicated over tp."""
    return TPHooks(enter=lambda x, stream: tp_copy(x, mesh), leave=lambda y, stream: tp_sum(y, mesh))


def seq_gather(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """[B, l/n, D] shard -> [B, l, D] for a column-parallel matmul; backward reduce-scatters."""
    d = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
    return d.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def seq_reduce_scatter(y: Tensor, mesh: DeviceMesh) -> Tensor:
    """Partial sums [B, l, D] of a row-parallel matmul -> this rank's summed [B, l/n, D]."""
    d = DTensor.from_local(y, mesh, [Partial()], run_check=False)
    return d.redistribute(mesh, [Shard(1)]).to_local(grad_placements=[Shard(1)])


def seq_split(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """A replicated [B, l, D] -> this rank's [B, l/n, D]; backward all-gathers (whole, equal grads)."""
    d = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    return d.redistribute(mesh, [Shard(1)]).to_local(grad_placements=[Shard(1)])


def sp_hooks(mesh: DeviceMesh, num_img: int) -> TPHooks:
    """Megatron TP with sequence parallelism. The residual stream holds num_img video tokens
    per rank (and, in single blocks, S/n text tokens after them); text is replicated in
    double blocks (MindSpeed splits only video tokens: the text streams have own weights)."""
    n = mesh.size()

    def enter(x: Tensor, stream: str) -> Tensor:
        if stream == "txt":
            return tp_copy(x, mesh)
        if stream == "img":
            return seq_gather(x, mesh)
        return torch.cat([seq_gather(x[:, :num_img], mesh), seq_gather(x[:, num_img:], mesh)], dim=1)

    def leave(y: Tensor, stream: str) -> Tensor:
        if stream == "txt":
            return tp_sum(y, mesh)
        if stream == "img":
            return seq_reduce_scatter(y, mesh)
        L = num_img * n
        return torch.cat([seq_reduce_scatter(y[:, :L], mesh), seq_reduce_scatter(y[:, L:], mesh)], dim=1)

    return TPHooks(enter=enter, leave=leave, cond=lambda v: tp_copy(v, mesh), split=lambda x: seq_split(x, mesh),
                   sp=(mesh.get_local_rank(), n))


def seq_to_heads(x_BlNK: Tensor, group, n: int) -> Tensor:
    """[B, L/n, N, K] -> [B, L, N/n, K]: gather the sequence, scatter the heads."""
    B, l, N, K = x_BlNK.shape
    x = x_BlNK.reshape(B, l, n, N // n, K).permute(2, 0, 1, 3, 4).contiguous()
    x = funcol.all_to_all_single_autograd(x, None, None, group)  # dim 0: head chunk -> source rank
    return x.permute(1, 0, 2, 3, 4).reshape(B, n * l, N // n, K)


def heads_to_seq(x_BLhK: Tensor, group, n: int) -> Tensor:
    """[B, L, N/n, K] -> [B, L/n, N, K]: the inverse of seq_to_heads."""
    B, L, h, K = x_BLhK.shape
    x = x_BLhK.reshape(B, n, L // n, h, K).permute(1, 0, 2, 3, 4).contiguous()
    x = funcol.all_to_all_single_autograd(x, None, None, group)  # dim 0: sequence chunk -> source rank
    return x.permute(1, 2, 0, 3, 4).reshape(B, L // n, n * h, K)


def ulysses(attn: AttnFn, mesh: DeviceMesh, num_img: int) -> AttnFn:
    """Joint attention over [video shard (num_img tokens) | whole text] on a cp mesh (1-D).

    kv_len (if any) counts valid tokens of the whole [video | text] sequence.
    """
    n, r = mesh.size(), mesh.get_local_rank()
    group = mesh.get_group()

    def run(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor | None) -> Tensor:  # [B, L/n + S, N, K]
        def to_heads(t: Tensor) -> Tensor:
            img, txt = t[:, :num_img], t[:, num_img:]
            return torch.cat([seq_to_heads(img, group, n), txt.chunk(n, dim=2)[r]], dim=1)

        o = attn(to_heads(q), to_heads(k), to_heads(v), kv_len)  # [B, L + S, N/n, K]
        L = num_img * n
        o_img = heads_to_seq(o[:, :L], group, n)
        o_txt = _all_gather(o[:, L:].contiguous(), gather_dim=2, group=group)
        return torch.cat([o_img, o_txt], dim=1)

    return run
