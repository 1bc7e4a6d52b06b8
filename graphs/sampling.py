"""Fast sampling: the training's compiled block functions with static shapes, and a CUDA graph
of the step. Nothing here changes results (eager hvfunc.sample.denoise is the escape hatch).

Compile: `graphs.blocks.make_blocks` with `Compile(dynamic=False)`, i.e. the same two
block graphs as training (one per block kind, independent of depth). Every step has the
same shapes, t reaches the blocks only as the tensor `vec`, so N steps compile the same
frames as one step (tests count them).

CUDA graphs: `hvfunc.sample.Step.update` (all blocks, final layer, CFG mix, Euler update)
is captured once per run with torch.cuda.CUDAGraph after warm-up on a side stream, and
replayed every step after its inputs (the embedded tokens, text, modulation vectors,
RoPE tables, latents, dt) are copied into static buffers. The parameters are read in
place at their fixed addresses: a graph records pointers, so nothing is copied per step.
`Step.embed` (patch / text / vector embedding, a small share of the work) stays eager
because hvfunc.dit.embed reads text lengths on the host, which a capture cannot do.
Why not inductor's mode="reduce-overhead": its CUDA-graph trees see our parameters as
plain function inputs (they are dict leaves, not nn.Module parameters), so every call of
a block with another block's weights either copies them into static buffers or records a
new graph; and it would leave the final layer, CFG and Euler update uncaptured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from graphs.blocks import Backend, Compile, make_blocks
from hvfunc import dit, sample
from hvfunc.params import Params

# Embedded fields that change every step (copied into the graph's buffers); grid and
# first are ints fixed by the run's shapes.
_TENSORS = ("img", "txt", "vec", "vec_first", "txt_len")


@dataclass(frozen=True, kw_only=True)
class SampleGraphs:
    """How the sampling step runs."""

    backend: Backend = "none"
    """Compile the blocks: auto (inductor on CPU/CUDA, torchair on NPU), inductor, aot_eager, none (eager)."""
    cuda_graph: bool = False
    """Capture the step (blocks, final layer, CFG, Euler) in a CUDA graph; CUDA only."""


def sampling_blocks(g: SampleGraphs, *, device: torch.device | str = "cpu",
                    backend_fn: Callable | None = None) -> dit.Blocks:
    """The training's block functions compiled for fixed shapes (backend_fn: a counting backend in tests)."""
    return make_blocks(compile=Compile(backend=g.backend, dynamic=False), backend_fn=backend_fn, device=device)


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


def static_runner(step: sample.Step, capture: Capture = cuda_capture) -> sample.StepFn:
    """A StepFn that runs step.embed eagerly and step.update through `capture` on static buffers.

    The first call allocates the buffers and captures; later calls copy their inputs in and
    replay. Inputs whose shape, dtype or presence differ from the captured ones raise."""
    state: dict = {}

    def run(x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        if capture is cuda_capture and x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors; the latents are on {x.device} "
                             "(CUDA graphs do not exist there: use cuda_graph=False)")
        e = step.embed(x, t)
        inputs = {"x": x, "dt": dt, "cos": e.rope[0], "sin": e.rope[1], **{k: getattr(e, k) for k in _TENSORS}}
        sig = (e.grid, e.first, {k: None if v is None else (v.shape, v.dtype, v.device) for k, v in inputs.items()})
        if not state:
            buf = {k: None if v is None else v.clone() for k, v in inputs.items()}
            fixed = dataclasses.replace(e, rope=(buf["cos"], buf["sin"]), **{k: buf[k] for k in _TENSORS})
            state.update(sig=sig, buf=buf, replay=capture(lambda: step.update(fixed, buf["x"], buf["dt"])))
        elif sig != state["sig"]:
            raise ValueError(f"a captured sampling step needs fixed inputs: captured {state['sig']}, got {sig}")
        else:
            for k, v in inputs.items():
                if v is not None:
                    state["buf"][k].copy_(v)
        return state["replay"]().clone()  # the next replay overwrites the graph's output

    return run


def denoise(params: Params, noise: Tensor, cond: sample.Cond, uncond: sample.Cond | None = None, *,
            graphs: SampleGraphs = SampleGraphs(), backend_fn: Callable | None = None, **kw) -> Tensor:
    """hvfunc.sample.denoise with compiled blocks and, if asked, the step in a CUDA graph.

    kw: cfg, sampling, image_latents, attn, callback (as hvfunc.sample.denoise)."""
    blocks = sampling_blocks(graphs, device=noise.device, backend_fn=backend_fn)
    return sample.denoise(params, noise, cond, uncond, blocks=blocks,
                          runner=static_runner if graphs.cuda_graph else None, **kw)
