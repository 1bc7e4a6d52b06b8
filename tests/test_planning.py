"""Full-size (13B) sharding on a fake process group: local shapes equal the arithmetic, and
docs/memory.md's table is what the code computes."""

import math
from pathlib import Path

import torch
from conftest import random_params
from dist import spawn

from hvfunc.config import DIT_PRESETS, dit_preset
from hvfunc.dit_spec import dit_spec
from hvfunc.params import count
from parallel import optim, plan, planning
from parallel.mesh import ParallelConfig, build
from parallel.planning import TRAIN_BYTES_PER_PARAM, expected_local, per_rank

# the table's layouts, plus pure tp and HSDP x cp
LAYOUTS = [*planning.LAYOUTS, (8, ParallelConfig(dp_shard=1, tp=8)),
           (64, ParallelConfig(dp_replicate=2, dp_shard=16, cp=2))]
DOC = Path(__file__).resolve().parents[1] / "docs" / "memory.md"


def _check(_rank, _world, out):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.destroy_process_group()  # the spawn helper's gloo group; use fake ones instead
    spec = dit_spec(dit_preset("hunyuan-video-t2v"))
    total = count(spec)
    lines = []
    for world, par in LAYOUTS:
        for rank in (0, world - 1):
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            meshes = build(par)
            local = per_rank(spec, meshes)
            storage = meshes.storage
            coords = tuple(storage.get_coordinate())
            for k, s in spec.items():
                want = expected_local(s.shape, plan.placements(k, s, meshes), tuple(storage.shape), coords)
                assert local[k] == want, (world, par, rank, k, local[k], want)
            n = sum(local.values())
            # an even split to within 1%, with tp too: leaves tp does not split for compute
            # (modulation, refiner, embedders) are still stored split over tp
            assert abs(n - total * par.dp_replicate / world) <= 0.01 * total / world, (world, par, n)
            lines.append(f"{world} {rank} {n}")
            dist.destroy_process_group()
    table = planning.table(planning.rows(spec))
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=0, world_size=1)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n---\n" + table)


def test_full_model_plan_matches_arithmetic_and_the_docs_table(tmp):
    spawn(_check, 1, str(tmp / "lines.txt"))
    lines, table = (tmp / "lines.txt").read_text().split("\n---\n")
    lines = lines.splitlines()
    assert len(lines) == 2 * len(LAYOUTS)
    assert math.isclose(int(lines[0].split()[2]), 12_821_012_544 / 8, rel_tol=1e-2)
    rows = table.splitlines()
    assert len(rows) == 2 + len(planning.LAYOUTS)
    assert all(r in DOC.read_text().splitlines() for r in rows), "docs/memory.md: rerun scripts/plan_memory.py"


def test_training_state_is_16_bytes_per_parameter():
    """TRAIN_BYTES_PER_PARAM against the real optimizer: after a step, fp32 params, grads and
    AdamW's states hold exactly that many bytes per parameter."""
    params = {k: v.requires_grad_(True) for k, v in random_params(DIT_PRESETS["tiny"]).items()}
    opt = optim.make_optimizer(params, optim.OptimConfig())
    sum(v.float().square().sum() for v in params.values()).backward()
    opt.step()
    n = sum(v.numel() for v in params.values())
    held = sum(v.numel() * v.element_size() + v.grad.numel() * v.grad.element_size() for v in params.values())
    held += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)  # (not the scalar step counters)
    assert held == TRAIN_BYTES_PER_PARAM * n
