"""The step cache (hvfunc.cache) against a test-side implementation of the published rules.

Threshold 0 is the uncached sampler bit for bit; with a threshold the computed / skipped
pattern and the latents equal a plain loop over dit's functions that applies TeaCache's
and ParaAttention's first-block-cache rules as published (numpy's poly1d for the
polynomial, means for rel-L1); compiled blocks and a split over two "ranks" (threads
summing their distance sums) take the same decisions.
"""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_params
from reference import rel_err
from test_sample import B, H, T, W, _conds
from torch._dynamo.testing import CompileCounterWithBackend

from graphs import sampling
from hvfunc import dit, sample
from hvfunc.cache import CacheState, CacheStats, StepCache
from hvfunc.config import DIT_PRESETS
from hvfunc.params import sub

STEPS = 10
# TeaCache4HunyuanVideo's coefficients, highest degree first (shared/reference section 9)
POLY = np.poly1d([7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02])
CASES = {"t2v": ("tiny", 1.0), "t2v-cfg": ("tiny", 3.0), "i2v-cfg": ("tiny-i2v", 2.5)}
# thresholds that skip some steps and compute others on this random tiny model (asserted below)
MIXED = {"teacache": 0.3, "fbcache": 0.7}
BOUND = 0.1  # rel. error of the final latents vs uncached at MIXED (measured: see docs/sampling.md)


def _setup(case: str):
    name, cfg_scale = CASES[case]
    cfg = DIT_PRESETS[name]
    params = random_params(cfg, seed=0, scale=0.1)
    cond, uncond = _conds(cfg)
    g = torch.Generator().manual_seed(2)
    noise, z = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 16, 1, H, W, generator=g)
    s = sample.Sampling(steps=STEPS, cfg_scale=cfg_scale, guidance_rescale=0.3 if cfg_scale > 1 else 0.0)
    kw = dict(cfg=cfg, sampling=s, image_latents=z if cfg.i2v_condition_type else None)
    return params, noise, cond, uncond, kw


def _run(case: str, cache: StepCache | None = None, denoise=sample.denoise, **extra):
    params, noise, cond, uncond, kw = _setup(case)
    stats = CacheStats()
    out = denoise(params, noise, cond, uncond, **kw, cache=cache, stats=stats, **extra)
    return out, stats


def _modulated(params, e: dit.Embedded) -> torch.Tensor:
    """modulate(LayerNorm(img), shift1, scale1) of double block 0, per token (frame-0 tokens of
    I2V take vec_first's modulation)."""
    w, b = params["double_blocks.0.img_mod.linear.weight"], params["double_blocks.0.img_mod.linear.bias"]
    D = e.img.shape[-1]

    def mod(v):
        shift, scale = F.linear(F.silu(v), w, b)[:, : 2 * D].split(D, dim=-1)
        return shift[:, None], scale[:, None]

    shift, scale = mod(e.vec)
    if e.vec_first is not None:
        head = torch.arange(e.img.shape[1])[None, :, None] < e.first
        sf, cf = mod(e.vec_first)
        shift, scale = torch.where(head, sf, shift), torch.where(head, cf, scale)
    return F.layer_norm(e.img, (D,), eps=1e-6) * (1 + scale) + shift


def _reference(case: str, kind: str, thr: float):
    """The published rules in a plain loop: (final latents, computed pattern)."""
    params, noise, cond, uncond, kw = _setup(case)
    cfg, s, z = kw["cfg"], kw["sampling"], kw["image_latents"]
    text = sample._cfg_batch(cond, uncond if s.real_cfg else None)
    n = text["text_states"].shape[0]
    sig = sample.sigmas(s.steps, s.shift)
    x = sample.initial_latents(noise, z, stability=s.i2v_stability)
    acc, prev, res, pattern = 0.0, None, None, []

    def rel(a, p):
        return float((a - p).abs().mean() / p.abs().mean())

    for i in range(s.steps):
        xin = x if z is None else torch.cat([z, x[:, :, 1:]], dim=2)
        e = dit.embed(params, xin.repeat(n // B, 1, 1, 1, 1), (sig[i] * 1000).expand(n), **text, cfg=cfg,
                      guidance=torch.full((n,), 6000.0))
        full = lambda: dit.run_blocks(params, e, cfg=cfg, attn=dit.sdpa)  # noqa: E731
        if kind == "teacache":
            m = _modulated(params, e)
            if i in (0, s.steps - 1):
                calc, acc = True, 0.0
            else:
                acc += POLY(rel(m, prev))
                calc = acc >= thr
                acc = 0.0 if calc else acc
            prev = m
            if calc:
                img = full()
                res = img - e.img
            else:
                img = e.img + res
        else:
            img1, _ = dit.double_block(sub(params, "double_blocks.0."), e.img, e.txt, e.vec, rope=e.rope,
                                       kv_len=e.kv_len, cfg=cfg, attn=dit.sdpa, vec_first=e.vec_first, first=e.first)
            r = img1 - e.img
            calc = prev is None or rel(r, prev) >= thr
            if calc:
                prev, img = r, full()
                res = img - img1
            else:
                img = img1 + res
        pattern.append(calc)
        v = dit.unpatchify(dit.final_layer(params, img, e.vec), e.grid, cfg.patch_size)
        if s.real_cfg:
            v = sample.cfg_combine(*v.chunk(2), s.cfg_scale, s.guidance_rescale)
        x = sample.euler(x, v, sig[i + 1] - sig[i], z)
    return x, pattern


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_threshold_zero_is_the_uncached_sampler_exactly(kind, case):
    want, _ = _run(case)
    got, stats = _run(case, StepCache(kind=kind, threshold=0.0))
    assert torch.equal(got, want)
    assert stats.pattern == [True] * STEPS and stats.computed == STEPS and stats.skipped == 0


@pytest.mark.parametrize("case", ["t2v", "i2v-cfg"])
@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_skips_follow_the_published_rule_within_the_bound(kind, case):
    got, stats = _run(case, StepCache(kind=kind, threshold=MIXED[kind]))
    want, pattern = _reference(case, kind, MIXED[kind])
    assert stats.pattern == pattern
    assert 0 < stats.skipped < STEPS - 2, pattern  # the rule really decided both ways here
    assert pattern[0] and (pattern[-1] or kind == "fbcache")
    assert rel_err(got, want) <= 1e-6
    uncached, _ = _run(case)
    assert rel_err(got, uncached) <= BOUND, rel_err(got, uncached)


@pytest.mark.parametrize("kind, pattern", [("teacache", [True] + [False] * (STEPS - 2) + [True]),
                                           ("fbcache", [True] + [False] * (STEPS - 1))])
def test_first_step_always_computed_and_teacache_last(kind, pattern):
    _, stats = _run("t2v", StepCache(kind=kind, threshold=1e9))
    assert stats.pattern == pattern


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_compiled_blocks_give_the_eager_cached_run(kind):
    cache = StepCache(kind=kind, threshold=MIXED[kind])
    want, eager = _run("i2v-cfg", cache)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    got, compiled = _run("i2v-cfg", cache, sampling.denoise, graphs=sampling.SampleGraphs(backend="aot_eager"),
                         backend_fn=cnt)
    assert compiled.pattern == eager.pattern and compiled.skipped > 0
    assert rel_err(got, want) <= 1e-5
    assert cnt.frame_count == 2  # still one graph per block kind: double block 0 alone is the same graph


def test_cuda_graph_refuses_a_cache_and_bad_configs_raise():
    params, noise, cond, uncond, kw = _setup("t2v")
    with pytest.raises(ValueError, match="cuda_graph=True and cache.kind='teacache'"):
        sampling.denoise(params, noise, cond, **kw, graphs=sampling.SampleGraphs(cuda_graph=True),
                         cache=StepCache(kind="teacache"))
    with pytest.raises(ValueError, match="cache.kind must be one of"):
        StepCache(kind="tea")
    with pytest.raises(ValueError, match="needs cache.kind teacache or fbcache"):
        StepCache(threshold=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        StepCache(kind="fbcache", threshold=-1.0)
    assert StepCache(kind="teacache").thresh == 0.1 and StepCache(kind="fbcache").thresh == 0.06


def _token_run(e: dit.Embedded, after_first=None) -> torch.Tensor:
    """A stand-in for the blocks that acts on each token alone (so halves of the tokens give
    halves of the result): block 0, then the rest."""
    img1 = torch.tanh(1.3 * e.img + e.vec[:, None])
    out = None if after_first is None else after_first(img1)
    return out if out is not None else img1 + torch.sin(img1)


def _steps(L: int = 16, D: int = 8):
    g = torch.Generator().manual_seed(5)
    base, drift = torch.randn(2, L, D, generator=g), torch.randn(2, L, D, generator=g)
    vecs = [torch.randn(2, D, generator=g) * 0.05 for _ in range(STEPS)]
    return [dit.Embedded(img=base + 0.08 * i * drift + 0.02 * torch.randn(2, L, D, generator=g), txt=None,
                         vec=vecs[i], vec_first=None, rope=None, txt_len=None, grid=(1, 4, 4), first=0)
            for i in range(STEPS)]


@pytest.mark.parametrize("kind, thr", [("teacache", 0.15), ("fbcache", 0.19)])
def test_reduce_hook_two_token_halves_take_the_whole_decision(kind, thr):
    D = 8
    g = torch.Generator().manual_seed(6)
    params = {"double_blocks.0.img_mod.linear.weight": torch.randn(6 * D, D, generator=g) * 0.3,
              "double_blocks.0.img_mod.linear.bias": torch.randn(6 * D, generator=g) * 0.3}
    cache, steps = StepCache(kind=kind, threshold=thr), _steps(D=D)
    whole = CacheState(cache, STEPS)
    want = [whole.run(params, e, _token_run) for e in steps]
    assert 0 < whole.stats.skipped < STEPS - 1, whole.stats.pattern

    barrier, slots = threading.Barrier(2, timeout=30), [None, None]
    outs, states = [[], []], [None, None]

    def rank(r: int) -> None:
        def allreduce(sums):  # what an all-reduce over the cp group returns on each rank
            slots[r] = sums.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        states[r] = CacheState(cache, STEPS, reduce=allreduce)
        for e in steps:
            half = dit.Embedded(**{**vars(e), "img": e.img.chunk(2, dim=1)[r]})
            outs[r].append(states[r].run(params, half, _token_run))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states[0].stats.pattern == states[1].stats.pattern == whole.stats.pattern
    for w, a, b in zip(want, outs[0], outs[1]):
        assert rel_err(torch.cat([a, b], dim=1), w) <= 1e-6
    for d0, d in zip(states[0].stats.indicators, whole.stats.indicators):
        assert (d0 is None and d is None) or abs(d0 - d) <= 1e-5 * abs(d)


def test_cache_bench_rows():
    """bench sample --cache-thresholds: threshold 0 is the uncached run (error 0, PSNR inf); a huge
    threshold computes what the rules force (teacache first + last, fbcache the first)."""
    import math

    from graphs.bench_sample import SampleBench, run

    b = SampleBench(hidden=64, heads=2, double=1, single=1, frames=2, height=8, width=8, text_len=8, text_dim=32,
                    steps=4, repeats=1, cache_thresholds=(0.0, 1e9))
    rows = {r["impl"]: r for r in run(b)}
    assert list(rows) == ["uncached", "teacache 0", "teacache 1e+09", "fbcache 0", "fbcache 1e+09"]
    for name in ("uncached", "teacache 0", "fbcache 0"):
        r = rows[name]
        assert r["dit_evals"] == 4 and r["latents_rel_err"] == r["frames_rel_err"] == 0
        assert r["frames_psnr_db"] == math.inf
    assert rows["teacache 1e+09"]["dit_evals"] == 2 and rows["fbcache 1e+09"]["dit_evals"] == 1
    assert rows["fbcache 1e+09"]["latents_rel_err"] > 0 and math.isfinite(rows["fbcache 1e+09"]["frames_psnr_db"])
