"""Per-rank training memory of the full 13B DiT on meshes of any size, without hardware.

    python scripts/plan_memory.py          # prints the table in docs/memory.md

Uses torch's fake process-group backend: one process pretends to be rank 0 of each mesh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfunc.config import dit_preset  # noqa: E402
from hvfunc.dit_spec import dit_spec  # noqa: E402
from hvfunc.params import count  # noqa: E402
from parallel.mesh import ParallelConfig, build  # noqa: E402
from parallel.planning import TRAIN_BYTES_PER_PARAM, block_gather_bytes, per_rank  # noqa: E402

LAYOUTS = [(8, ParallelConfig(dp_shard=8)), (8, ParallelConfig(dp_shard=4, cp=2)),
           (8, ParallelConfig(dp_shard=2, tp=4)), (16, ParallelConfig(dp_shard=8, cp=2)),
           (16, ParallelConfig(dp_shard=4, cp=2, tp=2)), (64, ParallelConfig(dp_replicate=4, dp_shard=8, cp=2)),
           (64, ParallelConfig(dp_shard=32, cp=2))]


def rows(model: str = "hunyuan-video-t2v") -> list[dict]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    spec = dit_spec(dit_preset(model))
    total = count(spec)
    out = []
    for world, par in LAYOUTS:
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


if __name__ == "__main__":
    print("| GPUs | layout | params / rank | ideal (total x replicas / world) | params+grads+Adam GB | one gathered block (bf16) GB |")
    print("|---|---|---|---|---|---|")
    for r in rows():
        print(f"| {r['world']} | {r['layout']} | {r['params_per_rank']:,} | {r['ideal']:,.0f} | {r['train_gb']:.1f} | "
              f"{r['block_bf16_gb']:.2f} |")
