"""Sampling-step benchmark: one no-grad DiT forward + Euler update, ours vs diffusers.

Ours: hvfunc.sample's step, eager, with compiled blocks (graphs.sampling, static shapes)
and on CUDA in a CUDA graph. Reference: diffusers' HunyuanVideoTransformer3DModel +
FlowMatchEulerDiscreteScheduler.step on the same weights, latents and text, same process.
Rows as graphs.bench_dit (median seconds, tokens/s, FLOPs, MFU, peak memory, ratio = ours /
diffusers time) plus `rel_err`: the row's next latents against diffusers' (max-relative).
CUDA-graph rows' peak memory is that of their first call, which captures the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from graphs import bench, sampling
from graphs.bench_dit import DTYPES, DiTBench, inputs, models, timed_rows
from graphs.memory import peak_memory
from hvfunc import sample


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
