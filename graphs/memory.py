"""Peak memory of one call, on CPU as well as on accelerators.

CPU has no allocator statistics, so the CPU path runs the call under the PyTorch profiler
with `profile_memory=True`: every allocation and free of the c10 CPU allocator (including
kernels' internal buffers, such as conv3d's column buffers, and work on intra-op threads)
is an event with a signed byte count, and the peak is the maximum of their running sum.
CUDA (and NPU via torch_npu) use the allocator's own peak counter. Either way the result
is the peak of bytes allocated during the call above the level at its start, so tensors
that already existed (weights, inputs) are not counted and the returned output is.

The profiler's C++ side (kineto) logs `USDT: ... profiler_start` / `profiler_stop` (older
torch: `STAGE: ...`) lines straight to file descriptor 2 when it starts and stops; `_quiet`
drops those lines around the start and stop only (the call itself writes to stderr as usual,
and any other line written there is passed on).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in obj (a tensor, or a tuple / list / dict of them)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


_KINETO_LOG = re.compile(r"^(USDT|STAGE):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*\.cpp:\d+\]")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """File descriptor 2 into a temporary file for the block; its lines but kineto's go back to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [x for x in tmp.read().decode(errors="replace").splitlines(True) if not _KINETO_LOG.match(x)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _cpu_levels(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet():
        prof.__enter__()
    try:
        out = fn()
    finally:
        with _quiet():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return out, peak, level


def _device_levels(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, int]:
    mod = getattr(torch, device.type)  # torch.cuda, or torch.npu once torch_npu is imported
    mod.synchronize(device)
    mod.reset_peak_memory_stats(device)
    start = mod.memory_allocated(device)
    out = fn()
    mod.synchronize(device)
    return out, mod.max_memory_allocated(device) - start, mod.memory_allocated(device) - start


def _levels(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int, int]:
    device = torch.device(device)
    return _cpu_levels(fn) if device.type == "cpu" else _device_levels(fn, device)


def peak_memory(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> tuple[Any, int]:
    """(fn(), peak bytes allocated on `device` during the call above the starting level)."""
    out, peak, _ = _levels(fn, device)
    return out, peak


def held_memory(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> tuple[Any, int]:
    """(fn(), bytes still allocated on `device` when the call returns): for a forward, what
    autograd keeps for the backward (plus the output)."""
    out, _, held = _levels(fn, device)
    return out, held
