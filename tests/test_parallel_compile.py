"""A sharded train step (FSDP gather, Ulysses, TP inside the compiled block) equals eager."""

import functools
import pickle

import torch
from conftest import random_params
from dist import spawn
from test_parallel_layouts import HOW, SEED, _batch

from graphs.blocks import Compile, Recompute, make_blocks
from hvfunc.config import DIT_PRESETS
from hvfunc.dit_spec import dit_spec
from parallel import plan, step
from parallel.mesh import ParallelConfig, build


def _grads(cfg, meshes, blocks):
    full = random_params(cfg, seed=3, scale=0.1)
    params = plan.shard(full, plan.plan(dit_spec(cfg), meshes), meshes)
    for v in params.values():
        v.requires_grad_(True)
    ids = [meshes.data_rank]
    batch = _batch(cfg, ids)
    sigma, noise = step.sample_noise(ids, tuple(batch["latents"].shape[1:]), seed=SEED, step=0, how=HOW)
    loss = step.loss(params, batch, sigma, noise, cfg=cfg, meshes=meshes, guidance=torch.full((1,), 6000.0),
                     blocks=blocks)
    loss.backward()
    return step.global_mean(loss, meshes), {k: v.grad.full_tensor() for k, v in params.items()}


def _worker(rank, world, out):
    cfg = DIT_PRESETS["tiny-i2v"]
    results = {}
    for layout in (dict(dp_shard=2), dict(dp_shard=1, cp=2), dict(dp_shard=1, tp=2),
                   dict(dp_shard=1, tp=2, sequence_parallel=True)):
        meshes = build(ParallelConfig(**layout))
        eager = _grads(cfg, meshes, None)
        torch._dynamo.reset()
        blocks = make_blocks(prepare=functools.partial(plan.gather_tree, split=plan.tp_split(dit_spec(cfg)),
                                                         sp=meshes.cfg.sequence_parallel),
                             recompute=Recompute(double_full=1, selective=True), compile=Compile(backend="aot_eager"),
                             dtensor_params=True)
        results[str(layout)] = (eager, _grads(cfg, meshes, blocks))
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(results, f)


def test_compiled_sharded_step_equals_eager(tmp):
    spawn(_worker, 2, str(tmp / "r.pkl"))
    with open(tmp / "r.pkl", "rb") as f:
        results = pickle.load(f)
    for layout, ((l_e, g_e), (l_c, g_c)) in results.items():
        assert abs(l_c - l_e) <= 1e-5 * abs(l_e), layout
        for k in g_e:
            assert float((g_c[k] - g_e[k]).norm() / g_e[k].norm().clamp_min(1e-12)) <= 1e-5, (layout, k)
