"""Memory planning of the full model without hardware: meta DTensors on any mesh.

`per_rank` places every leaf of a spec with the real sharding plan (parallel.plan) on
meta tensors and reads the local shapes rank `rank` would hold. Training memory per
rank = params (fp32) + grads (fp32) + AdamW's two states (fp32) = 16 bytes per local
parameter, plus the compute-dtype copy of the one block being gathered at a time.
Run it under any process group of the right size, e.g. the "fake" backend with a
FakeStore: `rows` does, for the layouts of the table in docs/memory.md
(scripts/plan_memory.py prints it, tests/test_planning.py checks it).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import Shard

from hvfunc.params import Spec, abstract
from parallel import plan
from parallel.mesh import Meshes, ParallelConfig, build

TRAIN_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 master weight, fp32 grad, AdamW exp_avg + exp_avg_sq
FROZEN_BYTES_PER_PARAM = 2  # LoRA's frozen base: the bf16 weight only (no grad, no optimizer state)
LAYOUTS = [(8, ParallelConfig(dp_shard=8)), (8, ParallelConfig(dp_shard=4, cp=2)),
           (8, ParallelConfig(dp_shard=2, tp=4)), (16, ParallelConfig(dp_shard=8, cp=2)),
           (16, ParallelConfig(dp_shard=4, cp=2, tp=2)), (64, ParallelConfig(dp_replicate=4, dp_shard=8, cp=2)),
           (64, ParallelConfig(dp_shard=32, cp=2))]
"""(world size, layout) of the table in docs/memory.md."""


def expected_local(shape: tuple[int, ...], placements, mesh_shape: tuple[int, ...], coords: tuple[int, ...]) -> int:
    """Elements a rank holds by arithmetic: each Shard(d) over a mesh dim of size n gives
    this rank its chunk of dim d (torch.chunk sizes: ceil(size / n), the last ones smaller)."""
    local = list(shape)
    for p, n, c in zip(placements, mesh_shape, coords):
        if isinstance(p, Shard):
            size, step = local[p.dim], -(-local[p.dim] // n)
            local[p.dim] = max(0, min(step, size - c * step))
    return math.prod(local)


def per_rank(spec: Spec, meshes: Meshes) -> dict[str, int]:
    """Local element count of every leaf on this rank (from meta DTensors)."""
    params = plan.shard(abstract(spec, dtype=torch.float32), plan.plan(spec, meshes), meshes)
    return {k: v.to_local().numel() for k, v in params.items()}


def block_gather_bytes(spec: Spec, meshes: Meshes, dtype_bytes: int = 2) -> int:
    """Largest single block gathered for compute (full over the data axes, split over tp)."""
    tp = meshes.size("tp")
    sizes: dict[str, int] = {}
    for k, s in spec.items():
        if k.startswith(("double_blocks.", "single_blocks.")):
            block = ".".join(k.split(".")[:2])
            d = plan.tp_dim(k, s) if tp > 1 else None
            sizes[block] = sizes.get(block, 0) + math.prod(s.shape) // (tp if d is not None else 1)
    return max(sizes.values(), default=0) * dtype_bytes


def rows(spec: Spec, layouts=LAYOUTS) -> list[dict]:
    """Rank 0's training memory on each layout, each under a fake process group of its size
    (no hardware; none may be initialised when called)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    total = sum(math.prod(s.shape) for s in spec.values())
    out = []
    for world, par in layouts:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        try:
            meshes = build(par)
            local = sum(per_rank(spec, meshes).values())
            out.append({"world": world, "layout": f"rep {par.dp_replicate} x shard {meshes.cfg.dp_shard} x cp "
                        f"{par.cp} x tp {par.tp}", "params_per_rank": local, "ideal": total * par.dp_replicate / world,
                        "train_gb": local * TRAIN_BYTES_PER_PARAM / 2**30,
                        "block_bf16_gb": block_gather_bytes(spec, meshes) / 2**30})
        finally:
            dist.destroy_process_group()
    return out


LORA_LAYOUTS = [(1, ParallelConfig(dp_shard=1)), (2, ParallelConfig(dp_shard=2)), (8, ParallelConfig(dp_shard=8))]


def lora_rows(base: Spec, adapters: Spec, layouts=LORA_LAYOUTS) -> list[dict]:
    """Rank 0's LoRA training memory: the frozen base in bf16 (2 bytes per local parameter), the
    adapters as fp32 masters + grads + AdamW (16 bytes), both placed by the same plan."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    out = []
    for world, par in layouts:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        try:
            meshes = build(par)
            local = per_rank(base | adapters, meshes)
            b, a = sum(local[k] for k in base), sum(local[k] for k in adapters)
            out.append({"world": world, "base_per_rank": b, "adapters_per_rank": a,
                        "base_gb": b * FROZEN_BYTES_PER_PARAM / 2**30, "adapters_gb": a * TRAIN_BYTES_PER_PARAM / 2**30,
                        "block_bf16_gb": block_gather_bytes(base | adapters, meshes) / 2**30})
        finally:
            dist.destroy_process_group()
    return out


def lora_table(rows_: list[dict]) -> str:
    """The LoRA table of docs/memory.md."""
    head = ("| GPUs (dp_shard) | base params / rank | base bf16 GB | adapters / rank | adapters+grads+Adam GB | "
            "total GB | one gathered block (bf16) GB |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['world']} | {r['base_per_rank']:,} | {r['base_gb']:.1f} | {r['adapters_per_rank']:,} | "
              f"{r['adapters_gb']:.2f} | {r['base_gb'] + r['adapters_gb']:.1f} | {r['block_bf16_gb']:.2f} |"
              for r in rows_]
    return "\n".join(lines)


def table(rows_: list[dict]) -> str:
    """The markdown table of docs/memory.md."""
    lines = ["| GPUs | layout | params / rank | ideal (total x replicas / world) | params+grads+Adam GB | "
             "one gathered block (bf16) GB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['world']} | {r['layout']} | {r['params_per_rank']:,} | {r['ideal']:,.0f} | {r['train_gb']:.1f} | "
              f"{r['block_bf16_gb']:.2f} |" for r in rows_]
    return "\n".join(lines)
