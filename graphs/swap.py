"""Block swap: the host -> device stage of the per-block prepare chain, and how a DiT tree is
stored under a MemoryConfig (swap and fp8 storage, graphs/fp8.py) for sampling.

The last `blocks_to_swap` blocks of the run order (double 0..D-1, then single 0..S-1)
live in host memory, each block as one flat byte buffer (pinned on CUDA / NPU, its leaves
are views of it). (musubi-tuner also swaps from the end, but of each list: its N swaps
N // 2 double and 2 (N - N // 2) + 1 single blocks, so its 38 is 19 + 39 of our 60.)
The device holds a ring of 2 flat slots, each the size of the largest swapped block.
Entering swapped block j waits for its copy (issued one swapped block earlier on a side
stream, or now on a miss) and issues the copy of the block that comes next into the other
slot (unless a slot holds it already), after the work already queued on the compute stream
(which last read that slot), so the copy overlaps block j's compute. What comes next:
in a forward the next swapped block; after the last one the first (no grad: the next
forward) or the one before it (grad on: the backward goes back through the blocks); in a
backward (autograd's graph task running) the previous one.
Leaf bytes are copied as they are: the swapped path computes what the resident path does,
bit for bit. On CPU the "device" is the CPU and the stage is a plain copy into the ring.

With compiled blocks the copy stays outside the graph: `wrap` runs it before the compiled
block function, and the graph sees the slot's views as its weight inputs; fp8's upcast is
inside the graph. Chosen by construction, not measured: the side stream, its events and the
ring's Python state are not traceable, so an in-graph copy would need another design (a
custom op); no benchmark compares the two (bench_sample has no swap mode; no GPU run yet).

Training (frozen weights only, parallel/memory_train.py): a slot is overwritten two swapped
blocks later, so nothing autograd keeps may point into it. `saved` runs a swapped block
under saved-tensor hooks: a saved tensor that aliases a slot is stored as (block, byte
offset, size, stride, dtype), and unpacking it in the backward enters that block again
(its copy, or a hit, and the previous block's copy started), then returns the same view.
Exact (the same bytes at the same strides), with no change to any block or backward
formula; autograd's own saved tensors elsewhere are untouched. A recompute (checkpoint)
saves nothing through these hooks: its recompute forward runs the prepare chain again,
fetching in the backward order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from graphs import fp8
from hvfunc import dit
from hvfunc.config import DiTConfig
from hvfunc.params import Params

ALIGN = 256  # byte offset of every leaf in a flat buffer (any dtype's view, vectorised copies)


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """How the DiT's block weights are stored on one device (sampling; training: the frozen base only)."""

    blocks_to_swap: int = 0
    """Blocks (counted from the end of the run order: single blocks last first, then double)
    kept in pinned host memory and copied to the device one block ahead while the previous
    one computes (training: their frozen weights, refetched for the backward). Same results;
    slower when the copy outlasts a block's compute."""
    fp8_weights: bool = False
    """Store block linears (training: the frozen ones) as float8_e4m3fn with an fp32 scale per
    output row, upcast per block (weight-only). Changes results (bound in graphs/fp8.py); opt-in."""

    @property
    def enabled(self) -> bool:
        return self.blocks_to_swap > 0 or self.fp8_weights


def block_prefixes(cfg: DiTConfig) -> list[str]:
    """Block leaf prefixes in run order (hvfunc.dit.run_blocks)."""
    return ([f"double_blocks.{i}." for i in range(cfg.mm_double_blocks_depth)]
            + [f"single_blocks.{i}." for i in range(cfg.mm_single_blocks_depth)])


def swapped_prefixes(cfg: DiTConfig, n: int) -> list[str]:
    order = block_prefixes(cfg)
    if not 0 <= n <= len(order):
        raise ValueError(f"--memory.blocks-to-swap {n} is outside 0..{len(order)} (the DiT has "
                         f"{cfg.mm_double_blocks_depth} double + {cfg.mm_single_blocks_depth} single blocks)")
    return order[len(order) - n:]


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    nbytes: int


def block_bytes(p: Params) -> int:
    """Bytes of a block's flat host buffer (and of a ring slot for it): leaves at ALIGN offsets."""
    return _layout(p).nbytes


def _layout(p: Params) -> _Layout:
    offsets, off = [], 0
    for v in p.values():
        offsets.append(off)
        off += -(-v.numel() * v.element_size() // ALIGN) * ALIGN
    return _Layout(tuple(p), tuple(v.dtype for v in p.values()), tuple(v.shape for v in p.values()),
                   tuple(offsets), off)


def _views(buf: Tensor, lay: _Layout) -> Params:
    """The leaves of one block as views of a flat uint8 buffer."""
    out = {}
    for k, dt, shape, off in zip(lay.names, lay.dtypes, lay.shapes, lay.offsets):
        n = shape.numel() * torch.empty((), dtype=dt).element_size()
        out[k] = buf[off:off + n].view(dt).view(shape)
    return out


@dataclass
class _Slot:
    buf: Tensor
    holds: str | None = None
    ready: object | None = None  # event recorded after the copy into buf (accelerators)


class _Saved(NamedTuple):
    """A saved tensor that aliased a slot: which block's bytes, and where in the slot."""

    pre: str
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int  # in elements of dtype


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)  # set while autograd's engine runs
    return task is not None and task() != -1


class BlockSwap:
    """Swapped blocks in host memory and the 2-slot device ring; `fetch` is the prepare stage."""

    def __init__(self, blocks: dict[str, Params], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.order = list(blocks)
        accel = self.device.type != "cpu"
        self.layout = {pre: _layout(p) for pre, p in blocks.items()}
        self.host: dict[str, Tensor] = {}
        for pre, p in blocks.items():
            buf = torch.empty(self.layout[pre].nbytes, dtype=torch.uint8, pin_memory=accel)
            for k, v in _views(buf, self.layout[pre]).items():
                v.copy_(p[k])
            self.host[pre] = buf
        self.owners = {buf.untyped_storage().data_ptr(): pre for pre, buf in self.host.items()}
        size = max((lay.nbytes for lay in self.layout.values()), default=0)
        self.slots = [_Slot(torch.empty(size, dtype=torch.uint8, device=self.device)) for _ in range(2)]
        self.mod = getattr(torch, self.device.type) if accel else None
        self.stream = self.mod.Stream(self.device) if accel else None
        self.last = 1  # slot the previous swapped block computed from
        self.unpacking: str | None = None  # block whose saved tensors the backward unpacks now
        self.events: list[tuple[str, str]] | None = None  # a test sets [] to record (what, prefix)

    def host_tree(self) -> Params:
        """Full names -> host views of the swapped leaves (what the params tree holds for them)."""
        return {pre + k: v for pre in self.order for k, v in _views(self.host[pre], self.layout[pre]).items()}

    def owner(self, p: Params) -> str | None:
        """The swapped block whose host buffer holds some leaf of p (None: none does)."""
        return next((self.owners[v.untyped_storage().data_ptr()] for v in p.values()
                     if isinstance(v, Tensor) and v.device.type == "cpu"
                     and v.untyped_storage().data_ptr() in self.owners), None)

    @property
    def slot_bytes(self) -> int:
        return self.slots[0].buf.numel()

    def _copy(self, pre: str, s: int) -> None:
        slot, src = self.slots[s], self.host[pre]
        if self.events is not None:
            self.events.append(("copy", pre))
        slot.holds = pre
        if self.stream is None:
            slot.buf[:src.numel()].copy_(src)
            return
        self.stream.wait_stream(self.mod.current_stream(self.device))  # the slot's last reader is queued
        with self.mod.stream(self.stream):
            slot.buf[:src.numel()].copy_(src, non_blocking=True)
            slot.ready = self.mod.Event()
            slot.ready.record(self.stream)

    def _next(self, pre: str) -> str:
        """The swapped block needed after `pre` (module docstring)."""
        i, n = self.order.index(pre), len(self.order)
        if _in_backward():
            return self.order[i - 1] if i > 0 else self.order[1 % n]  # then the next step's forward
        if i + 1 < n:
            return self.order[i + 1]
        return self.order[max(n - 2, 0)] if torch.is_grad_enabled() else self.order[0]

    def _enter(self, pre: str) -> int:
        """The slot holding block `pre` (copied now on a miss: the order changed), the next block's copy started."""
        hit = [s for s, slot in enumerate(self.slots) if slot.holds == pre]
        s = hit[0] if hit else 1 - self.last
        if not hit:  # first block of a run, or the order changed (a step cache skipped blocks)
            self._copy(pre, s)
        nxt = self._next(pre)
        if all(slot.holds != nxt for slot in self.slots):
            self._copy(nxt, 1 - s)
        slot = self.slots[s]
        if slot.ready is not None:
            self.mod.current_stream(self.device).wait_event(slot.ready)
        self.last = s
        return s

    def fetch(self, pre: str, p: Params) -> Params:
        """Block `pre`'s leaves on the device (p: its host views, checked) and the next block's copy started."""
        if set(p) != set(self.layout[pre].names):
            raise RuntimeError(f"block swap: {pre} got leaves {sorted(p)[:3]}..., "
                               f"stored {self.layout[pre].names[:3]}...")
        s = self._enter(pre)
        self.unpacking = None
        if self.events is not None:
            self.events.append(("run", pre))
        return _views(self.slots[s].buf, self.layout[pre])

    def _pack(self, t: Tensor):
        ptr = t.untyped_storage().data_ptr() if t.device.type == self.device.type else None  # cuda vs cuda:0
        for slot in self.slots:
            if ptr == slot.buf.untyped_storage().data_ptr():
                return _Saved(slot.holds, t.dtype, t.shape, t.stride(), t.storage_offset())
        return t

    def _unpack(self, x):
        if not isinstance(x, _Saved):
            return x
        s = self._enter(x.pre)
        if self.events is not None and self.unpacking != x.pre:
            self.events.append(("unpack", x.pre))
        self.unpacking = x.pre
        return self.slots[s].buf.view(x.dtype).as_strided(x.shape, x.stride, x.offset)

    def saved(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Saved-tensor hooks for a swapped block's forward (training): slot views are saved as
        _Saved and refetched when the backward unpacks them."""
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t), lambda x: self._unpack(x))

    def _each(self, blocks: dit.Blocks, stage: Callable[[str, Callable], Callable]) -> dit.Blocks:
        def staged(pre: str, fn: Callable) -> Callable:
            return stage(pre, fn) if pre in self.layout else fn

        return dit.Blocks(double=lambda i: staged(f"double_blocks.{i}.", blocks.double(i)),
                          single=lambda i: staged(f"single_blocks.{i}.", blocks.single(i)))

    def wrap(self, blocks: dit.Blocks) -> dit.Blocks:
        """Blocks whose swapped ones fetch their weights before the (compiled) block function."""
        return self._each(blocks, lambda pre, fn: lambda p, *args, **kw: fn(self.fetch(pre, p), *args, **kw))

    def wrap_saved(self, blocks: dit.Blocks) -> dit.Blocks:
        """Training: blocks whose swapped ones run under `saved` (their fetch is a stage of their prepare)."""

        def stage(pre: str, fn: Callable) -> Callable:
            def run(*args, **kw):
                with self.saved():
                    return fn(*args, **kw)

            return run

        return self._each(blocks, stage)


@dataclass
class Stored:
    """A DiT tree stored under a MemoryConfig and the prepare stages that undo the storage."""

    params: Params
    dtype: torch.dtype
    """Compute dtype (fp8 leaves are upcast to it)."""
    swap: BlockSwap | None = None
    fp8: bool = False

    def prepare(self) -> Callable[[Params], Params] | None:
        """The in-graph stage for graphs.blocks.make_blocks (fp8 upcast), None without fp8."""
        return fp8.dequantizer(self.dtype) if self.fp8 else None

    def blocks(self, make: Callable[[Callable | None], dit.Blocks]) -> dit.Blocks:
        """make(prepare) -> Blocks, with the swap stage outside them."""
        blocks = make(self.prepare())
        return self.swap.wrap(blocks) if self.swap is not None else blocks


def store(params: Params, mem: MemoryConfig, *, cfg: DiTConfig, device: torch.device | str,
          dtype: torch.dtype) -> Stored:
    """params (any device, compute dtype) stored for sampling on `device`: fp8 conversion done once
    here, one leaf at a time on the device; swapped blocks into host buffers, the rest on the device."""
    if mem.fp8_weights:
        fp8.require()
    device = torch.device(device)
    swapped = swapped_prefixes(cfg, mem.blocks_to_swap)
    out: Params = {}
    for k, v in params.items():
        home = torch.device("cpu") if k.startswith(tuple(swapped)) else device
        if mem.fp8_weights and fp8.is_block_linear(k, v):  # on the device, one leaf at a time
            out |= {n: t.to(home) for n, t in zip((k, k + fp8.SCALE), fp8.quantize(v.to(device)))}
        else:
            out[k] = v.to(home)
    blocks = {pre: {k[len(pre):]: v for k, v in out.items() if k.startswith(pre)} for pre in swapped}
    swap = None
    if swapped:
        swap = BlockSwap(blocks, device)
        out = {k: v for k, v in out.items() if not k.startswith(tuple(swapped))} | swap.host_tree()
    return Stored(params=out, dtype=dtype, swap=swap, fp8=mem.fp8_weights)
