"""DiT benchmark: our forward / forward+backward vs diffusers' HunyuanVideoTransformer3DModel.

Same weights (ours converted into diffusers'), same inputs, same process. Rows report
median seconds, tokens/s, counted FLOPs, achieved FLOP/s, its fraction of the measured
matmul peak, and CUDA peak memory; `ratio` = ours / diffusers time (< 1 is faster).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from graphs import bench
from graphs.blocks import Compile, Recompute, make_blocks
from graphs.memory import peak_memory
from hvfunc import ckpt, dit
from hvfunc.config import DiTConfig
from hvfunc.dit_spec import dit_spec
from hvfunc.params import init

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class DiTBench:
    """Shapes and model size of the DiT benchmark (defaults: the small CPU config)."""

    hidden: int = 256
    """Model width (3072 for the real model)."""
    heads: int = 4
    """Attention heads (24 for the real model)."""
    double: int = 2
    """Double-stream blocks (20 for the real model)."""
    single: int = 4
    """Single-stream blocks (40 for the real model)."""
    frames: int = 5
    """Latent frames (video frames = 4 * (frames - 1) + 1)."""
    height: int = 32
    """Latent height (pixels / 8); tokens = frames * height/2 * width/2."""
    width: int = 48
    """Latent width (pixels / 8)."""
    text_len: int = 64
    """Text tokens (all valid)."""
    batch: int = 1
    """Batch size."""
    text_dim: int = 256
    """LLM text-state width (4096 for the real model)."""
    i2v: bool = False
    """Use the I2V token_replace model."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights and compute dtype of both implementations."""
    device: str = "cpu"
    """cpu or cuda."""
    repeats: int = 5
    """Timed repeats (median reported) after one warm-up call."""
    backward: bool = True
    """Also time forward+backward (gradients of every weight)."""
    compile: Literal["none", "inductor", "aot_eager"] = "none"
    """Also time our blocks compiled with this backend (rows "hvfunc+compile")."""
    recompute: bool = False
    """Training-step memory mode: ours with full recompute of every block, diffusers with
    its gradient checkpointing (forward+backward rows)."""
    json: Path | None = None
    """Also write the rows (and the machine) as JSON here."""

    @property
    def tokens(self) -> int:
        """Video tokens of the batch (patch 1 x 2 x 2)."""
        return self.batch * self.frames * (self.height // 2) * (self.width // 2)

    def model(self) -> DiTConfig:
        K = self.hidden // self.heads
        t = 2 * (K // 16)
        h = 2 * ((K - t) // 4)
        return DiTConfig(hidden_size=self.hidden, heads_num=self.heads, mm_double_blocks_depth=self.double,
                         mm_single_blocks_depth=self.single, rope_dim_list=(t, h, K - t - h),
                         text_states_dim=self.text_dim, text_states_dim_2=min(768, self.text_dim),
                         i2v_condition_type="token_replace" if self.i2v else None)


@dataclass(frozen=True, kw_only=True)
class TrainBench(DiTBench):
    """A training step: ours with full recompute vs diffusers with gradient checkpointing."""

    recompute: bool = True
    """Training-step memory mode (see DiTBench.recompute)."""
    recompute_mode: Literal["full", "selective", "offload"] = "full"
    """Ours: full recompute of every block, selective (keep attention outputs), or selective
    with those outputs offloaded to pinned host memory."""


def inputs(b: DiTBench, cfg: DiTConfig, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b.batch, cfg.in_channels, b.frames, b.height, b.width, generator=g)
    return dict(x=x.to(device), t=torch.full((b.batch,), 700.0, device=device),
                text_states=torch.randn(b.batch, b.text_len, cfg.text_states_dim, generator=g).to(device),
                text_mask=torch.ones(b.batch, b.text_len, dtype=torch.long, device=device),
                text_states_2=torch.randn(b.batch, cfg.text_states_dim_2, generator=g).to(device),
                guidance=torch.full((b.batch,), 6000.0, device=device))


def models(b: DiTBench, device: torch.device, dtype: torch.dtype) -> tuple[dict, torch.nn.Module]:
    """Our params (zero-initialised leaves drawn N(0, 0.02)) and diffusers' transformer holding the same weights."""
    from diffusers import HunyuanVideoTransformer3DModel

    cfg = b.model()
    params = {k: v.normal_(0, 0.02) if not v.any() else v for k, v in
              init(dit_spec(cfg), dtype=dtype, device=device).items()}
    ref = HunyuanVideoTransformer3DModel(**{k: v for k, v in ckpt.diffusers_config(cfg).items() if k[0] != "_"})
    ref.load_state_dict(ckpt.dit_to_diffusers(params, cfg))
    return params, ref.to(device=device, dtype=dtype).eval()


def bench_dit(b: DiTBench) -> list[dict]:
    device, dtype, cfg = torch.device(b.device), DTYPES[b.dtype], b.model()
    params, ref = models(b, device, dtype)
    inp = inputs(b, cfg, device)
    ref_inp = dict(hidden_states=inp["x"].to(dtype), timestep=inp["t"], encoder_hidden_states=inp["text_states"].to(dtype),
                   encoder_attention_mask=inp["text_mask"], pooled_projections=inp["text_states_2"].to(dtype),
                   guidance=inp["guidance"], return_dict=False)
    impls = {"hvfunc": lambda: dit.forward(params, **inp, cfg=cfg)}
    if b.compile != "none":
        blocks = make_blocks(compile=Compile(backend=b.compile))
        impls["hvfunc+compile"] = lambda: dit.forward(params, **inp, cfg=cfg, blocks=blocks)

    def ref_impl():
        return ref(**ref_inp)[0]

    impls["diffusers"] = ref_impl
    tokens = b.tokens
    peak = bench.matmul_peak(device, dtype)
    with torch.no_grad():
        rows = timed_rows("forward", impls, device, b.repeats, tokens, peak)
    if b.backward:
        for v in params.values():
            v.requires_grad_(True)
        count = None  # FLOPs of the first impl, unless it recomputes
        if b.recompute:
            count = impls["hvfunc"]  # eager, no recompute: the recomputed forward is not credited
            mode = getattr(b, "recompute_mode", "full")
            rc = (Recompute(double_full=b.double, single_full=b.single) if mode == "full"
                  else Recompute(selective=True, offload=mode == "offload"))
            impls = {}
            for name, backend in (("hvfunc", "none"), ("hvfunc+compile", b.compile)):
                if name == "hvfunc" or backend != "none":
                    bl = make_blocks(recompute=rc, compile=Compile(backend=backend))
                    impls[f"{name}+recompute ({mode})"] = functools.partial(dit.forward, params, **inp, cfg=cfg,
                                                                            blocks=bl)
            impls["diffusers+checkpointing"] = ref_impl
            ref.enable_gradient_checkpointing()
            ref.train()
        leaves = {k: list(ref.parameters()) if k.startswith("diffusers") else list(params.values()) for k in impls}

        def step(fn, ps):
            def run():
                for p in ps:
                    p.grad = None
                fn().float().square().mean().backward()
            return run

        rows += timed_rows("forward+backward", {k: step(fn, leaves[k]) for k, fn in impls.items()}, device, b.repeats,
                           tokens, peak, count=count and step(count, list(params.values())))
    for r in rows:
        r.update(tokens=tokens, dtype=b.dtype, device=bench.machine(), matmul_peak_tflops=peak / 1e12)
    return rows


def timed_rows(what: str, impls: dict, device: torch.device, repeats: int, tokens: int, peak: float,
               count: Callable[[], object] | None = None) -> list[dict]:
    """One row per implementation (the last is the reference); FLOPs counted once, eagerly, on
    `count` (default: the first impl; FlopCounterMode is a dispatch mode, which compiled
    selective-checkpoint regions refuse); ratio = time / the reference's time."""
    flops = bench.count_flops(count or next(iter(impls.values())))
    out = []
    for impl, fn in impls.items():
        sec = bench.median_seconds(fn, device=device, repeats=repeats, warmup=2 if "compile" in impl else 1)
        out.append(dict(bench=f"dit {what}", impl=impl, seconds=sec, tokens_per_s=tokens / sec,
                        tflops=flops / sec / 1e12, mfu=flops / sec / peak, peak_mem_gb=peak_memory(fn, device=device)[1] / 2**30))
    ref = out[-1]["seconds"]
    for r in out[:-1]:
        r["ratio"] = r["seconds"] / ref
    return out
