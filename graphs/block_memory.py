"""Device bytes of the DiT's activations at full size, measured without memory or compute.

Every number here comes from running the real code (hvfunc.dit's blocks, graphs.blocks'
recompute, graphs.fp8's upcast) on fake tensors (FakeTensorMode: shapes and dtypes, no
storage) under graphs.fake_memory.LiveBytes, which counts the bytes of the storages each op
allocates and frees. No formula for what autograd or a checkpoint keeps is written here.

What is measured, for a `Case` (model, token grid, what trains, how the frozen weights are
stored), batch 1, compute dtype bf16, eager blocks (torch's CPU flash-attention kernel,
which saves what the CUDA flash kernel saves: the output and an fp32 log-sum-exp):

- `block`: one double or single block under a recompute mode, called as the trainer calls
  it (graphs.blocks.make_blocks: prepare inside the checkpoint; prepare upcasts fp8 leaves,
  casts fp32 masters to bf16 and, under FSDP over several ranks, makes every leaf a fresh
  full copy, the all-gather's output). Block swap adds nothing here: its ring is weights. `held`: bytes still allocated after its forward, output included (what the
  block keeps for the backward, plus the next block's input); `peak`: the most allocated
  during its forward and backward (output gradient, recompute, weight gradients into the
  pre-allocated fp32 grads, the gathered / upcast block), both above the level at the call.
  Sampling (`train="none"`): forward without autograd; `held` is its output.
- `outer`: what runs around the blocks in training: the latents, embedding (patches, text
  refiner, RoPE tables; kept for the backward), the joined single-stream input, and the
  final layer + loss forward and backward (`final`) and the embedding's backward (`embed_bwd`).
- `sampling`: one denoising step of a 1 double + 1 single block model without autograd
  (the latents, text states, embedding, blocks, final layer, Euler update): blocks keep
  nothing between each other without autograd, so the peak of 60 blocks is the peak of 2.

Offload (selective recompute with the kept attention outputs in pinned host memory) is not
run here: on CPU its "host" copy is a device copy. It keeps on the device what full
recompute keeps (the block inputs) and holds selective's extra (`held` selective - full,
the attention output and its log-sum-exp) on the host (parallel.memory_fit).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from graphs import fp8
from graphs.blocks import make_blocks
from graphs.fake_memory import LiveBytes, fake_mode
from graphs.recompute import Recompute
from hvfunc import dit
from hvfunc.config import DiTConfig
from hvfunc.dit_spec import dit_spec
from hvfunc.lora import LoraConfig, lora_spec
from hvfunc.params import Spec, sub

DTYPE = torch.bfloat16
TEXT_TOKENS = 256
Train = Literal["full", "lora", "none"]
MODES = {"none": Recompute(), "selective": Recompute(selective=True),
         "full": Recompute(double_full=1, single_full=1)}  # block 0 of each kind is the one measured


@dataclass(frozen=True, kw_only=True)
class Case:
    """What one measurement depends on (frozen: measurements are cached per case)."""

    cfg: DiTConfig
    grid: tuple[int, int, int]
    """Video token grid (T', H', W') after the patch embedding."""
    text: int = TEXT_TOKENS
    train: Train = "none"
    """full (every leaf an fp32 master), lora (bf16 base frozen, fp32 adapters), none (sampling)."""
    lora_rank: int = 64
    fp8: bool = False
    """Frozen / sampled block linears stored as float8_e4m3fn, upcast per block."""
    gathered: bool = False
    """FSDP over several ranks: prepare builds a fresh copy of every block leaf (the all-gather)."""

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass(frozen=True)
class Levels:
    held: int
    peak: int


def _spec(case: Case) -> Spec:
    spec = dit_spec(case.cfg)
    if case.train == "lora":
        spec = spec | lora_spec(case.cfg, LoraConfig(rank=case.lora_rank, alpha=float(case.lora_rank)))
    return spec


def _trains(case: Case, name: str) -> bool:
    return case.train == "full" or (case.train == "lora" and ".lora_" in name)


def _leaves(case: Case, spec: Spec) -> dict[str, Tensor]:
    """Fake leaves as the trainer / sampler store them; trainable ones with their fp32 grads allocated."""
    out = {}
    for k, s in spec.items():
        train = _trains(case, k)
        v = torch.empty(s.shape, dtype=torch.float32 if train else DTYPE)
        if train:
            v.requires_grad_(True).grad = torch.zeros_like(v)
        out[k] = v
    return fp8.quantize_tree(out) if case.fp8 else out


def _prepare(case: Case):
    """The per-block prepare chain (parallel.memory_train's order): fp8 upcast, cast to bf16, then
    the FSDP gather, whose output is a fresh full leaf (the cast local shard is 1 / ranks of it)."""
    def prepare(p):
        out = fp8.dequantize(p, DTYPE) if case.fp8 else p
        out = {k: v.to(DTYPE) for k, v in out.items()}
        return {k: v.clone() if v is p.get(k) else v for k, v in out.items()} if case.gathered else out
    return prepare


def _inputs(case: Case, kind: str, grad: bool) -> tuple[list[Tensor], dict]:
    """The block's tensor inputs (img, txt or the joined x; vec) and keyword inputs (I2V: frame 0's
    modulation input and token count)."""
    D, L, S = case.cfg.hidden_size, case.tokens, case.text
    t = lambda *shape, g=grad: torch.empty(*shape, dtype=DTYPE).requires_grad_(g)  # noqa: E731
    i2v = case.cfg.i2v_condition_type is not None
    vec = t(1, D, g=grad and case.train == "full")  # LoRA: nothing before the blocks trains on vec's path
    args = [t(1, L, D), t(1, S, D), vec] if kind == "double" else [t(1, L + S, D), vec]
    kw = dict(vec_first=t(1, D, g=False) if i2v else None, first=case.grid[1] * case.grid[2] if i2v else 0)
    return args, kw if kind == "double" else kw | {"n_txt": S}


def _run_block(case: Case, kind: str, mode: str, live: LiveBytes, p: dict, rope) -> Levels:
    fn = getattr(make_blocks(prepare=_prepare(case), recompute=MODES[mode]), kind)(0)
    grad = case.train != "none"
    args, kw = _inputs(case, kind, grad)
    with torch.set_grad_enabled(grad):
        start = live.level
        live.reset_peak()
        out = fn(p, *args, rope=rope, kv_len=None, cfg=case.cfg, attn=dit.sdpa, **kw)
        out = out if isinstance(out, tuple) else (out,)
        held = live.level - start
        if grad:
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    return Levels(held=held, peak=live.peak - start)


@functools.cache
def block(case: Case, kind: Literal["double", "single"], mode: str = "none") -> Levels:
    """Bytes one block keeps after its forward and its peak (module docstring), above the call's start."""
    prefix = f"{kind}_blocks.0."
    with fake_mode():
        spec = {k: s for k, s in _spec(case).items() if k.startswith(prefix)}
        p = sub(_leaves(case, spec), prefix)
        rope = tuple(torch.empty(case.tokens, case.cfg.head_dim // 2) for _ in range(2))
        live = LiveBytes()
        with live:
            return _run_block(case, kind, mode, live, p, rope)


def _no_blocks(cfg: DiTConfig) -> DiTConfig:
    return dataclasses.replace(cfg, mm_double_blocks_depth=1, mm_single_blocks_depth=1)


def _model_inputs(case: Case) -> dict:
    cfg, (T, H, W) = case.cfg, case.grid
    pt, ph, pw = cfg.patch_size
    return dict(x=torch.empty(1, cfg.in_channels, T * pt, H * ph, W * pw), t=torch.empty(1),
                text_states=torch.empty(1, case.text, cfg.text_states_dim),
                text_mask=torch.ones(1, case.text, dtype=torch.long),
                text_states_2=torch.empty(1, cfg.text_states_dim_2),
                guidance=torch.empty(1) if cfg.guidance_embed else None)


@dataclass(frozen=True)
class Outer:
    kept: int
    """Latents, text inputs, embedding outputs and what autograd keeps of the embedding, plus the
    joined single-stream input [L + S, D]."""
    final: int
    """Peak of the final layer + loss forward and backward, above `kept` + the blocks' kept bytes."""
    embed_bwd: int
    """Peak of the embedding's backward above `kept`."""


@functools.cache
def outer(case: Case) -> Outer:
    """What runs around the blocks in a training step (module docstring)."""
    cfg = _no_blocks(case.cfg)
    with fake_mode():
        spec = {k: s for k, s in _spec(dataclasses.replace(case, cfg=cfg)).items()
                if not k.startswith(("double_blocks.", "single_blocks."))}
        stored = _leaves(case, spec)
        live = LiveBytes()
        with live:
            params = _prepare(case)(stored)  # gathered / cast once per step, kept for the backward
            inp = _model_inputs(case)
            e = dit.embed(params, **inp, cfg=cfg, layout=dit.TextLayout(case.text, True))
            h = torch.cat([e.img, e.txt], dim=1)
            kept = live.level
            h_in = h.detach().requires_grad_(True)
            live.reset_peak()
            out = dit.unpatchify(dit.final_layer(params, h_in[:, :case.tokens], e.vec), e.grid, cfg.patch_size)
            (out.float() - torch.empty_like(inp["x"])).square().mean().backward()  # target: noise - data
            final = live.peak - kept
            live.reset_peak()
            h.backward(h_in.grad)
            embed_bwd = live.peak - kept
    return Outer(kept=kept, final=final, embed_bwd=embed_bwd)


@functools.cache
def sampling(case: Case) -> int:
    """Peak bytes of one denoising step above the weights (module docstring)."""
    cfg = _no_blocks(case.cfg)
    with fake_mode(), torch.no_grad():
        params = _leaves(dataclasses.replace(case, cfg=cfg, train="none"), dit_spec(cfg))
        blocks = make_blocks(prepare=fp8.dequantizer(DTYPE) if case.fp8 else None)
        live = LiveBytes()
        with live:
            inp = _model_inputs(case)
            x = inp["x"].to(DTYPE)
            e = dit.embed(params, **(inp | {"x": x}), cfg=cfg,
                          layout=dit.TextLayout(case.text, True))
            img = dit.run_blocks(params, e, cfg=cfg, attn=dit.sdpa, blocks=blocks)
            v = dit.unpatchify(dit.final_layer(params, img, e.vec), e.grid, cfg.patch_size)
            x = x + v * 0.02  # the Euler update
    return live.peak


@functools.cache
def bench_step(cfg: DiTConfig, grid: tuple[int, int, int], text: int, backward: bool) -> int:
    """Peak bytes above the weights of graphs.bench_dit's eager rows (every leaf bf16; forward
    without autograd, or forward + backward of mean(out^2) with the bf16 gradients allocated in
    the call), on fake tensors: the measuring method checked against a GPU's allocator."""
    case = Case(cfg=cfg, grid=grid, text=text)
    with fake_mode(), torch.set_grad_enabled(backward):
        params = {k: torch.empty(s.shape, dtype=DTYPE).requires_grad_(backward) for k, s in dit_spec(cfg).items()}
        inp = _model_inputs(case)
        live = LiveBytes()
        with live:
            e = dit.embed(params, **inp, cfg=cfg, layout=dit.TextLayout(text, True))
            img = dit.run_blocks(params, e, cfg=cfg, attn=dit.sdpa)
            out = dit.unpatchify(dit.final_layer(params, img, e.vec), e.grid, cfg.patch_size).to(inp["x"].dtype)
            if backward:
                out.float().square().mean().backward()
    return live.peak
