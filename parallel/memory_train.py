"""Training under a MemoryConfig (graphs/swap.py): the frozen base of a LoRA run stored as fp8
(graphs/fp8.py) and/or its last N blocks swapped to host memory, and the prepare chain that
undoes that storage per block. Adapters and every other trainable leaf stay on the device in fp32.

Storage (trainer._params, one leaf at a time): a frozen block linear is quantized whole on the
device (so its row scales do not depend on the layout), then the fp8 values and the fp32 scale
[..., D_out, 1] are sharded by the weight's plan (a Shard of the last dim becomes Replicate for
the scale: a row's scale belongs to every shard of the row). A swapped block's frozen leaves
keep their local shard only, in the block's host buffer (graphs.swap.BlockSwap), with the
gather layout their DTensor had (parallel.gather.layout): a swapped or fp8 leaf is still one
placement per leaf, and the tree holds the host view instead of the DTensor.

The prepare chain (DESIGN decision 9), `StoredGather`, per block:
  shards   DTensor leaves -> local shards (BlockGather.shards); the host views of a swapped
           block -> their device views in the ring (BlockSwap.fetch), outside any graph
  gather   fp8 leaves -> compute dtype (in the graph when compiled), then cast + FSDP gather
           (BlockGather.gather) of the local shards
Eager blocks run both inside their checkpoint, so a recompute fetches again (in the backward
order). The backward of a block without recompute, and the backward or recompute of a
compiled block (its graph saves its inputs, the slot views), unpack what was saved through
BlockSwap.saved's hooks (`wrap`): a saved slot view is refetched, never read after its slot
was reused. The frozen leaves need no gradient, so fetch and dequantize have no backward.

Refused: full finetuning (nothing is frozen; swapping trainable fp32 masters with their
gradients and AdamW state is not built) and, with compiled blocks, recompute.offload (its
saved-tensor hooks would hide the slot views from the swap's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributed.tensor import Placement, Replicate

from graphs import fp8
from graphs.blocks import Compile
from graphs.precision import compute_dtypes
from graphs.recompute import Recompute
from graphs.swap import BlockSwap, MemoryConfig, swapped_prefixes
from hvfunc import dit
from hvfunc.config import DiTConfig
from hvfunc.params import Params
from parallel import gather, plan
from parallel.lora_train import Tuning
from parallel.mesh import Meshes


def _scale_placements(placements: tuple[Placement, ...], ndim: int) -> tuple[Placement, ...]:
    return tuple(Replicate() if p.is_shard() and p.dim == ndim - 1 else p for p in placements)


@dataclass
class FrozenStore:
    """How this run stores its frozen leaves, and (after `finish`) the block swap."""

    mem: MemoryConfig
    swapped: tuple[str, ...]
    """Swapped block prefixes in run order."""
    split: frozenset[str]
    sp: bool
    host: dict[str, Params] = field(default_factory=dict)
    """Swapped blocks' local shards (block-relative names) until `finish` moves them into BlockSwap."""
    layouts: dict[str, dict[str, gather.Layout]] = field(default_factory=dict)
    """Per swapped block: each leaf's gather layout (from its DTensor)."""
    swap: BlockSwap | None = None

    def shard(self, k: str, v: Tensor, placements: tuple[Placement, ...], meshes: Meshes) -> Params:
        """A frozen whole leaf (compute dtype, on the device) -> the tree's entries for it."""
        leaves = {k: v}
        if self.mem.fp8_weights and fp8.is_block_linear(k, v):
            leaves = dict(zip((k, k + fp8.SCALE), fp8.quantize(v)))
        out = {}
        for name, t in leaves.items():
            pl = placements if name == k else _scale_placements(placements, t.ndim)
            d = plan.shard({name: t}, {name: pl}, meshes)[name]
            pre = next((p for p in self.swapped if name.startswith(p)), None)
            if pre is None:
                out[name] = d
                continue
            rel = name[len(pre):]
            self.layouts.setdefault(pre, {})[rel] = gather.layout(rel, d, split=plan.is_split(rel, self.split),
                                                                  sp=self.sp)
            self.host.setdefault(pre, {})[rel] = out[name] = d.to_local().cpu()
        return out

    def finish(self, params: Params, device: torch.device) -> Params:
        """The tree with the swapped leaves as views of BlockSwap's host buffers."""
        if not self.swapped:
            return params
        self.swap = BlockSwap({pre: self.host[pre] for pre in self.swapped}, device)
        self.host = {}
        return params | self.swap.host_tree()

    def prepare(self, base: gather.BlockGather) -> StoredGather:
        return StoredGather(base, self)

    def wrap(self, blocks: dit.Blocks) -> dit.Blocks:
        """The swapped blocks under BlockSwap.saved (saved slot views refetched in the backward)."""
        return blocks if self.swap is None else self.swap.wrap_saved(blocks)


def frozen_store(mem: MemoryConfig, model: DiTConfig, tune: Tuning, *, compile: Compile, recompute: Recompute,
                 split: frozenset[str], sp: bool) -> FrozenStore | None:
    """The run's FrozenStore (None without --memory.*); settings that cannot work raise ValueError."""
    if not mem.enabled:
        return None
    flags = " ".join(([f"--memory.blocks-to-swap {mem.blocks_to_swap}"] if mem.blocks_to_swap else [])
                     + (["--memory.fp8-weights"] if mem.fp8_weights else []))
    if tune.adapters is None:
        raise ValueError(f"{flags} stores frozen weights, and full finetuning (no --lora.enabled) freezes none: "
                         "every leaf trains in fp32 with its gradient and AdamW state on the device. "
                         "Use --lora.enabled, or leave --memory.* off")
    if mem.fp8_weights:
        fp8.require()
    swapped = tuple(swapped_prefixes(model, mem.blocks_to_swap))
    if swapped and recompute.offload and compile.backend != "none":
        raise ValueError(f"{flags} with compiled blocks (--compile.backend {compile.backend}) and --recompute.offload "
                         "is not built (the offload's saved-tensor hooks would keep the swapped weights' device views): "
                         "drop --recompute.offload, or use --compile.backend none")
    return FrozenStore(mem, swapped, split, sp)


@dataclass(frozen=True)
class StoredGather:
    """ShardedPrepare (graphs.blocks) over a FrozenStore's tree: host -> device (swapped blocks),
    then fp8 upcast to each leaf's compute dtype, then BlockGather's cast and gather."""

    base: gather.BlockGather
    store: FrozenStore

    def __call__(self, params: Params) -> Params:
        return self.gather(*self.shards(params))

    def shards(self, params: Params) -> tuple[Params, dict[str, gather.Layout]]:
        local, layouts = self.base.shards(params)
        swap = self.store.swap
        pre = swap.owner(local) if swap is not None else None
        if pre is not None:
            own = self.store.layouts[pre]
            local = local | swap.fetch(pre, {k: local[k] for k in own})
            layouts = {k: own[k] if k in own else layouts[k] for k in local if k in own or k in layouts}
        return local, layouts

    def gather(self, local: Params, layouts: dict[str, gather.Layout]) -> Params:
        if self.store.mem.fp8_weights:
            local = fp8.dequantize(local, compute_dtypes(local, self.base.policy))
        return self.base.gather(local, layouts)
