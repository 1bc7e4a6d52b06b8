"""Execution transforms of the repeated unit: recompute policy and torch.compile per block.

`make_blocks` returns hvfunc.dit.Blocks whose block i runs `prepare(params)` (the FSDP
gather and precision cast from parallel/ or graphs.precision) and the pure block function,
under the recompute mode chosen for i, compiled once per distinct mode, so the number of
compiled graphs does not grow with depth. Nothing here changes results.

The checkpoint is inside the compiled graph (`compiled(with_recompute(body))`), so the
selective policy sees the graph's ops and keeps attention outputs. With DTensor leaves
the gather is inside too: the local shards are taken before the graph and gathered in it
with functional collectives (parallel.gather), so the all-gathers, their recompute and
the backward reduce-scatters are graph nodes.

Recompute modes per block (full / selective / offload / none): graphs/recompute.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from graphs import backends
from graphs.recompute import Recompute, offload_saved, with_recompute
from hvfunc import dit
from hvfunc.params import Params

Backend = Literal["none", "auto", "inductor", "aot_eager", "eager", "torchair"]


@dataclass(frozen=True, kw_only=True)
class Compile:
    """torch.compile of the block functions."""

    backend: Backend = "none"
    """auto (by device: inductor on CPU/CUDA, torchair on NPU), inductor, torchair (Ascend,
    unverified here), aot_eager / eager (debugging), none."""
    dynamic: bool | None = None
    """None: dynamo makes a dim dynamic once it changes (training buckets); False: static."""
    mode: str | None = None
    """Inductor mode, e.g. "max-autotune" (sampling captures its CUDA graph in graphs.sampling,
    not through "reduce-overhead": see there)."""
    options: tuple[str, ...] = ()
    """torchair only: its CompilerConfig as KEY=VALUE settings (dotted paths), e.g.
    mode=reduce-overhead experimental_config.frozen_parameter=True (Ascend, unverified here)."""

    def __post_init__(self) -> None:
        if self.mode is not None and self.backend not in ("inductor", "auto"):
            raise ValueError(f"compile mode {self.mode!r} is an Inductor mode; backend is {self.backend!r} "
                             "(torchair: use options, e.g. mode=reduce-overhead)")
        if self.options and self.backend not in ("torchair", "auto"):
            raise ValueError(f"compile options {list(self.options)} configure torchair; backend is {self.backend!r}")


class ShardedPrepare(Protocol):
    """`prepare` of DTensor leaves (parallel.gather.BlockGather)."""

    def __call__(self, params: Params) -> Params:
        """Eager: DTensor leaves -> compute leaves."""

    def shards(self, params: Params) -> tuple[Params, Any]:
        """Outside a compiled region: plain local shards (differentiable) and a static layout."""

    def gather(self, local: Params, layout: Any) -> Params:
        """Inside it (traceable): local shards -> compute leaves."""


def resolve(c: Compile, device: torch.device | str) -> Compile:
    """backend "auto" -> the device's backend (graphs.backends.default_compile_backend)."""
    return dataclasses.replace(c, backend=backends.default_compile_backend(device)) if c.backend == "auto" else c


def compiled(fn: Callable, c: Compile, backend_fn: Callable | None = None) -> Callable:
    if c.backend == "none" and backend_fn is None:
        return fn
    backend = backend_fn or (backends.torchair_backend(c.options) if c.backend == "torchair" else c.backend)
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=c.dynamic, mode=c.mode)


def _sharded(block: Callable, prepare: ShardedPrepare, mode: str, c: Compile, backend_fn: Callable | None):
    """A compiled block over DTensor leaves: shards are taken eagerly, gathered in the graph."""

    def body(local: Params, layout: Any, *args, **kw):
        return block(prepare.gather(local, layout), *args, **kw)

    inner = compiled(with_recompute(body, mode), c, backend_fn)

    def run(p: Params, *args, **kw):
        local, layout = prepare.shards(p)
        return inner(local, layout, *args, **kw)

    return run


def make_blocks(*, prepare: Callable[[Params], Params] | ShardedPrepare | None = None,
                recompute: Recompute = Recompute(), compile: Compile = Compile(), backend_fn: Callable | None = None,
                dtensor_params: bool = False, device: torch.device | str = "cpu") -> dit.Blocks:
    """Blocks with gather/cast, recompute and compile applied (one compiled graph per mode).

    backend_fn: a dynamo backend callable that overrides compile.backend (tests count
    compiled frames with it). dtensor_params: the leaves are DTensors and `prepare` a
    ShardedPrepare (parallel.gather.BlockGather); compiled blocks then gather inside the
    graph from local shards (eager ones call `prepare` on the DTensors)."""
    cache: dict[tuple[str, str], Callable] = {}
    compile = resolve(compile, device)
    compiling = compile.backend != "none" or backend_fn is not None
    if dtensor_params and compiling and not hasattr(prepare, "shards"):
        raise ValueError("compiled blocks over DTensor leaves need prepare=parallel.gather.BlockGather(...) "
                         f"(it gathers inside the graph), got {prepare!r}")

    def fn_for(kind: str, i: int) -> Callable:
        mode = recompute.mode(kind, i)
        if (kind, mode) not in cache:
            block = dit.double_block if kind == "double" else dit.single_block

            def body(p: Params, *args, _block=block, **kw):
                return _block(prepare(p) if prepare else p, *args, **kw)

            inner = "selective" if compiling and mode == "offload" else mode  # offload_saved does it
            if dtensor_params and compiling:
                fn = _sharded(block, prepare, inner, compile, backend_fn)
            else:
                fn = compiled(with_recompute(body, inner), compile, backend_fn)
            cache[kind, mode] = offload_saved(fn) if inner != mode else fn
        return cache[kind, mode]

    return dit.Blocks(double=lambda i: fn_for("double", i), single=lambda i: fn_for("single", i))
