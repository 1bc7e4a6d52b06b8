"""Compiled and recomputed blocks give eager results; compiles do not grow with depth."""

import pytest
import torch
from conftest import dit_inputs, random_params
from reference import rel_err
from torch._dynamo.testing import CompileCounterWithBackend

from graphs.blocks import Compile, Recompute, make_blocks
from hvfunc import dit
from hvfunc.config import DIT_PRESETS

TOL = 1e-5


def _fwd_bwd(cfg, params, inp, blocks=None):
    for v in params.values():
        v.grad = None
    out = dit.forward(params, **inp, cfg=cfg, **({"blocks": blocks} if blocks else {}))
    out.square().mean().backward()
    return out.detach(), {k: v.grad.clone() for k, v in params.items()}


def _close(a, b):
    (oa, ga), (ob, gb) = a, b
    assert rel_err(oa, ob) <= TOL
    worst = max(float((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-12)) for k in gb)
    assert worst <= TOL, worst


@pytest.mark.parametrize("recompute", [Recompute(), Recompute(double_full=1, single_full=2, selective=True)])
def test_compile_count_independent_of_depth_and_matches_eager(recompute):
    counts = []
    for depth in ((2, 3), (4, 6)):  # both recompute modes occur at either depth
        torch._dynamo.reset()
        cfg = DIT_PRESETS["tiny-i2v"].replace(mm_double_blocks_depth=depth[0], mm_single_blocks_depth=depth[1])
        params = {k: v.requires_grad_(True) for k, v in random_params(cfg).items()}
        inp = dit_inputs(cfg)
        cnt = CompileCounterWithBackend("aot_eager")
        got = _fwd_bwd(cfg, params, inp, make_blocks(recompute=recompute, backend_fn=cnt))  # fullgraph=True
        _close(got, _fwd_bwd(cfg, params, inp))
        counts.append(cnt.frame_count)
    assert counts[0] == counts[1] <= 4, counts


def test_recompute_modes_equal_plain_eager():
    cfg = DIT_PRESETS["tiny"]
    params = {k: v.requires_grad_(True) for k, v in random_params(cfg).items()}
    inp = dit_inputs(cfg)
    ref = _fwd_bwd(cfg, params, inp)
    for rc in (Recompute(double_full=2, single_full=2), Recompute(selective=True)):
        _close(_fwd_bwd(cfg, params, inp, make_blocks(recompute=rc)), ref)


@pytest.mark.slow
def test_inductor_train_step_matches_eager():
    """One real Inductor compile (CPU): forward + backward with selective recompute."""
    torch._dynamo.reset()
    cfg = DIT_PRESETS["tiny"]
    params = {k: v.requires_grad_(True) for k, v in random_params(cfg).items()}
    inp = dit_inputs(cfg, lens=(12, 12))
    blocks = make_blocks(recompute=Recompute(selective=True), compile=Compile(backend="inductor"))
    _close(_fwd_bwd(cfg, params, inp, blocks), _fwd_bwd(cfg, params, inp))


def test_precision_policy_casts_leaves_and_returns_fp32_grads():
    from graphs.precision import Precision, cast

    cfg = DIT_PRESETS["tiny"]
    params = {k: v.requires_grad_(True) for k, v in random_params(cfg).items()}
    policy = Precision(compute="bf16", fp32_leaves=r"(_mod|modulation)\.linear")
    low = cast(params, policy)
    assert low["double_blocks.0.img_mod.linear.weight"].dtype == torch.float32
    assert low["double_blocks.0.img_attn_qkv.weight"].dtype == torch.bfloat16
    out = dit.forward(low, **dit_inputs(cfg), cfg=cfg)
    out.float().square().mean().backward()
    assert all(v.grad is not None and v.grad.dtype == torch.float32 for v in params.values())


def test_attention_backends_by_name():
    import importlib.util

    from graphs.backends import attention_backend
    from hvfunc import attention

    assert attention_backend("sdpa") is attention.sdpa
    with pytest.raises(ValueError, match="choose one of"):
        attention_backend("nope")
    if importlib.util.find_spec("torch_npu") is None:
        with pytest.raises(ValueError, match="torch_npu"):
            attention_backend("npu")


def test_torchair_compiler_config_is_set_from_options():
    """--compile.options reach torchair's CompilerConfig (here a stand-in with its documented
    attribute tree: mode, experimental_config.*, debug.graph_dump.*); mistakes fail up front."""
    import importlib.util
    from types import SimpleNamespace as NS

    from graphs.backends import apply_options, torchair_backend
    from graphs.blocks import Compile

    config = NS(mode="max-autotune", experimental_config=NS(frozen_parameter=False, tiling_schedule_optimize=False),
                debug=NS(graph_dump=NS(type=None)), ge_config=NS(export_compile_stat=1))
    apply_options(config, ("mode=reduce-overhead", "experimental_config.frozen_parameter=True",
                           "debug.graph_dump.type=pbtxt", "ge_config.export_compile_stat=2"))
    assert config.mode == "reduce-overhead" and config.experimental_config.frozen_parameter is True
    assert config.debug.graph_dump.type == "pbtxt" and config.ge_config.export_compile_stat == 2
    with pytest.raises(ValueError, match="experimental_config has no setting 'frozen_params'"):
        apply_options(config, ("experimental_config.frozen_params=True",))
    with pytest.raises(ValueError, match="has no setting 'nope'"):
        apply_options(config, ("nope.x=1",))
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        apply_options(config, ("mode",))
    with pytest.raises(ValueError, match="Inductor mode"):
        Compile(backend="aot_eager", mode="max-autotune")
    with pytest.raises(ValueError, match="configure torchair"):
        Compile(backend="inductor", options=("mode=reduce-overhead",))
    Compile(backend="torchair", options=("mode=reduce-overhead",))
    if importlib.util.find_spec("torchair") is None:
        with pytest.raises(ValueError, match="needs the package 'torchair'"):
            torchair_backend(("mode=reduce-overhead",))


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_training_buckets_stop_recompiling_after_the_second_shape(name):
    """Compile(dynamic=None), the training default: the second bucket shape makes the
    changed dims dynamic, later shapes (frames, sizes, text lengths) reuse those graphs;
    static shapes (sampling) compile once per shape."""
    cfg = DIT_PRESETS[name]
    params = {k: v.requires_grad_(True) for k, v in random_params(cfg).items()}
    shapes = [(3, 8, 6, 12, (5, 9)), (2, 8, 8, 10, (7, 10)), (4, 6, 10, 12, (3, 12)), (3, 10, 6, 9, (9, 4))]
    counts = {}
    for dynamic in (None, False):
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        blocks = make_blocks(compile=Compile(dynamic=dynamic), backend_fn=cnt, recompute=Recompute(selective=True))
        counts[dynamic] = []
        for T, H, W, S, lens in shapes:
            _fwd_bwd(cfg, params, dit_inputs(cfg, T=T, H=H, W=W, S=S, lens=lens), blocks)
            counts[dynamic].append(cnt.frame_count)
    assert counts[None][1] == counts[None][2] == counts[None][3], counts
    assert counts[False] == [2, 4, 6, 8], counts


def test_adapter_leaves_ride_through_prepare_into_the_same_compiled_blocks():
    """LoRA-style extra leaves need no second block code path: `prepare` (where the FSDP
    gather and the precision cast live) merges W + up @ down before the pure block runs,
    inside the compiled region. Same number of graphs; equal to the plain model with
    pre-merged weights; gradients reach only the adapter leaves."""
    cfg = DIT_PRESETS["tiny"]
    base = random_params(cfg)
    g = torch.Generator().manual_seed(3)
    adapters = {}
    for k, v in base.items():
        if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(("mlp.fc1.weight", "linear1_mlp.weight")):
            stem = k[: -len(".weight")]
            adapters[f"{stem}.lora_down.weight"] = (torch.randn(4, v.shape[1], generator=g) * 0.1).requires_grad_(True)
            adapters[f"{stem}.lora_up.weight"] = (torch.randn(v.shape[0], 4, generator=g) * 0.1).requires_grad_(True)

    def merge(p):
        out = {k: v for k, v in p.items() if ".lora_" not in k}
        for k in [k for k in p if k.endswith(".lora_down.weight")]:
            stem = k[: -len(".lora_down.weight")]
            out[f"{stem}.weight"] = p[f"{stem}.weight"] + p[f"{stem}.lora_up.weight"] @ p[k]
        return out

    params, inp = base | adapters, dit_inputs(cfg)
    outer = {k: v for k, v in params.items() if not k.startswith(("double_blocks.", "single_blocks."))}
    merged = merge({k: v.detach() for k, v in params.items()})
    with torch.no_grad():
        want = dit.forward(merged, **inp, cfg=cfg)
    results, counts = [], []
    for c in (None, CompileCounterWithBackend("aot_eager")):
        torch._dynamo.reset()
        blocks = make_blocks(prepare=merge, recompute=Recompute(selective=True), backend_fn=c)
        for v in adapters.values():
            v.grad = None
        out = dit.forward(outer | {k: v for k, v in params.items() if k not in outer}, **inp, cfg=cfg, blocks=blocks)
        out.square().mean().backward()
        results.append((out.detach(), {k: v.grad.clone() for k, v in adapters.items()}))
        counts.append(c.frame_count if c else None)
    assert rel_err(results[0][0], want) <= TOL and rel_err(results[1][0], want) <= TOL
    assert all(rel_err(results[1][1][k], results[0][1][k]) <= TOL for k in adapters)
    assert all(not v.requires_grad for v in base.values())
    torch._dynamo.reset()
    plain = CompileCounterWithBackend("aot_eager")
    dit.forward(merged, **inp, cfg=cfg, blocks=make_blocks(recompute=Recompute(selective=True), backend_fn=plain))
    # one graph more than the plain model: with frozen embedders the first block's input needs
    # no gradient and the later blocks' inputs do (a guard on requires_grad), at any depth
    assert counts[1] == plain.frame_count + 1
