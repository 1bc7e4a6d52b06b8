"""Sampling-step benchmark: one no-grad DiT forward + Euler update, ours vs diffusers.

Ours: hvfunc.sample's step, eager, with compiled blocks (graphs.sampling, static shapes)
and on CUDA in a CUDA graph. Reference: diffusers' HunyuanVideoTransformer3DModel +
FlowMatchEulerDiscreteScheduler.step on the same weights, latents and text, same process.
Rows as graphs.bench_dit (median seconds, tokens/s, FLOPs, MFU, peak memory, ratio = ours /
diffusers time) plus `rel_err`: the row's next latents against diffusers' (max-relative).
CUDA-graph rows' peak memory is that of their first call, which captures the graph.

With `cache_thresholds` (run_cache): whole runs of `steps` steps instead, uncached and with
each step cache (hvfunc.cache) at each threshold, eager blocks: DiT evaluations (steps whose
blocks ran), seconds per run (fastest of `repeats`, the settings interleaved; on CPU the
process's CPU time, which other jobs' load does not inflate), speed-up, and the change vs uncached of the final
latents and of the frames a tiny random VAE decodes from them (max-relative error, PSNR on
[-1, 1]). Random weights check the mechanism, not the quality of a cached video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import math
import time

import numpy as np
import torch

from graphs import bench, sampling
from graphs.bench_dit import DTYPES, DiTBench, inputs, models, timed_rows
from graphs.memory import peak_memory
from hvfunc import params as hp
from hvfunc import sample, vae
from hvfunc.cache import CacheStats, StepCache
from hvfunc.config import vae_preset


@dataclass(frozen=True, kw_only=True)
class SampleBench(DiTBench):
    """One sampling step on the DiT benchmark's shapes (defaults: the small CPU config)."""

    compile: Literal["none", "inductor", "aot_eager"] = "inductor"
    """Also time our blocks compiled with this backend (rows "hvfunc+compile")."""
    cuda_graph: bool | None = None
    """Also time the step in a CUDA graph (rows "+cudagraph"); None: when the device is CUDA."""
    steps: int = 50
    """Length of the schedule (shift 7) the timed step belongs to."""
    step: int = 0
    """Which step of the schedule is timed (its t and dt)."""
    backward: bool = False
    """(Unused: sampling never runs backward.)"""
    recompute: bool = False
    """(Unused: sampling keeps no activations.)"""
    cache_thresholds: tuple[float, ...] = ()
    """Time whole runs instead: uncached and teacache / fbcache at each threshold (e.g. 0.05 0.1 0.15)."""


def _reference_step(b: SampleBench, ref, inp: dict, x: torch.Tensor, z: torch.Tensor | None, dtype: torch.dtype):
    """diffusers' step: the transformer, then the scheduler's Euler update (I2V: frames 1.. only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=7.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, b.steps + 1)[:-1], device=x.device)  # as the pipelines do
    t = sched.timesteps[b.step]
    kw = dict(timestep=t.expand(b.batch), encoder_hidden_states=inp["text_states"].to(dtype),
              encoder_attention_mask=inp["text_mask"], pooled_projections=inp["text_states_2"].to(dtype),
              guidance=inp["guidance"].to(dtype), return_dict=False)

    def run() -> torch.Tensor:
        sched._step_index = b.step  # time the same step on every call (step() advances the index)
        if z is None:
            return sched.step(ref(hidden_states=x.to(dtype), **kw)[0], t, x, return_dict=False)[0]
        v = ref(hidden_states=torch.cat([z, x[:, :, 1:]], dim=2).to(dtype), **kw)[0]
        return torch.cat([z, sched.step(v[:, :, 1:], t, x[:, :, 1:], return_dict=False)[0]], dim=2)

    return run


@torch.no_grad()
def run(b: SampleBench) -> list[dict]:
    if b.cache_thresholds:
        return run_cache(b)
    device, dtype, cfg = torch.device(b.device), DTYPES[b.dtype], b.model()
    params, ref = models(b, device, dtype)
    inp = inputs(b, cfg, device)
    x = inp["x"].float()
    z = torch.randn(b.batch, cfg.in_channels, 1, b.height, b.width, generator=torch.Generator().manual_seed(1))
    z = z.to(device) if b.i2v else None
    s = sample.Sampling(steps=b.steps, shift=7.0, guidance=6.0)
    sig = sample.sigmas(b.steps, s.shift, device=device)
    t, dt = sig[b.step] * 1000, sig[b.step + 1] - sig[b.step]
    cond = {k: inp[k] for k in sample.COND_KEYS}
    use_graph = device.type == "cuda" if b.cuda_graph is None else b.cuda_graph
    variants = {"hvfunc": sampling.SampleGraphs()}
    if b.compile != "none":
        variants["hvfunc+compile"] = sampling.SampleGraphs(backend=b.compile)
    if use_graph:
        variants |= {f"{k}+cudagraph": sampling.SampleGraphs(backend=g.backend, cuda_graph=True)
                     for k, g in list(variants.items())}
    impls = {}
    for name, g in variants.items():
        step = sample.make_step(params, cond, cfg=cfg, sampling=s, image_latents=z,
                                blocks=sampling.sampling_blocks(g, device=device))
        fn = sampling.static_runner(step) if g.cuda_graph else step
        impls[name] = lambda fn=fn: fn(x, t, dt)
    impls["diffusers"] = _reference_step(b, ref, inp, x, z, dtype)
    want = impls["diffusers"]().float()
    # A CUDA graph allocates its memory (a private pool) when it is captured, in its first
    # call (warm-up + capture); replays allocate nothing. Its rows report that first call's peak.
    first = {k: peak_memory(fn, device=device) for k, fn in impls.items()}
    errs = {k: float((out.float() - want).abs().max() / want.abs().max()) for k, (out, _) in first.items()}
    tokens = b.tokens
    peak = bench.matmul_peak(device, dtype)
    rows = timed_rows("sample step", impls, device, b.repeats, tokens, peak)
    for r in rows:
        r.update(rel_err=errs[r["impl"]], tokens=tokens, dtype=b.dtype, device=bench.machine(),
                 matmul_peak_tflops=peak / 1e12)
        if r["impl"].endswith("+cudagraph"):
            r["peak_mem_gb"] = first[r["impl"]][1] / 2**30
    return rows


CACHE_COLS = ["bench", "impl", "dit_evals", "seconds", "speedup", "latents_rel_err", "frames_rel_err",
              "frames_psnr_db", "dtype"]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of frames clamped to [-1, 1] (peak-to-peak 2); inf when equal."""
    mse = float((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).double().square().mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


@torch.no_grad()
def run_cache(b: SampleBench) -> list[dict]:
    """Whole runs per cache setting (see the module docstring); rows in CACHE_COLS."""
    device, dtype, cfg = torch.device(b.device), DTYPES[b.dtype], b.model()
    params, _ = models(b, device, dtype)
    inp = inputs(b, cfg, device)
    z = torch.randn(b.batch, cfg.in_channels, 1, b.height, b.width, generator=torch.Generator().manual_seed(1))
    z = z.to(device) if b.i2v else None
    cond = {k: inp[k] for k in sample.COND_KEYS}
    s = sample.Sampling(steps=b.steps, shift=7.0, guidance=6.0)
    vcfg = vae_preset("tiny")
    vparams = hp.init(vae.vae_spec(vcfg), generator=torch.Generator().manual_seed(0), dtype=dtype, device=device)
    settings = {"uncached": None} | {f"{k} {t:g}": StepCache(kind=k, threshold=t)
                                     for k in ("teacache", "fbcache") for t in b.cache_thresholds}
    runs = {name: _cache_run(params, inp["x"].float(), cond, cfg=cfg, sampling=s, image_latents=z, cache=cache)
            for name, cache in settings.items()}
    runs["uncached"]()  # warm-up (allocator, lazy init)
    # CPU: this process's CPU time (other jobs on a shared machine do not count); else wall time
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    seconds = {name: math.inf for name in runs}
    for _ in range(b.repeats):  # interleaved, fastest kept: load from other jobs hits every setting alike
        for name, fn in runs.items():
            bench.sync(device)
            start = clock()
            fn()
            bench.sync(device)
            seconds[name] = min(seconds[name], clock() - start)
    rows, base = [], None
    for name, fn in runs.items():
        x, stats = fn.last
        frames = vae.decode(vparams, vae.unscale_latents(x, cfg=vcfg).to(dtype), cfg=vcfg)
        base = base or {"x": x, "frames": frames, "seconds": seconds[name]}
        rows.append(dict(bench=f"sample {b.steps} steps", impl=name, dit_evals=stats.computed, seconds=seconds[name],
                         speedup=base["seconds"] / seconds[name], latents_rel_err=_max_rel(x, base["x"]),
                         frames_rel_err=_max_rel(frames, base["frames"]), frames_psnr_db=_psnr(frames, base["frames"]),
                         dtype=b.dtype, tokens=b.tokens, device=bench.machine()))
    return rows


def _cache_run(*args, cache: StepCache | None, **kw):
    """A denoise run as a thunk; fn.last = (latents, CacheStats) of its latest call (uncached:
    every step counted as computed)."""

    def fn() -> None:
        stats = CacheStats()
        x = sample.denoise(*args, cache=cache, stats=stats, **kw)
        if cache is None:
            stats.pattern = [True] * kw["sampling"].steps
        fn.last = (x, stats)

    return fn
