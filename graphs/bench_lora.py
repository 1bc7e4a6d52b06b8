"""LoRA step vs full-finetune step at the same shapes (issue 14's benchmark).

One training step each (forward, backward, AdamW update), same model, inputs and process:
- full: every leaf trains (fp32 weights, gradients and two AdamW states per leaf);
- lora: the base is frozen in the compute dtype (no gradient, no weight-gradient GEMM, no
  optimizer state) and only the adapters of hvfunc.lora (the official I2V targets at rank
  r) train, unmerged inside the linear primitives, with fp32 masters and AdamW.
Rows: median seconds; state_gb, the bytes held between steps (weights, masters, gradients,
AdamW states); peak_mem_gb, that state plus the step's own peak above it (graphs.memory:
CUDA allocator, or the profiler's CPU allocation events); trainable parameters; ratio and
mem_ratio = lora / full (< 1: faster / lighter). Optimizer state is created by a warm-up step,
so the timed steps are steady-state ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphs import bench
from graphs.bench_dit import DTYPES, DiTBench, inputs
from graphs.memory import peak_memory, tensor_bytes
from hvfunc import dit, lora
from hvfunc.dit_spec import dit_spec
from hvfunc.params import init

COLS = ["bench", "impl", "seconds", "ratio", "state_gb", "peak_mem_gb", "mem_ratio", "trainable_params", "tokens",
        "dtype"]


@dataclass(frozen=True, kw_only=True)
class LoraBench(DiTBench):
    """Shapes of the LoRA-vs-full step (DiTBench's fields) and the adapter rank."""

    rank: int = 32
    """LoRA rank (alpha = rank: scale 1, as the official recipe's 64 / 64)."""


def _state_bytes(frozen: dict, trainable: dict, opt: torch.optim.Optimizer) -> int:
    """Bytes held between steps: weights, masters, gradients and AdamW states."""
    grads = [v.grad for v in trainable.values() if v.grad is not None]
    return tensor_bytes(frozen) + tensor_bytes(trainable) + tensor_bytes(grads) + tensor_bytes(
        [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)])


def _step(frozen: dict, trainable: dict, inp: dict, cfg, dtype: torch.dtype):
    """One AdamW step of `trainable` (fp32 masters, cast to the compute dtype inside the step, as the
    trainer's precision policy does) with `frozen` leaves as they are."""
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-4, foreach=True)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        params = frozen | {k: v.to(dtype) for k, v in trainable.items()}
        dit.forward(params, **inp, cfg=cfg).float().square().mean().backward()
        opt.step()

    run.state = lambda: _state_bytes(frozen, trainable, opt)
    return run


def run(b: LoraBench) -> list[dict]:
    device, dtype, cfg = torch.device(b.device), DTYPES[b.dtype], b.model()
    g = torch.Generator().manual_seed(0)
    base = {k: v.normal_(0, 0.02, generator=g) if not v.any() else v
            for k, v in init(dit_spec(cfg), device=device).items()}  # fp32 masters
    inp = inputs(b, cfg, device)
    full = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    lo = lora.init_lora(cfg, lora.LoraConfig(rank=b.rank, alpha=float(b.rank)), generator=g)
    adapters = {k: (v.normal_(0, 0.02, generator=g) if k.endswith("lora_B") else v).to(device).requires_grad_(True)
                for k, v in lo.tensors.items()}  # B != 0: the adapters really compute
    frozen = {k: v.to(dtype) for k, v in base.items()}  # the base in the compute dtype, no grad
    impls = {"full finetune": _step({}, full, inp, cfg, dtype),
             f"lora r{b.rank}": _step(frozen, adapters, inp, cfg, dtype)}
    counts = {"full finetune": sum(v.numel() for v in full.values()),
              f"lora r{b.rank}": sum(v.numel() for v in adapters.values())}
    rows = []
    for name, fn in impls.items():
        fn()  # warm-up: AdamW creates its state
        sec = bench.median_seconds(fn, device=device, repeats=b.repeats, warmup=0)
        step_peak = peak_memory(fn, device=device)[1]  # above the state held before the step
        rows.append(dict(bench="train step", impl=name, seconds=sec, state_gb=fn.state() / 2**30,
                         peak_mem_gb=(fn.state() + step_peak) / 2**30, trainable_params=counts[name], tokens=b.tokens,
                         dtype=b.dtype, device=bench.machine()))
    rows[1]["ratio"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["mem_ratio"] = rows[1]["peak_mem_gb"] / rows[0]["peak_mem_gb"]
    return rows
