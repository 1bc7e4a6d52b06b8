"""The memory planner: live-byte counting against the CPU allocator, the composed activation
peak against a real CPU training step, weight bytes against the spec, invariants of the search,
and the CLI (scripts/plan_memory.py fit)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphs import fp8
from graphs.blocks import make_blocks
from graphs.fake_memory import LiveBytes, fake_mode
from graphs.memory import held_memory, peak_memory
from graphs.recompute import Recompute
from hvfunc import dit
from hvfunc.config import DIT_PRESETS, dit_preset
from hvfunc.dit_spec import dit_spec
from hvfunc.lora import LoraConfig, lora_spec
from hvfunc.params import count, sub
from parallel import memory_fit as mf

ROOT = Path(__file__).resolve().parents[1]
TINY = DIT_PRESETS["tiny"].replace(hidden_size=128, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=2,
                                   mm_single_blocks_depth=2)
BF16 = torch.bfloat16
RC = {"none": Recompute(), "selective": Recompute(selective=True),
      "full": Recompute(double_full=TINY.mm_double_blocks_depth, single_full=TINY.mm_single_blocks_depth)}
CPU_RNG_STATE = torch.get_rng_state().numel()  # a checkpoint saves it outside any op: not a dispatched allocation


def _block_run(mode: str, live: LiveBytes | None):
    """One double block forward + backward (fp32 masters cast to bf16 inside), measured by `live`
    or, when None, by the CPU allocator's events (graphs.memory)."""
    spec = {k: s for k, s in dit_spec(TINY).items() if k.startswith("double_blocks.0.")}
    p = sub({k: torch.ones(s.shape).requires_grad_(True) for k, s in spec.items()}, "double_blocks.0.")
    for v in p.values():
        v.grad = torch.zeros_like(v)
    L, D = 3 * 8 * 8, TINY.hidden_size
    img, txt, vec = (torch.ones(*s, dtype=BF16).requires_grad_(True) for s in ((1, L, D), (1, 32, D), (1, D)))
    rope = (torch.ones(L, TINY.head_dim // 2), torch.zeros(L, TINY.head_dim // 2))
    fn = make_blocks(prepare=lambda q: {k: v.to(BF16) for k, v in q.items()}, recompute=RC[mode]).double(0)

    def fwd():
        return fn(p, img, txt, vec, rope=rope, kv_len=None, cfg=TINY, attn=dit.sdpa)

    def step():
        out = fwd()
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])

    if live is None:
        return held_memory(fwd)[1], peak_memory(step)[1]
    with live:
        out = fwd()
        held = live.level
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    return held, live.peak


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_live_bytes_on_fake_tensors_equal_real_ones_and_the_cpu_allocator(mode):
    real = _block_run(mode, LiveBytes())
    with fake_mode():
        fake = _block_run(mode, LiveBytes())
    assert fake == real
    held, peak = _block_run(mode, None)
    assert held - (CPU_RNG_STATE if mode != "none" else 0) == real[0]
    assert real[1] <= peak <= 1.05 * real[1]  # kernels' scratch buffers (attention) are not dispatched ops


def _real_step_peak(q: mf.Query, mode: str) -> int:
    """A training step of the tiny model as the trainer runs it (fp32 masters with their grads, bf16
    frozen base, cast per block inside the checkpoint), its peak from the CPU allocator."""
    spec = dit_spec(q.cfg) | (lora_spec(q.cfg, LoraConfig(rank=q.lora_rank, alpha=float(q.lora_rank)))
                              if q.lora_rank else {})
    g = torch.Generator().manual_seed(0)
    params = {}
    for k, s in spec.items():
        trains = q.workload == "full" or ".lora_" in k
        v = (0.02 * torch.randn(s.shape, generator=g)).to(torch.float32 if trains else BF16)
        if trains:
            v.requires_grad_(True).grad = torch.zeros_like(v)
        params[k] = v
    blocks = make_blocks(prepare=lambda p: {k: v.to(BF16) for k, v in p.items()}, recompute=RC[mode])
    T, H, W = q.shape.grid(q.cfg)

    def step():
        x = torch.randn(1, 16, T, 2 * H, 2 * W, generator=g)
        inp = dict(x=x, t=torch.full((1,), 500.0), text_states=torch.randn(1, 256, q.cfg.text_states_dim, generator=g),
                   text_mask=torch.ones(1, 256, dtype=torch.long), guidance=torch.full((1,), 1000.0),
                   text_states_2=torch.randn(1, q.cfg.text_states_dim_2, generator=g))
        outer = {k: v.to(BF16) for k, v in params.items() if not k.startswith(("double_blocks.", "single_blocks."))}
        e = dit.embed(outer, **inp, cfg=q.cfg, layout=dit.TextLayout(256, True))
        img = dit.run_blocks(params, e, cfg=q.cfg, attn=dit.sdpa, blocks=blocks)
        out = dit.unpatchify(dit.final_layer(outer, img, e.vec), e.grid, q.cfg.patch_size)
        (out.float() - torch.randn(x.shape, generator=g)).square().mean().backward()

    return peak_memory(step)[1]


@pytest.mark.parametrize("workload", ["full", "lora-r32"])
def test_composed_activation_peak_predicts_a_real_cpu_training_step(workload):
    q = mf.Query(cfg=TINY, workload=workload, shape=mf.Shape.parse("128x192x9"))
    for mode in ("none", "selective", "full"):
        predicted, host = mf.activations(q, mf.Setting(recompute=mode))
        real = _real_step_peak(q, mode)
        assert host == 0
        assert 0.97 * real <= predicted <= 1.05 * real, (mode, predicted, real)


def test_weight_bytes_follow_the_spec():
    cfg = dit_preset("hunyuan-video-t2v")
    spec = dit_spec(cfg)
    assert mf.stored_bytes(cfg, mf.Setting()) == (2 * count(spec), 0)
    linears = {k: s for k, s in spec.items() if fp8.is_block_linear(k, torch.empty(s.shape, device="meta"))}
    n, rows = sum(math.prod(s.shape) for s in linears.values()), sum(math.prod(s.shape[:-1]) for s in linears.values())
    assert mf.stored_bytes(cfg, mf.Setting(fp8=True)) == (2 * count(spec) - n + 4 * rows, 0)  # 1 byte + row scales
    all_swapped = mf.stored_bytes(cfg, mf.Setting(swap=60))
    blocks = {k: s for k, s in spec.items() if k.startswith(("double_blocks.", "single_blocks."))}
    outer, largest = 2 * (count(spec) - count(blocks)), 2 * count({k: s for k, s in blocks.items()
                                                                  if k.startswith("double_blocks.0.")})
    assert all_swapped[0] - outer == pytest.approx(2 * largest, rel=1e-3)  # the ring; leaves 256-byte aligned
    assert all_swapped[1] == pytest.approx(2 * count(blocks), rel=1e-3)


def test_more_swap_never_raises_the_prediction_and_fp8_and_recompute_order():
    q = mf.Query(cfg=dit_preset("hunyuan-video-t2v"), workload="sample", shape=mf.Shape.parse("512x512x33"))
    for f in (False, True):
        peaks = [mf.predict(q, s).peak for s in q.settings() if s.fp8 == f]
        assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]
    lora = mf.Query(cfg=TINY, workload="lora-r32", shape=mf.Shape.parse("128x192x9"))
    act = [mf.activations(lora, mf.Setting(recompute=m))[0] for m in mf.RECOMPUTE]
    assert act[0] > act[1] >= act[2] and act[2] == act[3]  # offload keeps on the device what full keeps
    assert mf.activations(lora, mf.Setting(recompute="offload"))[1] > 0 == mf.activations(lora, mf.Setting())[1]


def test_cheapest_setting_fits_and_is_first_in_cost_order():
    q = mf.Query(cfg=dit_preset("hunyuan-video-t2v"), workload="sample", shape=mf.Shape.parse("512x512x33"))
    a = mf.fit(q, 24)
    order = q.settings()
    first = next(s for s in order if mf.fits(mf.predict(q, s), 24, None))
    assert a.chosen.setting == first and a.chosen.peak <= 24 * mf.GiB < a.plain.peak
    assert mf.fit(q, 0.5).chosen is None


def test_cli_prints_the_cheapest_setting_and_bad_shapes_are_value_errors():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_memory.py"), "fit", "--device-gb", "24",
                        "--workload", "sample", "--shape", "512x512x33"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = dit_preset("hunyuan-video-t2v")
    a = mf.fit(mf.Query(cfg=cfg, workload="sample", shape=mf.Shape.parse("512x512x33")), 24)
    row = next(line for line in r.stdout.splitlines() if line.startswith("| cheapest:"))
    assert a.chosen.setting.flags(cfg) in row and row.split("|")[6].strip() == f"{a.chosen.peak / mf.GiB:.1f}"
    assert "9 x 32 x 32 = 9,216 video" in r.stdout
    for bad, why in (("512x500x33", "multiples of 16"), ("512x512x32", "4k \\+ 1"), ("512x512", "HEIGHTxWIDTHxFRAMES")):
        with pytest.raises(ValueError, match=why):
            mf.Shape.parse(bad)  # tests/test_cli_errors.py: the script turns it into one line, exit 2
