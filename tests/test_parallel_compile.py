"""Sharded train steps with the FSDP gather, Ulysses and TP inside the compiled,
checkpointed blocks equal eager; selective recompute keeps attention inside the graph.

The oracles: the eager sharded step (itself equal to one process, test_parallel_layouts)
and plan.gather (DTensor redistribute) for the in-graph gather of single leaves.
"""

import functools
import math
import pickle

import pytest
import torch
from conftest import random_params
from dist import deprecations_are_errors, spawn
from test_parallel_layouts import HOW, SEED, _batch
from torch._dynamo.backends.debugging import aot_eager, boxed_nop
from torch._dynamo.testing import CompileCounterWithBackend
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from graphs.blocks import Compile, Recompute, make_blocks
from graphs.precision import Precision, cast
from graphs.recompute import is_attention, with_recompute
from hvfunc.config import DIT_PRESETS
from hvfunc.dit_spec import dit_spec
from parallel import gather, plan, step
from parallel.mesh import ParallelConfig, build

LAYOUTS = (dict(dp_shard=2), dict(dp_shard=1, cp=2), dict(dp_shard=1, tp=2),
           dict(dp_shard=1, tp=2, sequence_parallel=True))
# a full and a selective graph per block kind: 4 graphs at depth (2, 2) and at (3, 3)
RECOMPUTE = Recompute(double_full=1, single_full=1, selective=True)


def _grads(cfg, meshes, blocks, prepare=None):
    full = random_params(cfg, seed=3, scale=0.1)
    params = plan.shard(full, plan.plan(dit_spec(cfg), meshes), meshes)
    for v in params.values():
        v.requires_grad_(True)
    ids = [meshes.data_rank]
    batch = _batch(cfg, ids)
    sigma, noise = step.sample_noise(ids, tuple(batch["latents"].shape[1:]), seed=SEED, step=0, how=HOW)
    guidance = torch.full((1,), 6000.0) if cfg.guidance_embed else None
    loss = step.loss(params, batch, sigma, noise, cfg=cfg, meshes=meshes, guidance=guidance, blocks=blocks,
                     prepare=prepare)
    loss.backward()
    return step.global_mean(loss, meshes), {k: v.grad.full_tensor() for k, v in params.items()}


def _attention_runs(gm) -> int:
    """Attention forwards in a graph: direct, or wrapped by the RNG functionalization that
    AOTAutograd puts around recomputed random ops (run_and_save / run_with_rng_state)."""
    return sum(any(is_attention(t) for t in (n.target, *n.args[:2]) if callable(t))
               for n in gm.graph.nodes if n.op == "call_function")


def _count(gm, op: str) -> int:
    return sum(n.op == "call_function" and op in str(n.target) for n in gm.graph.nodes)


def _stats(graphs: dict) -> dict:
    return {f"{k}_{name}": [f(g) for g in graphs[k]] for k in ("fw", "bw")
            for name, f in (("attn", _attention_runs), ("gather", functools.partial(_count, op="all_gather")),
                            ("reduce_scatter", functools.partial(_count, op="reduce_scatter")))}


def _counting_backend(graphs: dict) -> CompileCounterWithBackend:
    """aot_eager that counts compiled frames and keeps the forward and backward graphs."""

    def keep(kind, gm, example_inputs):
        graphs[kind].append(gm)
        return boxed_nop(gm, example_inputs)

    return CompileCounterWithBackend(functools.partial(
        aot_eager, fw_compiler=functools.partial(keep, "fw"), bw_compiler=functools.partial(keep, "bw")))


def _worker(rank, world, preset, depth, out):
    cfg = DIT_PRESETS[preset].replace(mm_double_blocks_depth=depth, mm_single_blocks_depth=depth)
    results = {}
    for layout in LAYOUTS:
        meshes = build(ParallelConfig(**layout))
        eager = _grads(cfg, meshes, None)
        torch._dynamo.reset()
        graphs = {"fw": [], "bw": []}
        cnt = _counting_backend(graphs)
        prepare = gather.BlockGather(plan.tp_split(dit_spec(cfg)), meshes.cfg.sequence_parallel)
        blocks = make_blocks(prepare=prepare, recompute=RECOMPUTE, backend_fn=cnt, dtensor_params=True)
        compiled = _grads(cfg, meshes, blocks)
        results[str(layout)] = eager, compiled, dict(_stats(graphs), frames=cnt.frame_count)
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(results, f)


@pytest.mark.slow
@pytest.mark.parametrize("preset,depth", [("tiny-i2v", 2), ("tiny", 3)])
def test_compiled_sharded_step_equals_eager_and_keeps_attention(tmp, preset, depth):
    """dp_shard 2, cp 2, tp 2, tp 2 + sp; a full and a selective block of each kind (fp32, aot_eager)."""
    spawn(_worker, 2, preset, depth, str(tmp / "r.pkl"))
    with open(tmp / "r.pkl", "rb") as f:
        results = pickle.load(f)
    assert len(results) == len(LAYOUTS)
    for key, ((l_e, g_e), (l_c, g_c), s) in results.items():
        assert abs(l_c - l_e) <= 1e-5 * abs(l_e), key
        for k in g_e:
            assert float((g_c[k] - g_e[k]).norm() / g_e[k].norm().clamp_min(1e-12)) <= 1e-5, (key, k)
        # one graph per (block kind, mode) at depth 2 and 3, fullgraph=True (a break raises)
        assert s["frames"] == 4 and len(s["fw_attn"]) == len(s["bw_attn"]) == 4, (key, s)
        # every forward runs attention once; only the two "full" blocks' backwards run it again
        assert s["fw_attn"] == [1, 1, 1, 1] and sorted(s["bw_attn"]) == [0, 0, 1, 1], (key, s)
        # the gathers are graph nodes, replayed by the recompute, their reduce-scatters too
        assert min(s["fw_gather"]) > 0 and min(s["bw_gather"]) > 0 and min(s["bw_reduce_scatter"]) > 0, (key, s)


R, S0, S1 = Replicate(), Shard(0), Shard(1)
# (parallel layout on 4 ranks, leaf name as a block sees it, shape, storage placements
# (dp_replicate, fsdp, tp), tp compute split)
LEAVES = [
    # fsdp x tp nested, both uneven (3 rows over 2, 5 columns over 2); tp only stores it split
    (dict(dp_shard=2, tp=2), "txt_in.w", (3, 5), (R, S0, S1), False),
    # per-head norm weights: gradients partial over tp too (plan._TP_PARTIAL)
    (dict(dp_shard=2, tp=2), "img_attn_q_norm.weight", (5, 3), (R, S1, S0), False),
    # a tp compute split stays split; 1 row over 2 fsdp ranks leaves one of them empty
    (dict(dp_shard=2, tp=2), "img_attn_qkv.weight", (1, 6), (R, S0, S1), True),
    # HSDP: replicated over dp_replicate (backward all-reduce), uneven over fsdp
    (dict(dp_replicate=2, dp_shard=2), "img_in.w", (5, 3), (R, S0, R), False),
    (dict(dp_replicate=2, dp_shard=2), "img_in.b", (3,), (R, R, R), False),
]


def _bf16_gather_errors(run, split) -> list:
    """Cast before the gather: bf16 all-gathers, fp32 reductions, results as a cast after
    plan.gather's fp32 gather (values exact, fp32 gradients)."""
    bf16, seen = torch.bfloat16, []
    ref = run(lambda p: {k: v.to(bf16) for k, v in plan.gather_tree(p, split=split).items()})
    names = ("_all_gather_on", "_reduce_scatter_on", "_all_reduce_on")
    saved = {n: getattr(gather, n) for n in names}

    def spy(name):
        def call(x, *args, **kwargs):
            seen.append((name, x.dtype))
            return saved[name](x, *args, **kwargs)
        return call

    for n in names:
        setattr(gather, n, spy(n))
    try:
        vals, grads = run(lambda p: gather.gather(*gather.shards(p, split=split), {k: bf16 for k in p}))
    finally:
        for n in names:
            setattr(gather, n, saved[n])
    errors = [("bf16", k, "value") for k in vals if not (vals[k].dtype == bf16 and torch.equal(vals[k], ref[0][k]))]
    errors += [("bf16", k, "grad") for k in grads if not (grads[k].dtype == torch.float32 and float(
        (grads[k] - ref[1][k]).norm() / ref[1][k].norm()) <= 1e-6)]
    errors += [("bf16 collective", s) for s in seen if s not in (("_all_gather_on", bf16),
                                                                ("_reduce_scatter_on", torch.float32),
                                                                ("_all_reduce_on", torch.float32))]
    return errors + ([] if {n for n, _ in seen} >= {"_all_gather_on", "_reduce_scatter_on"} else [("bf16 spies", seen)])


def _gather_worker(rank, world, out):
    with deprecations_are_errors():  # torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor
        errors = _gather_errors()
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(errors, f)


def _gather_errors() -> list:
    errors = []
    for par in ({"dp_shard": 2, "tp": 2}, {"dp_replicate": 2, "dp_shard": 2}):
        meshes = build(ParallelConfig(**par))
        leaves = {name: (shape, pl, split) for lay, name, shape, pl, split in LEAVES if lay == par}
        split = frozenset(k for k, (_, _, s) in leaves.items() if s)
        c = meshes.storage.get_coordinate()
        # rank-dependent weights make partial gradients; equal on tp ranks unless the leaf sums over tp
        seeds = {k: 1000 * i + 100 * c[0] + 10 * c[1] + (c[2] if s or "norm" in k else 0)
                 for i, (k, (_, _, s)) in enumerate(leaves.items())}

        def run(prepare):
            params = {k: distribute_tensor(torch.arange(1.0, 1 + math.prod(shape)).reshape(shape), meshes.storage,
                                           pl, src_data_rank=None).requires_grad_(True)
                      for k, (shape, pl, _) in leaves.items()}
            got = prepare(params)
            sum((v * torch.randn(v.shape, generator=torch.Generator().manual_seed(seeds[k]))).sum()
                for k, v in got.items()).backward()
            return {k: v.detach() for k, v in got.items()}, {k: v.grad.full_tensor() for k, v in params.items()}

        ref = run(functools.partial(plan.gather_tree, split=split))
        torch._dynamo.reset()
        inner = torch.compile(with_recompute(gather.gather, "full"), backend="aot_eager", fullgraph=True)
        for label, fn in (("eager", gather.gather), ("compiled", inner)):
            vals, grads = run(lambda p: fn(*gather.shards(p, split=split)))
            errors += [(label, k, "value") for k in vals if not torch.equal(vals[k], ref[0][k])]
            errs = {k: float((grads[k] - ref[1][k]).norm() / ref[1][k].norm()) for k in grads}
            errors += [(label, k, "grad", e) for k, e in errs.items() if not e <= 1e-6]  # sums in another order
        errors += _bf16_gather_errors(run, split)
        if par.get("tp"):  # two axes sharding one dim: refused up front, not gathered wrong
            nested = distribute_tensor(torch.ones(4, 4), meshes.storage, (R, S0, S0), src_data_rank=None)
            try:
                gather.shards({"w": nested}, split=frozenset())
                errors.append(("no error for", nested.placements))
            except ValueError as e:
                errors += [] if "w: storage placements" in str(e) else [("message", str(e))]
    return errors


def test_in_graph_gather_equals_dtensor_gather(tmp):
    """Uneven, empty, nested (fsdp x tp) and HSDP shards: values exact, gradients as plan.gather's;
    fp32 and cast to bf16 before the gather; no deprecation warning (eager c10d, traced funcol)."""
    spawn(_gather_worker, 4, str(tmp / "e"))
    for r in range(4):
        with open(tmp / f"e.{r}", "rb") as f:
            assert pickle.load(f) == [], r


def _inductor_worker(rank, world, out):
    cfg = DIT_PRESETS["tiny"]
    meshes = build(ParallelConfig(dp_shard=2))
    prepare = gather.BlockGather(plan.tp_split(dit_spec(cfg)), meshes.cfg.sequence_parallel)
    eager = _grads(cfg, meshes, None)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("inductor")
    blocks = make_blocks(prepare=prepare, recompute=Recompute(selective=True), backend_fn=cnt, dtensor_params=True)
    compiled = _grads(cfg, meshes, blocks)
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump((eager, compiled, cnt.frame_count), f)


@pytest.mark.slow
def test_inductor_sharded_step_equals_eager(tmp):
    """The real compiler on a sharded step (the in-graph FSDP gather + selective recompute,
    dp_shard 2): 2 graphs compiled by Inductor per rank, the rest of the file uses aot_eager."""
    spawn(_inductor_worker, 2, str(tmp / "r.pkl"))
    with open(tmp / "r.pkl", "rb") as f:
        (l_e, g_e), (l_c, g_c), frames = pickle.load(f)
    assert frames == 2  # a double and a single block graph, fullgraph=True
    assert abs(l_c - l_e) <= 1e-5 * abs(l_e)
    assert max(float((g_c[k] - g_e[k]).norm() / g_e[k].norm().clamp_min(1e-12)) for k in g_e) <= 1e-5


def _bf16_worker(rank, world, out):
    """The default training precision on a mesh: training's gather (cast, then all-gather)
    against a cast after plan.gather's fp32 gather, eager and compiled blocks."""
    cfg, bf16 = DIT_PRESETS["tiny-i2v"], Precision(compute="bf16")
    results = {}
    for layout in (dict(dp_shard=2), dict(dp_shard=1, tp=2, sequence_parallel=True)):
        meshes = build(ParallelConfig(**layout))
        split, sp = plan.tp_split(dit_spec(cfg)), meshes.cfg.sequence_parallel
        ours = gather.BlockGather(split, sp, policy=bf16)
        ref = _grads(cfg, meshes, None, prepare=lambda p: cast(plan.gather_tree(p, split=split, sp=sp), bf16))
        eager = _grads(cfg, meshes, None, prepare=ours)
        torch._dynamo.reset()
        blocks = make_blocks(prepare=ours, recompute=RECOMPUTE, compile=Compile(backend="aot_eager"),
                             dtensor_params=True)
        results[str(layout)] = ref, eager, _grads(cfg, meshes, blocks, prepare=ours)
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(results, f)


def test_bf16_sharded_step_gathers_in_bf16_with_the_same_results(tmp):
    spawn(_bf16_worker, 2, str(tmp / "r.pkl"))
    with open(tmp / "r.pkl", "rb") as f:
        results = pickle.load(f)
    for key, ((l_r, g_r), (l_e, g_e), (l_c, g_c)) in results.items():
        assert l_e == l_r, key  # cast and gather commute: the same bf16 weights, the same ops
        assert all(g_e[k].dtype == torch.float32 and torch.allclose(g_e[k], g_r[k], rtol=1e-6, atol=0)
                   for k in g_r), key  # fp32 reductions, summed in another order
        # compiled (aot_eager: the same ops) vs eager bf16: the loss and every gradient are bit-equal
        # except those of the modulation-vector embedders, whose bf16 gradient sums over all blocks
        # in another order (measured: 2.7e-3 to 4.7e-3 relative, both layouts)
        assert l_c == l_e, key
        vec = [k for k in g_e if k.startswith(("time_in.", "vector_in.", "guidance_in."))]
        assert all(torch.equal(g_c[k], g_e[k]) for k in g_e if k not in vec), key
        assert max(float((g_c[k] - g_e[k]).norm() / g_e[k].norm()) for k in vec) <= 7e-3, key


def test_compiled_dtensor_blocks_need_a_sharded_prepare():
    with pytest.raises(ValueError, match="BlockGather"):
        make_blocks(prepare=lambda p: p, compile=Compile(backend="aot_eager"), dtensor_params=True)
