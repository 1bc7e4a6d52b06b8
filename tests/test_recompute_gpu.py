"""Attention-output offload on CUDA: the kept outputs leave the device, results do not change."""

import pytest
import torch
from conftest import dit_inputs, random_params
from reference import rel_err

from graphs.blocks import Compile, Recompute, make_blocks
from graphs.memory import held_memory
from hvfunc import dit
from hvfunc.config import DIT_PRESETS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["none", "inductor"])
def test_offload_moves_the_kept_attention_outputs_off_the_device(backend):
    cfg = DIT_PRESETS["tiny"].replace(hidden_size=256, heads_num=4, rope_dim_list=(16, 24, 24),
                                      mm_double_blocks_depth=4, mm_single_blocks_depth=8)
    params = {k: v.cuda().requires_grad_(True) for k, v in random_params(cfg, scale=0.05).items()}
    inp = {k: v.cuda() if isinstance(v, torch.Tensor) else v
           for k, v in dit_inputs(cfg, B=1, lens=(12,), T=8, H=32, W=32).items()}
    results = {}
    for name, rc in (("selective", Recompute(selective=True)), ("offload", Recompute(selective=True, offload=True))):
        for v in params.values():
            v.grad = None
        blocks = make_blocks(recompute=rc, compile=Compile(backend=backend))
        out, held = held_memory(lambda: dit.forward(params, **inp, cfg=cfg, blocks=blocks), device="cuda")
        out.square().mean().backward()
        results[name] = (out.detach(), {k: v.grad.clone() for k, v in params.items()}, held)
    (o_s, g_s, held_s), (o_o, g_o, held_o) = results["selective"], results["offload"]
    assert rel_err(o_o, o_s) <= 1e-6
    assert max(rel_err(g_o[k], g_s[k]) for k in g_s) <= 1e-6
    kept = (cfg.mm_double_blocks_depth + cfg.mm_single_blocks_depth) * (8 * 16 * 16 + 12) * cfg.hidden_size * 4
    print(f"held after forward: selective {held_s / 2**20:.1f} MiB, offload {held_o / 2**20:.1f} MiB, "
          f"attention outputs {kept / 2**20:.1f} MiB")
    assert held_o <= held_s - 0.9 * kept
