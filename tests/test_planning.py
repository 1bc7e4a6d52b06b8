"""Full-size (13B) sharding on a fake process group: local shapes equal the arithmetic."""

import math

from dist import spawn

from hvfunc.config import dit_preset
from hvfunc.dit_spec import dit_spec
from hvfunc.params import count
from parallel import plan
from parallel.mesh import ParallelConfig, build
from parallel.planning import expected_local, per_rank

LAYOUTS = [(8, ParallelConfig(dp_shard=8)), (16, ParallelConfig(dp_shard=8, cp=2)),
           (16, ParallelConfig(dp_shard=4, cp=2, tp=2)), (8, ParallelConfig(dp_shard=1, tp=8)), (64, ParallelConfig(dp_replicate=2, dp_shard=16, cp=2))]


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
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=0, world_size=1)
    with open(out, "w") as f:
        f.write("\n".join(lines))


def test_full_model_plan_matches_arithmetic(tmp):
    spawn(_check, 1, str(tmp / "lines.txt"))
    lines = (tmp / "lines.txt").read_text().splitlines()
    assert len(lines) == 2 * len(LAYOUTS)
    assert math.isclose(int(lines[0].split()[2]), 12_821_012_544 / 8, rel_tol=1e-2)
