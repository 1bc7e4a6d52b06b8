"""Recompute changes memory and work, never results: measured peak memory and attention calls."""

import collections

import pytest
import torch
from conftest import dit_inputs, random_params
from torch.utils._python_dispatch import TorchDispatchMode

from graphs.blocks import Compile, Recompute, make_blocks
from graphs.memory import held_memory, peak_memory
from hvfunc import dit
from hvfunc.config import DIT_PRESETS


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name:
            self.n["backward" if "backward" in name else "forward"] += 1
        return func(*args, **(kwargs or {}))


def test_recompute_cuts_memory_keeps_results_and_selective_keeps_attention():
    cfg = DIT_PRESETS["tiny"].replace(hidden_size=128, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=3,
                                      mm_single_blocks_depth=4)
    params = {k: v.requires_grad_(True) for k, v in random_params(cfg, scale=0.05).items()}
    inp = dit_inputs(cfg, T=4, H=16, W=16)
    blocks_total = cfg.mm_double_blocks_depth + cfg.mm_single_blocks_depth

    def step(rc):
        def run():
            for v in params.values():
                v.grad = None
            loss = dit.forward(params, **inp, cfg=cfg, blocks=make_blocks(recompute=rc)).square().mean()
            loss.backward()
            return loss.detach()
        return run

    out = {}
    for name, rc in (("none", Recompute()), ("full", Recompute(double_full=3, single_full=4)),
                     ("selective", Recompute(selective=True)),
                     ("offload", Recompute(double_full=1, selective=True, offload=True))):
        loss, peak = peak_memory(step(rc))  # gradients of the weights are the same size in every mode
        grads = {k: v.grad.clone() for k, v in params.items()}
        with _CountAttention() as count:
            step(rc)()
        out[name] = (loss, grads, peak, count.n)
    loss0, grads0, peak0, n0 = out["none"]
    for name in ("full", "selective", "offload"):
        loss, grads, peak, n = out[name]
        assert torch.equal(loss, loss0)
        assert all(torch.allclose(grads[k], grads0[k], rtol=1e-5, atol=1e-7) for k in grads0), name
        assert peak < 0.5 * peak0, (name, peak, peak0)
    refiner = cfg.text_refiner_depth
    assert out["full"][3]["forward"] == refiner + 2 * blocks_total  # blocks recompute their attention
    assert out["selective"][3]["forward"] == n0["forward"] == refiner + blocks_total  # kept, not redone
    assert out["offload"][3]["forward"] == n0["forward"] + 1  # kept (copied out and back), but block 0's is redone


def test_selective_keeps_exactly_the_attention_outputs():
    """Held after the forward: selective = full + one [B, L, D] attention output per block
    (+ its small log-sum-exp); offload on CPU copies them (the host is the device here)."""
    cfg = DIT_PRESETS["tiny"].replace(hidden_size=128, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=2,
                                      mm_single_blocks_depth=3)
    params = {k: v.requires_grad_(True) for k, v in random_params(cfg, scale=0.05).items()}
    inp = dit_inputs(cfg, B=1, lens=(12,), T=4, H=16, W=16)
    held = {}  # "full" twice: the first call also allocates one-time buffers
    for name, rc in (("full", Recompute(double_full=2, single_full=3)), ("selective", Recompute(selective=True)),
                     ("offload", Recompute(selective=True, offload=True)), ("full", Recompute(double_full=2,
                                                                                              single_full=3))):
        out, held[name] = held_memory(lambda: dit.forward(params, **inp, cfg=cfg, blocks=make_blocks(recompute=rc)))
    kept = 5 * (4 * 8 * 8 + 12) * cfg.hidden_size * 4
    assert kept <= held["selective"] - held["full"] <= 1.1 * kept, (held, kept)
    assert held["offload"] == held["selective"]


def test_offload_needs_selective():
    with pytest.raises(ValueError, match="selective"):
        make_blocks(recompute=Recompute(offload=True)).double(0)


def test_compiled_offload_moves_only_what_the_graph_saves_besides_its_inputs():
    """Compiled selective blocks keep the attention output [B, N, L, K] and its log-sum-exp
    [B, N, L]; offload_saved copies exactly those (CPU: a plain copy) with their strides,
    results unchanged."""
    from graphs import recompute

    cfg = DIT_PRESETS["tiny"]
    params = {k: v.requires_grad_(True) for k, v in random_params(cfg).items()}
    inp = dit_inputs(cfg, B=1, lens=(12,), T=2, H=8, W=8)
    L, N, K = 2 * 4 * 4 + 12, cfg.heads_num, cfg.head_dim
    copied, down = [], recompute._Store.down

    def spy(self, t):
        copied.append(tuple(t.shape))
        out = down(self, t)
        assert out.stride() == t.stride() and out.data_ptr() != t.data_ptr()  # Inductor's backward asserts strides
        return out

    def run(rc, backend):
        torch._dynamo.reset()
        for v in params.values():
            v.grad = None
        out = dit.forward(params, **inp, cfg=cfg, blocks=make_blocks(recompute=rc, compile=Compile(backend=backend)))
        out.square().mean().backward()
        return out.detach(), {k: v.grad.clone() for k, v in params.items()}

    ref = run(Recompute(), "none")
    recompute._Store.down = spy
    try:
        got = run(Recompute(selective=True, offload=True), "aot_eager")
    finally:
        recompute._Store.down = down
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(got[1][k], ref[1][k], rtol=1e-5, atol=1e-7) for k in ref[1])
    blocks = cfg.mm_double_blocks_depth + cfg.mm_single_blocks_depth
    assert sorted(copied) == sorted([(1, N, L, K), (1, N, L)] * blocks), copied
