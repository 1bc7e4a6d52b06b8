"""Block swap and fp8 weight storage (graphs/swap.py, graphs/fp8.py) on CPU: the swapped path
samples the resident path's latents bit for bit (T2V, I2V, eager and compiled blocks), the
copies run one swapped block ahead and each block computes with its own weights; fp8's
error stays within the e4m3 bound, its bytes are half of bf16; the --memory.* flags. With cp 2
(Ulysses over 2 ranks) swap and fp8 + swap sample what cp 2 resident and cp 2 fp8 do: `cp2_runs`,
run inside tests/test_swap_train.py's 2-rank process group (no spawn of its own)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_params
from reference import rel_err
from test_sample import B, H, T, W, _conds
from test_sample_cli import _main, cli
from torch._dynamo.testing import CompileCounterWithBackend

from graphs import fp8, sampling
from graphs.swap import MemoryConfig, block_prefixes, store
from hvfunc import dit, sample
from hvfunc.cache import CacheStats, StepCache
from hvfunc.config import DIT_PRESETS
from hvfunc.params import sub

pytestmark = pytest.mark.skipif(fp8.FP8 is None, reason="torch without float8_e4m3fn")


def _sample(cfg, params, *, stored=None, backend="none", steps=2, blocks=None, backend_fn=None):
    """Real-CFG sampling of tiny latents (I2V: image latents too) through graphs.sampling or, with
    `blocks`, hvfunc.sample.denoise with those blocks."""
    cond, uncond = _conds(cfg)
    g = torch.Generator().manual_seed(2)
    noise, z = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 16, 1, H, W, generator=g)
    kw = {"cfg": cfg, "sampling": sample.Sampling(steps=steps, cfg_scale=3.0),
          "image_latents": z if cfg.i2v_condition_type else None}
    if blocks is not None:
        return sample.denoise(params, noise, cond, uncond, blocks=blocks, **kw)
    return sampling.denoise(params, noise, cond, uncond, graphs=sampling.SampleGraphs(backend=backend),
                            stored=stored, backend_fn=backend_fn, **kw)


@pytest.mark.parametrize("model,backend,n", [("tiny", "none", 3), ("tiny-i2v", "none", 4),
                                             ("tiny", "aot_eager", 4), ("tiny-i2v", "aot_eager", 2)])
def test_swapped_sampling_equals_resident_bit_for_bit(model, backend, n):
    cfg = DIT_PRESETS[model]
    params = random_params(cfg, seed=0, scale=0.1)
    torch._dynamo.reset()
    want = _sample(cfg, params, backend=backend)
    st = store(params, MemoryConfig(blocks_to_swap=n), cfg=cfg, device="cpu", dtype=torch.float32)
    swapped = block_prefixes(cfg)[-n:]
    assert sorted(st.swap.order) == sorted(swapped) and len(st.params) == len(params)
    assert all(st.params[k].data_ptr() != params[k].data_ptr() for k in params if k.startswith(tuple(swapped)))
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend(backend) if backend != "none" else None
    assert torch.equal(_sample(cfg, st.params, stored=st, backend=backend, backend_fn=cnt), want)
    if cnt is not None:
        assert cnt.frame_count == 2  # one graph per block kind, swapped or resident alike


def test_copies_run_one_swapped_block_ahead_and_each_block_sees_its_own_weights():
    cfg = DIT_PRESETS["tiny"]  # 2 double + 2 single blocks; the last 3 swap
    params = random_params(cfg, seed=0, scale=0.1)
    st = store(params, MemoryConfig(blocks_to_swap=3), cfg=cfg, device="cpu", dtype=torch.float32)
    st.swap.events = events = []
    slots = [s.buf.data_ptr() for s in st.swap.slots]

    def checked(pre, block):
        def run(p, *args, **kw):
            want = sub(params, pre)
            assert p.keys() == want.keys() and all(torch.equal(p[k], want[k]) for k in want), pre
            ptr = next(iter(p.values())).data_ptr()
            events.append(("compute", pre, slots.index(ptr) if ptr in slots else None))
            return block(p, *args, **kw)
        return run

    plain = dit.Blocks(double=lambda i: checked(f"double_blocks.{i}.", dit.double_block),
                       single=lambda i: checked(f"single_blocks.{i}.", dit.single_block))
    _sample(cfg, st.params, blocks=st.swap.wrap(plain), steps=2)
    d0, d1, s0, s1 = "double_blocks.0.", "double_blocks.1.", "single_blocks.0.", "single_blocks.1."
    # per step and CFG-batched call: d0 resident; each swapped block starts the next one's copy
    # (cyclic: s1 fetches d1 for the next step) before it computes from the other slot
    first = [("compute", d0, None), ("copy", d1), ("copy", s0), ("run", d1), ("compute", d1, 0),
             ("copy", s1), ("run", s0), ("compute", s0, 1), ("copy", d1), ("run", s1), ("compute", s1, 0)]
    later = [("compute", d0, None), ("copy", s0), ("run", d1), ("compute", d1, 1),
             ("copy", s1), ("run", s0), ("compute", s0, 0), ("copy", d1), ("run", s1), ("compute", s1, 1)]
    assert events == first + later


def _rows(shape, g):
    """Weights whose rows span 4 decades and whose elements reach e4m3's subnormals."""
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w *= 10 ** (torch.rand(shape[:-1] + (1,), generator=g, dtype=torch.float64) * 4 - 3)
    w *= 10 ** (-6 * torch.rand(shape, generator=g, dtype=torch.float64))
    return w


@pytest.mark.parametrize("dtype,u", [(torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8)])
def test_fp8_error_within_the_e4m3_bound(dtype, u):
    g = torch.Generator().manual_seed(0)
    w = _rows((3, 48, 80), g).to(dtype)  # q|k|v-like 3-D leaf: a scale per output row
    q, s = fp8.quantize(w)
    assert q.dtype == fp8.FP8 and s.shape == (3, 48, 1) and s.dtype == torch.float32
    deq = fp8.dequantize_leaf(q, s, dtype).double()
    w64 = w.double()
    err = (w64 - deq).abs()
    bound = (fp8.REL + u * (1 + fp8.REL)) * w64.abs() + (1 + u) * s.double() * fp8.FLOOR
    assert (err <= bound).all()
    assert (err / bound).max() > 0.5  # the bound is near tight: rounding did happen
    sub_ = w64.abs() < 2.0**-6 * s.double()
    assert sub_.sum() > 100  # the subnormal floor is exercised
    x = torch.randn(5, 80, generator=g, dtype=torch.float64)
    dy = (x @ w64.transpose(-1, -2) - x @ deq.transpose(-1, -2)).abs()
    lin = fp8.linear_bound(w64, s, x, u)
    assert (dy <= lin * (1 + 1e-9)).all() and dy.max() > 0


def test_fp8_stores_block_linears_in_half_the_bf16_bytes_and_the_rest_as_is():
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg, dtype=torch.bfloat16)
    st = store(params, MemoryConfig(fp8_weights=True), cfg=cfg, device="cpu", dtype=torch.bfloat16)
    lin = {k for k, v in params.items()
           if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.ndim >= 2}
    assert lin and all(st.params[k].dtype == fp8.FP8 for k in lin)
    assert all(torch.equal(st.params[k], v) for k, v in params.items() if k not in lin)  # norms, biases, embedders
    lin_bytes = sum(params[k].nbytes for k in lin)
    assert sum(st.params[k].nbytes for k in lin) * 2 == lin_bytes
    scale_bytes = sum(4 * params[k].numel() // params[k].shape[-1] for k in lin)
    total = sum(v.nbytes for v in params.values())
    assert sum(v.nbytes for v in st.params.values()) == total - lin_bytes // 2 + scale_bytes


@pytest.mark.parametrize("backend", ["none", "aot_eager"])
def test_fp8_sampling_composes_with_swap_bit_for_bit(backend):
    cfg = DIT_PRESETS["tiny-i2v"]
    params = random_params(cfg, seed=0, scale=0.1, dtype=torch.bfloat16)
    torch._dynamo.reset()
    f8 = store(params, MemoryConfig(fp8_weights=True), cfg=cfg, device="cpu", dtype=torch.bfloat16)
    both = store(params, MemoryConfig(fp8_weights=True, blocks_to_swap=3), cfg=cfg, device="cpu",
                 dtype=torch.bfloat16)
    got = _sample(cfg, f8.params, stored=f8, backend=backend, steps=1)
    assert torch.equal(_sample(cfg, both.params, stored=both, backend=backend, steps=1), got)
    if backend == "none":
        err = rel_err(got, _sample(cfg, params, steps=1))
        print(f"fp8 vs bf16 weights, latents after 1 step: rel err {err:.2e}")
        assert 0 < err < 0.1  # fp8 changes results (opt-in), by a weight-rounding amount


def cp2_runs(rank: int) -> dict:
    """On each rank of a 2-rank group: tiny I2V real-CFG latents (bf16) with the video tokens split
    over a cp-2 mesh the way sample.py splits them (parallel.sample_run._split), stored resident,
    swapped, fp8 and fp8 + swapped. Returns {"cp2-<name>": latents}."""
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.sample_run import _split

    cfg = DIT_PRESETS["tiny-i2v"]
    params = random_params(cfg, seed=0, scale=0.1, dtype=torch.bfloat16)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    cond, uncond = _conds(cfg)
    g = torch.Generator().manual_seed(2)
    noise, z = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 16, 1, H, W, generator=g)
    split = _split(mesh, T * (H // 2) * (W // 2), sample.sdpa)
    out = {}
    for name, mem in (("resident", MemoryConfig()), ("swap", MemoryConfig(blocks_to_swap=3)),
                      ("fp8", MemoryConfig(fp8_weights=True)), ("fp8-swap", MemoryConfig(fp8_weights=True, blocks_to_swap=3))):
        st = store(params, mem, cfg=cfg, device="cpu", dtype=torch.bfloat16)
        blocks = sampling.sampling_blocks(sampling.SampleGraphs(), stored=st)
        out[f"cp2-{name}"] = sample.denoise(st.params, noise, cond, uncond, cfg=cfg, image_latents=z,
                                            sampling=sample.Sampling(steps=2, cfg_scale=3.0), attn=sample.sdpa,
                                            blocks=blocks, split=split)
    return out


def test_memory_flags_through_the_script(tmp_path):
    out = tmp_path / "out"
    r = cli("tiny", "--prompt", "a cat", "--steps", "2", "--frames", "5", "--height", "32", "--width", "32",
            "--memory.blocks-to-swap", "2", "--memory.fp8-weights", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    side = json.loads(next(out.glob("*.json")).read_text())
    assert side["settings"]["memory"] == {"blocks_to_swap": 2, "fp8_weights": True}
    assert set(side["weights_gb"]) == {"device", "host"}


@pytest.mark.parametrize("args,message", [
    (("--memory.blocks-to-swap", "5"), "--memory.blocks-to-swap 5 is outside 0..4"),
    (("--memory.fp8-weights", "--cache.kind", "teacache"), "--cache.kind teacache reads double block 0"),
    (("--memory.blocks-to-swap", "1", "--cuda-graph", "on"), "--cuda-graph on and --memory.blocks-to-swap"),
])
def test_memory_user_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        _main()(["tiny", "--prompt", "a cat", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err


def test_swap_with_fbcache_skipping_blocks_equals_resident():
    """fbcache skips every block after double block 0 on some steps: the prefetched double block 1
    is then not the next block asked for (it is copied again after the next double block 0)."""
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg, seed=0, scale=0.1)
    st = store(params, MemoryConfig(blocks_to_swap=4), cfg=cfg, device="cpu", dtype=torch.float32)
    cond, uncond = _conds(cfg)
    noise = torch.randn(B, 16, T, H, W, generator=torch.Generator().manual_seed(2))
    runs = []
    for p, stored in ((params, None), (st.params, st)):
        stats = CacheStats()
        out = sampling.denoise(p, noise, cond, uncond, cfg=cfg, sampling=sample.Sampling(steps=5, cfg_scale=3.0),
                               cache=StepCache(kind="fbcache", threshold=0.7), stats=stats, stored=stored)
        runs.append((out, stats.pattern))
    (want, pattern), (got, pattern_swap) = runs
    assert pattern == pattern_swap and not all(pattern)  # some steps skipped
    assert torch.equal(got, want)
