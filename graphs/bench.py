"""Measurement helpers shared by every benchmark: timing, FLOPs, matmul peak, tables.

Numbers come from the same process and machine for every row being compared; timings
are medians over repeats after warm-up, with device synchronisation around each call.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type != "cpu":  # torch.cuda, or torch.npu once torch_npu is imported
        getattr(torch, device.type).synchronize(device)


def median_seconds(fn: Callable[[], object], *, device: torch.device, warmup: int = 1, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_formulas() -> dict:
    """torch's flop counter has formulas for the CUDA SDPA kernels only: the CPU flash
    kernel (what SDPA runs on CPU) would count 0, hiding most of a DiT's FLOPs. Same
    formulas as the CUDA kernels (q, k, v are [B, N, L, K] here too). Likewise oneDNN's
    convolution, which the VAE calls directly on CPU (hvfunc.vae.blocks.conv3d)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    out = {aten.mkldnn_convolution: lambda x, w, *args, out_shape=None, **kwargs: fc.conv_flop_count(x, w, out_shape)}
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return out

    def fwd(q, k, v, *args, **kwargs) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    return out | {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
                  aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch.utils.flop_counter (matmuls, convs, SDPA incl. CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_formulas()) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) of this device and dtype: the denominator of MFU.
    CPUs reach their rate at 1024 already (fp32 within 1%, bf16 within 6% of 2048, in a ninth of
    the time: every train() start pays it)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = median_seconds(lambda: a @ b, device=device, warmup=2, repeats=repeats)
    return 2 * n ** 3 / sec


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def markdown(rows: list[dict], cols: list[str] | None = None) -> str:
    """A markdown table; `cols` defaults to every key, in first-seen order."""
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def save_json(rows: list[dict], path: Path, **meta: object) -> None:
    from hvfunc import io

    io.write_atomic(path, json.dumps({"machine": machine(), **meta, "rows": rows}, indent=2, default=str).encode())
