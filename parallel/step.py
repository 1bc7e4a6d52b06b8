"""One training step's loss on a (dp_replicate, dp_shard, cp, tp) mesh.

Data: each dp rank has its own samples; cp ranks of a group share samples and split
video tokens into contiguous slices; tp ranks share samples and tokens. Every rank
returns its local sum of squared errors divided by the *global* element count, so
gradients summed over the data axes (the FSDP reduce-scatter / HSDP all-reduce in the
gather's backward) are the gradients of the global mean - the single-process loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from hvfunc import dit, flow
from hvfunc.attention import AttnFn, sdpa
from hvfunc.config import DiTConfig
from hvfunc.dit_spec import dit_spec
from hvfunc.params import Params
from parallel import collectives, plan
from parallel.mesh import Meshes

_BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")


def token_multiple(meshes: Meshes) -> int:
    """Video tokens must divide by cp (Ulysses) and, with sequence parallelism, by cp * tp."""
    return meshes.size("cp") * (meshes.size("tp") if meshes.cfg.sequence_parallel else 1)


def token_slice(n_tokens: int, meshes: Meshes) -> tuple[int, int]:
    cp, m = meshes.size("cp"), token_multiple(meshes)
    if n_tokens % m:
        raise ValueError(f"{n_tokens} video tokens cannot be split evenly over {m} ranks (cp, x tp with sequence "
                         f"parallelism): choose latent frames/sizes whose token count divides {m}")
    n = n_tokens // cp
    r = meshes.rank("cp")
    return r * n, (r + 1) * n


def gathered_blocks(prepare: Callable[[Params], Params]) -> dit.Blocks:
    """Plain block functions that prepare (gather, cast) their own leaves first, so only one
    block's full weights exist at a time. graphs.blocks.make_blocks(prepare=...) adds
    recompute and compilation around the same preparation."""

    def wrap(fn: Callable) -> Callable[[int], Callable]:
        def body(p: Params, *args, **kw):
            return fn(prepare(p), *args, **kw)

        return lambda i: body

    return dit.Blocks(double=wrap(dit.double_block), single=wrap(dit.single_block))


def loss(params: Params, batch: dict, sigma_B: Tensor, noise: Tensor, *, cfg: DiTConfig, meshes: Meshes,
         guidance: Tensor | None, prepare: Callable[[Params], Params] | None = None, attn: AttnFn = sdpa,
         blocks: dit.Blocks | None = None) -> Tensor:
    """This rank's share of the global mean flow-matching loss (sharded DTensor params).

    `prepare` turns sharded leaves into compute leaves (gather and precision cast);
    `blocks` must apply the same preparation to block leaves (default: plain gathered blocks)."""
    sp = meshes.cfg.sequence_parallel
    prepare = prepare or functools.partial(plan.gather_tree, split=plan.tp_split(dit_spec(cfg)), sp=sp)
    grid = [n // p for n, p in zip(batch["latents"].shape[2:], cfg.patch_size)]
    tokens = token_slice(grid[0] * grid[1] * grid[2], meshes)
    outer = prepare({k: v for k, v in params.items() if not k.startswith(_BLOCK_PREFIXES)})
    inner = {k: v for k, v in params.items() if k.startswith(_BLOCK_PREFIXES)}
    block_attn = attn
    if meshes.size("cp") > 1:
        block_attn = collectives.ulysses(attn, meshes.compute["cp"], num_img=tokens[1] - tokens[0])
    tp = dit.NO_TP
    if meshes.size("tp") > 1:
        tp_mesh = meshes.compute["tp"]
        tp = (collectives.sp_hooks(tp_mesh, (tokens[1] - tokens[0]) // meshes.size("tp")) if sp
              else collectives.tp_hooks(tp_mesh))
    sq, n = flow.token_loss(outer | inner, batch, sigma_B, noise, cfg=cfg, guidance=guidance, attn=attn,
                            block_attn=block_attn, tokens=tokens, tp=tp, blocks=blocks or gathered_blocks(prepare))
    count = torch.tensor(float(n), device=sq.device)  # nccl reduces device tensors only
    for axis in _data_axes(meshes):
        dist.all_reduce(count, group=meshes.group(axis))
    return sq / count


def _data_axes(meshes: Meshes) -> list[str]:
    """Axes whose ranks hold different loss elements (tp only with sequence parallelism)."""
    axes = ["dp_replicate", "dp_shard", "cp"] + (["tp"] if meshes.cfg.sequence_parallel else [])
    return [a for a in axes if meshes.size(a) > 1]


def global_mean(local: Tensor, meshes: Meshes) -> float:
    """The loss value of the whole step (sum of every data shard's share)."""
    v = local.detach().clone()
    for axis in _data_axes(meshes):
        dist.all_reduce(v, group=meshes.group(axis))
    return float(v)


def sample_noise(sample_ids: list[int], shape: tuple[int, ...], *, seed: int, step: int,
                 how: flow.TimestepSampling) -> tuple[Tensor, Tensor]:
    """(sigma [B], noise [B, *shape]) drawn per global sample id: the same numbers whatever
    rank or batch split holds the sample, so every parallel layout sees the same step."""
    sig, noise = [], []
    for sid in sample_ids:
        g = torch.Generator().manual_seed(hash((seed, step, sid)) & (2 ** 63 - 1))
        sig.append(flow.sample_sigmas(1, how, generator=g))
        noise.append(torch.randn(shape, generator=g))
    return torch.cat(sig), torch.stack(noise)
