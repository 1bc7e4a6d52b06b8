"""Block swap: the host -> device stage of the per-block prepare chain, and how a DiT tree is
stored under a MemoryConfig (swap and fp8 storage, graphs/fp8.py) for sampling.

The last `blocks_to_swap` blocks of the run order (double 0..D-1, then single 0..S-1)
live in host memory, each block as one flat byte buffer (pinned on CUDA / NPU, its leaves
are views of it). (musubi-tuner also swaps from the end, but of each list: its N swaps
N // 2 double and 2 (N - N // 2) + 1 single blocks, so its 38 is 19 + 39 of our 60.)
The device holds a ring of 2 flat slots, each the size of the largest swapped block.
Entering swapped block j waits for its copy (issued one swapped block earlier on a side
stream, or now on a miss) and issues the copy of the next swapped block in the cyclic run
order into the other slot, after the work already queued on the compute stream (which
last read that slot), so the copy overlaps block j's compute.
After the last block the first swapped block is fetched for the next step.
Leaf bytes are copied as they are: the swapped path computes what the resident path does,
bit for bit. On CPU the "device" is the CPU and the stage is a plain copy into the ring.

With compiled blocks the copy stays outside the graph: `wrap` runs it before the compiled
block function (streams, events and the ring's Python state are not traceable), and the
graph sees the slot's views as its weight inputs; fp8's upcast is inside the graph.
Sampling only (no autograd: a slot is overwritten two swapped blocks later). Training's
frozen-weight swap with a backward refetch is still to do (issue 15).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from graphs import fp8
from hvfunc import dit
from hvfunc.config import DiTConfig
from hvfunc.params import Params

ALIGN = 256  # byte offset of every leaf in a flat buffer (any dtype's view, vectorised copies)


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """How the DiT's block weights are stored on one device (sampling)."""

    blocks_to_swap: int = 0
    """Blocks (counted from the end of the run order: single blocks last first, then double)
    kept in pinned host memory and copied to the device one block ahead while the previous
    one computes. Same results; slower when the copy outlasts a block's compute."""
    fp8_weights: bool = False
    """Store block linears as float8_e4m3fn with an fp32 scale per output row, upcast per block
    (weight-only). Changes results (bound in graphs/fp8.py); opt-in."""

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
        size = max((lay.nbytes for lay in self.layout.values()), default=0)
        self.slots = [_Slot(torch.empty(size, dtype=torch.uint8, device=self.device)) for _ in range(2)]
        self.mod = getattr(torch, self.device.type) if accel else None
        self.stream = self.mod.Stream(self.device) if accel else None
        self.last = 1  # slot the previous swapped block computed from
        self.events: list[tuple[str, str]] | None = None  # a test sets [] to record ("copy" | "run", prefix)

    def host_tree(self) -> Params:
        """Full names -> host views of the swapped leaves (what the params tree holds for them)."""
        return {pre + k: v for pre in self.order for k, v in _views(self.host[pre], self.layout[pre]).items()}

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

    def fetch(self, pre: str, p: Params) -> Params:
        """Block `pre`'s leaves on the device (p: its host views, checked) and the next block's copy started."""
        if set(p) != set(self.layout[pre].names):
            raise RuntimeError(f"block swap: {pre} got leaves {sorted(p)[:3]}..., "
                               f"stored {self.layout[pre].names[:3]}...")
        hit = [s for s, slot in enumerate(self.slots) if slot.holds == pre]
        s = hit[0] if hit else 1 - self.last
        if not hit:  # first block of a run, or the order changed (a step cache skipped blocks)
            self._copy(pre, s)
        nxt = self.order[(self.order.index(pre) + 1) % len(self.order)]
        if nxt != pre:
            self._copy(nxt, 1 - s)
        slot = self.slots[s]
        if slot.ready is not None:
            self.mod.current_stream(self.device).wait_event(slot.ready)
        self.last = s
        if self.events is not None:
            self.events.append(("run", pre))
        return _views(slot.buf, self.layout[pre])

    def wrap(self, blocks: dit.Blocks) -> dit.Blocks:
        """Blocks whose swapped ones fetch their weights before the (compiled) block function."""

        def staged(pre: str, fn: Callable) -> Callable:
            if pre not in self.layout:
                return fn
            return lambda p, *args, **kw: fn(self.fetch(pre, p), *args, **kw)

        return dit.Blocks(double=lambda i: staged(f"double_blocks.{i}.", blocks.double(i)),
                          single=lambda i: staged(f"single_blocks.{i}.", blocks.single(i)))


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
