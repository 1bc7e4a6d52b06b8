"""Execution transforms of the repeated unit: recompute policy and torch.compile per block.

`make_blocks` returns hvfunc.dit.Blocks whose block i runs `prepare(params)` (the FSDP
gather and precision cast from parallel/ or graphs.precision) and the pure block function,
under the recompute mode chosen for i, compiled once per distinct mode, so the number of
compiled graphs does not grow with depth. Nothing here changes results.

Recompute modes (per stream, like the seed's double/single_stream_full_recompute_layers):
  full       the first N blocks keep only their inputs and recompute everything
  selective  the other blocks keep attention outputs and recompute the rest (matmuls,
             norms, parameter gathers): attention is the costliest op to redo
  none       autograd keeps everything
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from graphs import backends
from hvfunc import dit
from hvfunc.params import Params

Backend = Literal["none", "auto", "inductor", "aot_eager", "eager", "torchair"]


@dataclass(frozen=True, kw_only=True)
class Recompute:
    """Activation recompute per stream."""

    double_full: int = 0
    """Double-stream blocks (from the first) with full recompute."""
    single_full: int = 0
    """Single-stream blocks (from the first) with full recompute."""
    selective: bool = False
    """Remaining blocks: keep attention outputs, recompute everything else."""


@dataclass(frozen=True, kw_only=True)
class Compile:
    """torch.compile of the block functions."""

    backend: Backend = "none"
    """auto (by device: inductor on CPU/CUDA, torchair on NPU), inductor, torchair (Ascend,
    unverified here), aot_eager / eager (debugging), none."""
    dynamic: bool | None = None
    """None: dynamo makes a dim dynamic once it changes (training buckets); False: static."""
    mode: str | None = None
    """Inductor mode, e.g. "reduce-overhead" (CUDA graphs, static shapes, sampling) or "max-autotune"."""


_ATTN_OPS = tuple(getattr(torch.ops.aten, n) for n in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, n))


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)  # the policy sees overloads (aten.x.default)
    return CheckpointPolicy.MUST_SAVE if packet in _ATTN_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def with_recompute(fn: Callable, mode: Literal["none", "full", "selective"]) -> Callable:
    if mode == "none":
        return fn

    def run(p: Params, *args, **kw):
        extra = {} if mode == "full" else {
            "context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_attention)}
        return checkpoint(fn, p, *args, use_reentrant=False, **extra, **kw)

    return run


def compiled(fn: Callable, c: Compile, backend_fn: Callable | None = None) -> Callable:
    if c.backend == "none" and backend_fn is None:
        return fn
    backend = backend_fn or (backends.torchair_backend() if c.backend == "torchair" else c.backend)
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=c.dynamic, mode=c.mode)


def make_blocks(*, prepare: Callable[[Params], Params] | None = None, recompute: Recompute = Recompute(),
                compile: Compile = Compile(), backend_fn: Callable | None = None,
                dtensor_params: bool = False, device: torch.device | str = "cpu") -> dit.Blocks:
    """Blocks with gather/cast, recompute and compile applied (one compiled graph per mode).

    backend_fn: a dynamo backend callable that overrides compile.backend (tests count
    compiled frames with it). dtensor_params: the leaves are DTensors gathered by
    `prepare`; torch (2.13) cannot compile a checkpointed region with a DTensor gather
    inside (AOTAutograd tries to save the DeviceMesh), so then the checkpoint wraps the
    compiled block instead. That is exact, but a selective policy cannot see inside the
    compiled graph: it recomputes the whole block like "full"."""
    cache: dict[tuple[str, str], Callable] = {}
    if compile.backend == "auto":
        compile = dataclasses.replace(compile, backend=backends.default_compile_backend(device))

    def fn_for(kind: str, i: int) -> Callable:
        full = recompute.double_full if kind == "double" else recompute.single_full
        mode = "full" if i < full else ("selective" if recompute.selective else "none")
        if (kind, mode) not in cache:
            block = dit.double_block if kind == "double" else dit.single_block

            def body(p: Params, *args, _block=block, **kw):
                return _block(prepare(p) if prepare else p, *args, **kw)

            if dtensor_params:
                cache[kind, mode] = with_recompute(compiled(body, compile, backend_fn), mode)
            else:
                cache[kind, mode] = compiled(with_recompute(body, mode), compile, backend_fn)
        return cache[kind, mode]

    return dit.Blocks(double=lambda i: fn_for("double", i), single=lambda i: fn_for("single", i))
