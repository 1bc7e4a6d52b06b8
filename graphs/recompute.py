"""Activation recompute per block: full, selective (keep attention outputs) and selective
with the kept attention outputs offloaded to pinned host memory.

Modes (per stream, like the seed's double/single_stream_full_recompute_layers):
  full       the first N blocks keep only their inputs and recompute everything
  selective  the other blocks keep attention outputs and recompute the rest (matmuls,
             norms, parameter gathers): attention is the costliest op to redo
  offload    selective, but each kept attention output [B, L, N, K] (and its log-sum-exp)
             is copied to pinned host memory on a side stream as soon as attention has
             produced it, so the device holds only the block inputs until backward. The
             backward's recompute starts copying them back on the side stream when it
             enters the block, overlapping the copy with the recomputed q|k|v matmuls.
             On CPU the "host" copy is a plain copy (no memory saved; it runs so the
             path is tested everywhere).
Eager blocks offload with a pair of dispatch modes (save/offload in the forward, replay in
the recompute) handed to torch.utils.checkpoint as its context_fn. Compiled blocks keep
torch's selective policy inside the graph (dynamo accepts no other context_fn), and
`offload_saved` moves what the compiled block saves for its backward, apart from its
inputs, through saved_tensors_hooks: the same tensors, reloaded when the backward needs
them rather than prefetched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from hvfunc.params import Params

Mode = Literal["none", "full", "selective", "offload"]


@dataclass(frozen=True, kw_only=True)
class Recompute:
    """Activation recompute per stream."""

    double_full: int = 0
    """Double-stream blocks (from the first) with full recompute (MindSpeed-MM:
    double_stream_full_recompute_layers)."""
    single_full: int = 0
    """Single-stream blocks (from the first) with full recompute (MindSpeed-MM:
    single_stream_full_recompute_layers)."""
    selective: bool = False
    """Remaining blocks: keep attention outputs, recompute everything else."""
    offload: bool = False
    """With selective: keep those attention outputs in pinned host memory, copied
    asynchronously (saves device memory on CUDA/NPU; eager or compiled blocks)."""

    def mode(self, kind: str, i: int) -> Mode:
        """The mode of double ("double") or single ("single") block i."""
        if self.offload and not self.selective:
            raise ValueError("recompute.offload moves the attention outputs that selective recompute keeps: "
                             "set recompute.selective too")
        if i < (self.double_full if kind == "double" else self.single_full):
            return "full"
        return ("offload" if self.offload else "selective") if self.selective else "none"


_ATTN_OPS = tuple(getattr(torch.ops.aten, n) for n in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, n))


def is_attention(op) -> bool:
    """An attention kernel (the policy sees overloads like aten.x.default)."""
    packet = getattr(op, "overloadpacket", op)
    return packet in _ATTN_OPS or "npu_fusion_attention" in str(packet)  # torch_npu's, when loaded


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if is_attention(op) else CheckpointPolicy.PREFER_RECOMPUTE


@dataclass
class _Host:
    tensor: Tensor  # pinned, on the host
    device: torch.device  # where it came from


def _copy(t: Tensor, device: torch.device | str, *, pin: bool = False) -> Tensor:
    """t copied to device with t's exact strides (a compiled backward asserts the strides of
    what its forward saved: an attention output [B, N, L, K] is a transposed [B, L, N, K])."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device, pin_memory=pin)
    return out.copy_(t, non_blocking=out.device.type != t.device.type)


class _Store:
    """The attention outputs of one checkpointed call, in host memory between its forward
    and its recompute. Copies run on a side stream of the tensors' accelerator."""

    def __init__(self) -> None:
        self.host: list = []
        self.back: list = []
        self.stream = None

    def _side(self, device: torch.device):
        mod = getattr(torch, device.type)
        if self.stream is None:
            self.stream = mod.Stream(device)
        return mod, self.stream

    def down(self, t):
        """A tensor -> its pinned host copy (started on the side stream); CPU: a plain copy."""
        if not isinstance(t, Tensor):
            return t
        if t.device.type == "cpu":
            return _copy(t, t.device)
        mod, side = self._side(t.device)
        side.wait_stream(mod.current_stream(t.device))  # t is complete on the compute stream
        with mod.stream(side):
            h = _copy(t, "cpu", pin=True)
        t.record_stream(side)  # its memory is not reused before the copy has read it
        return _Host(h, t.device)

    def offload(self, out) -> None:
        self.host.append(tree_map(self.down, out, is_leaf=lambda x: isinstance(x, Tensor)))

    def start_reload(self) -> None:
        def up(e):
            if not isinstance(e, _Host):
                return e
            mod, side = self._side(e.device)
            with mod.stream(side):
                return _copy(e.tensor, e.device)

        self.back = [tree_map(up, e, is_leaf=lambda x: isinstance(x, _Host)) for e in self.host]
        self.host = []

    def take(self, i: int):
        out = self.back[i]
        self.back[i] = None
        if self.stream is not None:
            def ready(t):
                if isinstance(t, Tensor) and t.device.type != "cpu":
                    mod = getattr(torch, t.device.type)
                    mod.current_stream(t.device).wait_stream(self.stream)
                    t.record_stream(mod.current_stream(t.device))
                return t

            out = tree_map(ready, out)
        return out


class _Offload(TorchDispatchMode):
    def __init__(self, store: _Store) -> None:
        super().__init__()
        self.store = store

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if is_attention(func):
            self.store.offload(out)
        return out


class _Replay(TorchDispatchMode):
    def __init__(self, store: _Store) -> None:
        super().__init__()
        self.store, self.i = store, 0

    def __enter__(self):
        self.store.start_reload()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not is_attention(func):
            return func(*args, **(kwargs or {}))
        if self.i >= len(self.store.back):
            raise RuntimeError("attention ran more often in the recompute than in the forward "
                               "(the block must be deterministic in its control flow)")
        self.i += 1
        return self.store.take(self.i - 1)


def offload_saved(fn: Callable) -> Callable:
    """fn (a compiled selective block: one autograd node) with the tensors it saves for the
    backward that are not its inputs - the kept attention outputs and their log-sum-exp -
    offloaded: copied to pinned host memory on a side stream when saved, copied back on the
    compute stream when its backward needs them. Compiled graphs hide their ops from
    dispatch modes, but not their saved tensors from saved_tensors_hooks."""

    def run(*args, **kw):
        local = [getattr(t, "to_local", lambda t=t: t)() for t in tree_leaves((args, kw)) if isinstance(t, Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in local}  # (DTensor leaves: their local shards)
        store = _Store()

        def pack(t: Tensor):
            return t if t.untyped_storage().data_ptr() in inputs else store.down(t)

        def unpack(e) -> Tensor:
            return _copy(e.tensor, e.device) if isinstance(e, _Host) else e

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return fn(*args, **kw)

    return run


def _offload_contexts() -> tuple[TorchDispatchMode, TorchDispatchMode]:
    store = _Store()
    return _Offload(store), _Replay(store)


def with_recompute(fn: Callable, mode: Mode) -> Callable:
    """fn under the recompute mode (non-reentrant checkpoint; identity for "none")."""
    if mode == "none":
        return fn
    context = {"full": None, "selective": functools.partial(create_selective_checkpoint_contexts, _keep_attention),
               "offload": _offload_contexts}[mode]

    def run(p: Params, *args, **kw):
        extra = {} if context is None else {"context_fn": context}
        return checkpoint(fn, p, *args, use_reentrant=False, **extra, **kw)

    return run
