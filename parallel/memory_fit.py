"""Which memory settings fit a device: predicted per-rank peak of the 13B DiT for a workload and
a video shape, and the cheapest setting that fits (scripts/plan_memory.py fit; docs/memory.md).

Peak = weights on the device + trainable state + activations + working memory, then a margin:
  weights      the tree as stored (bf16; fp8 block linears + fp32 row scales; swapped blocks in
               pinned host memory and a 2-slot device ring of the largest swapped block), computed
               from the spec exactly as graphs.swap.store lays it out. Training: the frozen base only
               (LoRA); trainable leaves never swap or go fp8.
  state        trainable leaves: fp32 master + fp32 grad + AdamW's two fp32 moments (16 bytes).
  activations  and working memory: measured on fake tensors by graphs.block_memory (per block, the
               bytes kept for the backward and the peak of its forward + backward; around the
               blocks, the embedding, final layer and loss), composed over the 20 + 40 blocks:
               the peak is the largest of the final layer's backward (everything kept), the last
               single block's backward and the last double block's (the single blocks freed),
               the embedding's backward, and AdamW's step (its foreach sqrt is a temporary copy
               of the moments: measured the same way, with parallel.optim's optimizer).
               Sampling: one denoising step's peak (blocks keep nothing between each other).
  margin       x 1.10 for the caching allocator (fragmentation: reserved exceeds allocated) plus
               1 GiB for the CUDA context, cuBLAS / attention workspaces and kernel scratch that
               the fake run does not see. A setting fits when this is <= the device's memory.
FSDP over `ranks` (dp_shard) divides weights and state by the real plan's local shares
(parallel.planning.per_rank on a fake process group) and makes every block leaf a gathered copy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from graphs import block_memory as bm
from graphs import fp8, swap
from graphs.fake_memory import LiveBytes, fake_mode
from hvfunc.config import DiTConfig
from hvfunc.dit_spec import dit_spec
from hvfunc.lora import LoraConfig, lora_spec
from hvfunc.params import Spec, abstract

GiB = 2**30
FRAGMENTATION = 1.10
CONTEXT_BYTES = 1 * GiB
RECOMPUTE = ("none", "selective", "offload", "full")
"""Cheapest first: selective costs ~11% of a step, offload ~2% more (docs/benchmarks.md, H100),
full recompute a whole forward; offload keeps on the device what full keeps (host memory instead)."""
SWAP_STEP = 4
WORKLOADS = ("lora-r32", "lora-r64", "full", "sample")


@dataclass(frozen=True, kw_only=True)
class Shape:
    """A video shape in pixels: height x width x frames."""

    height: int
    width: int
    frames: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'HxWxF', e.g. 720x1280x129; ValueError naming what is wrong."""
        try:
            h, w, f = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {text!r} is not HEIGHTxWIDTHxFRAMES (e.g. 544x960x65)") from None
        if h <= 0 or w <= 0 or h % 16 or w % 16:
            raise ValueError(f"shape {text!r}: height and width must be positive multiples of 16 (the VAE's 8x "
                             f"then the 2x2 patch), got {h}x{w}")
        if f < 1 or (f - 1) % 4:
            raise ValueError(f"shape {text!r}: frames must be 4k + 1 (the causal VAE's 4x in time), got {f}")
        return cls(height=h, width=w, frames=f)

    def grid(self, cfg: DiTConfig) -> tuple[int, int, int]:
        """Video tokens (T', H', W'): the 4x/8x/8x VAE latent over the patch."""
        pt, ph, pw = cfg.patch_size
        return ((self.frames - 1) // 4 + 1) // pt, self.height // 8 // ph, self.width // 8 // pw

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


@dataclass(frozen=True, kw_only=True)
class Setting:
    recompute: Literal["none", "selective", "offload", "full"] = "none"
    fp8: bool = False
    swap: int = 0

    def flags(self, cfg: DiTConfig) -> str:
        rc = {"none": [], "selective": ["--recompute.selective"],
              "offload": ["--recompute.selective", "--recompute.offload"],
              "full": [f"--recompute.double-full {cfg.mm_double_blocks_depth}",
                       f"--recompute.single-full {cfg.mm_single_blocks_depth}"]}[self.recompute]
        mem = (["--memory.fp8-weights"] if self.fp8 else []) + ([f"--memory.blocks-to-swap {self.swap}"]
                                                                if self.swap else [])
        return " ".join(rc + mem) or "no memory flags"


@dataclass(frozen=True)
class Prediction:
    setting: Setting
    weights: int
    """Device bytes of the stored weights (frozen / sampled ones, and the swap ring)."""
    state: int
    """Trainable leaves: masters, grads, AdamW moments."""
    activations: int
    """Peak of activations + working memory (everything not weights or state)."""
    host: int
    """Pinned host bytes (swapped blocks, offloaded attention outputs)."""

    @property
    def raw(self) -> int:
        return self.weights + self.state + self.activations

    @property
    def peak(self) -> int:
        """With the margin (module docstring)."""
        return math.ceil(self.raw * FRAGMENTATION) + CONTEXT_BYTES


@dataclass(frozen=True, kw_only=True)
class Query:
    cfg: DiTConfig
    workload: str
    shape: Shape
    ranks: int = 1

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload {self.workload!r}: choose one of {', '.join(WORKLOADS)}")
        if self.ranks < 1 or (self.ranks > 1 and self.workload == "sample"):
            raise ValueError(f"ranks {self.ranks}: FSDP ranks (>= 1) plan training; sampling here is one device")

    @property
    def train(self) -> bm.Train:
        return {"full": "full", "sample": "none"}.get(self.workload, "lora")

    @property
    def lora_rank(self) -> int:
        return int(self.workload.split("-r")[1]) if self.train == "lora" else 0

    def case(self, s: Setting) -> bm.Case:
        return bm.Case(cfg=self.cfg, grid=self.shape.grid(self.cfg), train=self.train,
                       lora_rank=self.lora_rank or 64, fp8=s.fp8, gathered=self.ranks > 1)

    def settings(self) -> list[Setting]:
        """Candidates, cheapest first: exact before fp8; then recompute level; then fewer swapped blocks."""
        rcs = ("none",) if self.train == "none" else RECOMPUTE
        frozen = self.train != "full"  # only frozen (LoRA's base) or sampled weights swap or go fp8
        n = self.cfg.mm_double_blocks_depth + self.cfg.mm_single_blocks_depth
        swaps = sorted({*range(0, n, SWAP_STEP), n}) if frozen else [0]
        return [Setting(recompute=rc, fp8=f, swap=k) for f in ((False, True) if frozen else (False,))
                for rc in rcs for k in swaps]


@functools.cache
def _shares(cfg: DiTConfig, lora_rank: int, ranks: int) -> tuple[Spec, Spec, dict[str, float]]:
    spec = dit_spec(cfg)
    adapters = lora_spec(cfg, LoraConfig(rank=lora_rank, alpha=float(lora_rank))) if lora_rank else {}
    return spec, adapters, local_fraction(spec | adapters, ranks)


def local_fraction(spec: Spec, ranks: int) -> dict[str, float]:
    """Share of each leaf that rank 0 stores under FSDP over `ranks` (the real plan; 1 rank: all)."""
    if ranks == 1:
        return dict.fromkeys(spec, 1.0)
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel import planning
    from parallel.mesh import ParallelConfig, build

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        local = planning.per_rank(spec, build(ParallelConfig(dp_shard=ranks)))
    finally:
        dist.destroy_process_group()
    return {k: local[k] / math.prod(s.shape) for k, s in spec.items()}


@functools.cache
def _stored_tree(cfg: DiTConfig, fp8_weights: bool) -> dict:
    tree = abstract(dit_spec(cfg), dtype=bm.DTYPE)
    return fp8.quantize_tree(tree) if fp8_weights else tree


def stored_bytes(cfg: DiTConfig, s: Setting, share: dict[str, float] | None = None) -> tuple[int, int]:
    """(device, host) bytes of the bf16 DiT stored as graphs.swap.store stores it (fp8 leaves with
    their scales; swapped blocks as flat 256-byte-aligned host buffers, a ring of 2 on the device)."""
    tree = _stored_tree(cfg, s.fp8)
    share = share or {}
    part = {k: share.get(k.removesuffix(fp8.SCALE), 1.0) for k in tree}
    swapped = swap.swapped_prefixes(cfg, s.swap)
    device = sum(math.ceil(v.nbytes * part[k]) for k, v in tree.items() if not k.startswith(tuple(swapped)))
    blocks = [math.ceil(swap.block_bytes({k: v for k, v in tree.items() if k.startswith(pre)}) *
                        max(part[k] for k in tree if k.startswith(pre))) for pre in swapped]
    return device + 2 * max(blocks, default=0), sum(blocks)


@functools.cache
def adamw_scratch_per_byte() -> float:
    """Peak bytes above its state that parallel.optim's AdamW step allocates, per byte of fp32
    trainable leaves (measured on fake leaves, second step: the moments exist)."""
    from parallel.optim import OptimConfig, make_optimizer

    with fake_mode():
        params = {f"w{i}": torch.empty(1000, 100).requires_grad_(True) for i in range(4)}
        for v in params.values():
            v.grad = torch.empty_like(v)
        opt = make_optimizer(params, OptimConfig())
        opt.step()
        live = LiveBytes()
        with live:
            opt.step()
    return live.peak / sum(v.nbytes for v in params.values())


def _blocks(q: Query, s: Setting) -> tuple[bm.Levels, bm.Levels, tuple[int, int]]:
    """(double, single) block levels on the device under s's recompute, and their host bytes."""
    case = q.case(s)
    if s.recompute != "offload":
        return bm.block(case, "double", s.recompute), bm.block(case, "single", s.recompute), (0, 0)
    out, host = [], []
    for kind in ("double", "single"):  # device: what full keeps; host: selective's extra; peak: selective's
        full, sel = bm.block(case, kind, "full"), bm.block(case, kind, "selective")
        out.append(bm.Levels(held=full.held, peak=sel.peak))
        host.append(sel.held - full.held)
    return out[0], out[1], (host[0], host[1])


def activations(q: Query, s: Setting) -> tuple[int, int]:
    """(peak bytes of activations and working memory, pinned host bytes) of a training step."""
    d, n = q.cfg.mm_double_blocks_depth, q.cfg.mm_single_blocks_depth
    dbl, sgl, host = _blocks(q, s)
    o = bm.outer(q.case(s))
    kept = o.kept + d * dbl.held + n * sgl.held
    peak = max(kept + o.final, kept - sgl.held + sgl.peak, o.kept + (d - 1) * dbl.held + dbl.peak,
               o.kept + o.embed_bwd)
    return peak, d * host[0] + n * host[1]


@functools.cache
def predict(q: Query, s: Setting) -> Prediction:
    spec, adapters, share = _shares(q.cfg, q.lora_rank, q.ranks)
    trained = spec if q.train == "full" else adapters
    fp32 = sum(math.ceil(math.prod(v.shape) * share[k]) * 4 for k, v in trained.items())
    state = 4 * fp32  # master, grad, exp_avg, exp_avg_sq
    device, host = (0, 0) if q.train == "full" else stored_bytes(q.cfg, s, share)
    if q.train == "none":
        return Prediction(s, device, 0, bm.sampling(q.case(s)), host)
    act, act_host = activations(q, s)
    act = max(act, math.ceil(fp32 * adamw_scratch_per_byte()))  # the optimizer step runs after the backward
    return Prediction(s, device, state, act, host + act_host)


def fits(p: Prediction, device_gb: float, host_gb: float | None) -> bool:
    return p.peak <= device_gb * GiB and (host_gb is None or p.host <= host_gb * GiB)


@dataclass(frozen=True)
class Answer:
    query: Query
    plain: Prediction
    chosen: Prediction | None
    options: list[Prediction]
    """Per (fp8, recompute) the fewest swapped blocks that fit, cheapest first."""
    smallest: Prediction
    """The lowest predicted peak of all settings (what comes closest when nothing fits)."""


def fit(q: Query, device_gb: float, host_gb: float | None = None) -> Answer:
    """The cheapest setting that fits (Query.settings' order), the plain one, and the alternatives."""
    options, seen, smallest = [], set(), None
    for s in q.settings():
        p = predict(q, s)
        smallest = p if smallest is None or p.peak < smallest.peak else smallest
        if (s.fp8, s.recompute) not in seen and fits(p, device_gb, host_gb):
            options.append(p)
            seen.add((s.fp8, s.recompute))
    return Answer(q, predict(q, Setting()), options[0] if options else None, options, smallest)


