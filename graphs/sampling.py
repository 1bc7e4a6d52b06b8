"""Fast sampling: the training's compiled block functions with static shapes, and a CUDA graph
of the step. Nothing here changes results (eager hvfunc.sample.denoise is the escape hatch).

Compile: `graphs.blocks.make_blocks` with `Compile(dynamic=False)`, i.e. the same two
block graphs as training (one per block kind, independent of depth). Every step has the
same shapes, t reaches the blocks only as the tensor `vec`, so N steps compile the same
frames as one step (tests count them).

CUDA graphs: the whole step of `hvfunc.sample.make_step` (embedding, all blocks, final layer, CFG mix,
Euler update; it reads nothing on the host: the text layout is read once per run) is
captured once per run with torch.cuda.CUDAGraph after warm-up on a side stream, and
replayed every step after its inputs (latents, t, dt) are copied into static buffers.
Conditioning and parameters are read in place at their fixed addresses: a graph records
pointers, so nothing else is copied per step.
A step cache (hvfunc.cache) decides on the host every step: it works with compiled blocks
(double block 0 is the same compiled block, called alone first), not inside a CUDA graph.
Why not inductor's mode="reduce-overhead": its CUDA-graph trees see our parameters as
plain function inputs (they are dict leaves, not nn.Module parameters), so every call of
a block with another block's weights either copies them into static buffers or records a
new graph; and it would leave the final layer, CFG and Euler update uncaptured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from graphs.blocks import Backend, Compile, make_blocks
from graphs.swap import Stored
from hvfunc import dit, sample
from hvfunc.cache import StepCache
from hvfunc.params import Params


@dataclass(frozen=True, kw_only=True)
class SampleGraphs:
    """How the sampling step runs."""

    backend: Backend = "none"
    """Compile the blocks: auto (inductor on CPU/CUDA, torchair on NPU), inductor, aot_eager, none (eager)."""
    cuda_graph: bool = False
    """Capture the step (blocks, final layer, CFG, Euler) in a CUDA graph; CUDA only."""


def sampling_blocks(g: SampleGraphs, *, device: torch.device | str = "cpu", backend_fn: Callable | None = None,
                    stored: Stored | None = None) -> dit.Blocks:
    """The training's block functions compiled for fixed shapes (backend_fn: a counting backend in tests).

    stored: weights stored under a MemoryConfig (graphs.swap.store): fp8's upcast becomes the
    blocks' prepare (inside the compiled graph), the host -> device swap runs before them."""
    def make(prepare):
        return make_blocks(prepare=prepare, compile=Compile(backend=g.backend, dynamic=False), backend_fn=backend_fn,
                           device=device)

    return make(None) if stored is None else stored.blocks(make)


Capture = Callable[[Callable[[], Tensor]], Callable[[], Tensor]]


def cuda_capture(fn: Callable[[], Tensor], *, warmup: int = 2) -> Callable[[], Tensor]:
    """Record fn (reading only static buffers) in a CUDA graph; returns replay() -> its output buffer.

    Warm-up runs on a side stream first (compiles, cuBLAS / SDPA workspaces, lazy init), as the
    torch.cuda.graphs docs require, so nothing compiles or initialises during capture; what the
    captured step allocates comes from the graph's private memory pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay


def static_runner(step: sample.StepFn, capture: Capture = cuda_capture) -> sample.StepFn:
    """A StepFn that runs the whole step through `capture` on static buffers.

    The first call allocates the buffers (x, t, dt) and captures; later calls copy their
    inputs in and replay. Inputs whose shape, dtype or device differ from the captured ones raise."""
    state: dict = {}

    def run(x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        if capture is cuda_capture and x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors; the latents are on {x.device} "
                             "(CUDA graphs do not exist there: use cuda_graph=False)")
        inputs = (x, t, dt)
        sig = [(v.shape, v.dtype, v.device) for v in inputs]
        if not state:
            buf = [v.clone() for v in inputs]
            state.update(sig=sig, buf=buf, replay=capture(lambda: step(*buf)))
        elif sig != state["sig"]:
            raise ValueError(f"a captured sampling step needs fixed inputs: captured {state['sig']}, got {sig}")
        else:
            for b, v in zip(state["buf"], inputs):
                b.copy_(v)
        return state["replay"]().clone()  # the next replay overwrites the graph's output

    return run


def denoise(params: Params, noise: Tensor, cond: sample.Cond, uncond: sample.Cond | None = None, *,
            graphs: SampleGraphs = SampleGraphs(), backend_fn: Callable | None = None,
            cache: StepCache | None = None, stored: Stored | None = None, **kw) -> Tensor:
    """hvfunc.sample.denoise with compiled blocks and, if asked, the step in a CUDA graph.

    cache: the opt-in step cache (its skip decision is a host read each step, so not with
    cuda_graph). stored: params is stored.params (graphs.swap.store), the blocks get its stages.
    kw: cfg, sampling, image_latents, attn, callback, stats (as hvfunc.sample.denoise)."""
    if graphs.cuda_graph and cache is not None and cache.enabled:
        raise ValueError(f"cuda_graph=True and cache.kind={cache.kind!r} do not go together: the cache decides "
                         "on the host every step, which a captured step cannot; use one of them")
    blocks = sampling_blocks(graphs, device=noise.device, backend_fn=backend_fn, stored=stored)
    return sample.denoise(params, noise, cond, uncond, blocks=blocks,
                          runner=static_runner if graphs.cuda_graph else None, cache=cache, **kw)
