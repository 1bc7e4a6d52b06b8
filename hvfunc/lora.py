"""LoRA adapters as leaves of the param tree: config, spec, trainable mask, merge.

An adapter belongs to one official linear module m (`double_blocks.0.img_attn_qkv`,
`single_blocks.3.linear1`, ...) with weight W [out, in]: delta W = alpha / r * B @ A,
A [r, in], B [out, r]. In hvfunc's layout its leaves sit beside the base leaves and
follow their fused/split shapes (r rank, D hidden, N*K = D, M MLP hidden):
  plain linear                  m.lora_A [r, in]              m.lora_B [out, r]
  *_attn_qkv / self_attn_qkv    m.lora_A [r, D]               m.lora_B [3, N*K, r]
  single_blocks.i.linear1       linear1.lora_A [r, D]         linear1_qkv.lora_B [3, N*K, r]
                                (shared down-projection)      linear1_mlp.lora_B [M, r]
  single_blocks.i.linear2       linear2_attn.lora_A [r, N*K]  linear2.lora_B [D, r]
                                linear2_mlp.lora_A [r, M]     (shared up-projection)
B's output axes are W's, A's input axis is W's, the rank axis is "lora" (never sharded).
Each layout is a view/split of the official fused (A, B): official files convert exactly.

Alpha is not a leaf: it is a per-module constant (`Lora.alpha`), known before any
tensor exists, so compute reads a Python float (no 0-dim leaf to shard, mask or sync).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from hvfunc.ckpt import official_spec
from hvfunc.config import DiTConfig
from hvfunc.dit_spec import dit_spec
from hvfunc.params import ZEROS, Init, ParamSpec, Params, Spec, init

OFFICIAL_I2V_TARGETS = ("linear", "fc1", "fc2", "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj",
                        "linear1", "linear2")

_QKV = re.compile(r"(_attn_qkv|self_attn_qkv)$")
_L1, _L2 = re.compile(r"^single_blocks\.\d+\.linear1$"), re.compile(r"^single_blocks\.\d+\.linear2$")
_LEAF = re.compile(r"^(.*?)(_qkv|_mlp|_attn)?\.lora_[AB]$")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which modules get adapters and how they start (the official I2V recipe by default)."""

    rank: int = 64
    """Rank r of every adapter."""
    alpha: float = 64.0
    """Scale numerator: delta W = alpha / r * B @ A."""
    targets: tuple[str, ...] = OFFICIAL_I2V_TARGETS
    """Official module names matched by suffix as PEFT does (name == t or name ends with "." + t):
    "linear" also hits every modulation linear and the final layer, "fc1"/"fc2" the refiner MLPs."""
    init: Literal["gaussian", "kaiming"] = "gaussian"
    """A's init: PEFT's "gaussian" N(0, 1/r) (upstream's choice) or its default kaiming-uniform
    U(+-1/sqrt(in)); B starts at zero either way, so a fresh adapter changes nothing."""

    def __post_init__(self) -> None:
        if self.rank < 1 or not self.targets:
            raise ValueError(f"LoRA needs rank >= 1 and at least one target; got rank {self.rank}, "
                             f"targets {self.targets}")


@dataclass(frozen=True)
class Lora:
    """Adapters in hvfunc's layout and one alpha per adapted official module."""

    tensors: Params
    """`<leaf>.lora_A` / `<leaf>.lora_B` as in the module docstring."""
    alpha: Mapping[str, float]
    """Official module name -> alpha (scale alpha / rank)."""
    blocks: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    """Modules whose adapter stacks independent adapters of row parts (q, k, v[, mlp]) read from a
    split format: (rank, alpha) of each part, B block-diagonal. Lets split formats be written back exactly."""

    def modules(self) -> list[str]:
        return list(dict.fromkeys(module_of(k) for k in self.tensors))

    def rank(self, module: str) -> int:
        return self.tensors[f"{module}_attn.lora_A" if kind(module) == "linear2" else f"{module}.lora_A"].shape[0]

    def scale(self, module: str) -> float:
        return self.alpha[module] / self.rank(module)


def kind(module: str) -> Literal["plain", "qkv", "linear1", "linear2"]:
    return "qkv" if _QKV.search(module) else "linear1" if _L1.match(module) else "linear2" if _L2.match(module) \
        else "plain"


def module_of(key: str) -> str:
    """Official module of an adapter leaf (`single_blocks.0.linear1_qkv.lora_B` -> `single_blocks.0.linear1`)."""
    m = _LEAF.match(key)
    if not m:
        raise ValueError(f"{key} is not a LoRA leaf (<module>.lora_A / .lora_B)")
    stem, suffix = m.group(1), m.group(2) or ""
    if suffix and kind(stem) in ("linear1", "linear2"):
        return stem
    return stem + suffix


def is_adapter(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


def trainable(which: Literal["adapters", "all"]) -> Callable[[str], bool]:
    """The training mask as a predicate over leaf names: adapters only (LoRA), or every leaf (full finetune)."""
    if which == "adapters":
        return is_adapter
    if which == "all":
        return lambda key: True
    raise ValueError(f"trainable: expected 'adapters' or 'all', got {which!r}")


def targeted(module: str, targets: Sequence[str]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def split_rows(module: str, T: Tensor, hidden: int) -> dict[str, Tensor]:
    """An official-layout tensor whose rows are m's outputs (W, delta W or B) -> hvfunc stems."""
    k = kind(module)
    if k == "qkv":
        return {module: T.view(3, hidden, *T.shape[1:])}
    if k == "linear1":
        qkv, mlp = T.split([3 * hidden, T.shape[0] - 3 * hidden], dim=0)
        return {f"{module}_qkv": qkv.view(3, hidden, *T.shape[1:]), f"{module}_mlp": mlp}
    return {module: T}


def split_cols(module: str, T: Tensor, hidden: int) -> dict[str, Tensor]:
    """An official-layout tensor whose columns are m's inputs (W, delta W or A) -> hvfunc stems."""
    if kind(module) == "linear2":
        attn, mlp = T.split([hidden, T.shape[1] - hidden], dim=1)
        return {f"{module}_attn": attn, f"{module}_mlp": mlp}
    return {module: T}


def _hidden(module: str, out: int, inp: int) -> int:
    """D of a module from its official shape: linear2 maps D+M -> D, qkv 3D <- D, linear1 3D+M <- D."""
    return out if kind(module) == "linear2" else inp


def unfused(module: str, A: Tensor, B: Tensor) -> Params:
    """Official fused (A [r, in], B [out, r]) -> hvfunc adapter leaves (views)."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not [r, in] and "
                         f"[out, r] of one rank")
    D = _hidden(module, B.shape[0], A.shape[1])
    k = kind(module)
    if (k == "qkv" and B.shape[0] != 3 * D) or (k == "linear1" and B.shape[0] <= 3 * D) or (
            k == "linear2" and A.shape[1] <= D):
        raise ValueError(f"{module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a fused {k} "
                         f"(hidden {D})")
    return ({f"{s}.lora_A": v for s, v in split_cols(module, A, D).items()}
            | {f"{s}.lora_B": v for s, v in split_rows(module, B, D).items()})


def fused(lora: Lora, module: str) -> tuple[Tensor, Tensor]:
    """hvfunc adapter leaves of one module -> official fused (A [r, in], B [out, r])."""
    t, k = lora.tensors, kind(module)
    if k == "linear1":
        return t[f"{module}.lora_A"], torch.cat([t[f"{module}_qkv.lora_B"].flatten(0, 1),
                                                 t[f"{module}_mlp.lora_B"]], dim=0)
    if k == "linear2":
        return torch.cat([t[f"{module}_attn.lora_A"], t[f"{module}_mlp.lora_A"]], dim=1), t[f"{module}.lora_B"]
    B = t[f"{module}.lora_B"]
    return t[f"{module}.lora_A"], B.flatten(0, 1) if k == "qkv" else B


def official_modules(cfg: DiTConfig) -> dict[str, tuple[int, int]]:
    """Every linear module of the official checkpoint -> (out, in), in checkpoint order."""
    return {k[:-len(".weight")]: s.shape for k, s in official_spec(cfg).items()
            if k.endswith(".weight") and len(s.shape) == 2}


def check(lora: Lora, cfg: DiTConfig) -> None:
    """Every adapted module exists in the model and its (A, B) fit W: one ValueError naming the rest."""
    mods, bad = official_modules(cfg), []
    for m in lora.modules():
        A, B = fused(lora, m)
        if m not in mods:
            bad.append(f"{m} (no such linear module)")
        elif (B.shape[0], A.shape[1]) != tuple(mods[m]):
            bad.append(f"{m}: delta W {(B.shape[0], A.shape[1])}, weight {tuple(mods[m])}")
    if bad:
        raise ValueError(f"LoRA does not fit the DiT ({len(bad)} modules): {'; '.join(bad[:10])}")


def lora_spec(cfg: DiTConfig, lcfg: LoraConfig) -> Spec:
    """Adapter leaves for every targeted module: shapes and logical axes from the base leaves, rank axis "lora"."""
    base, r, out = dit_spec(cfg), lcfg.rank, {}
    for m, (n_out, n_in) in official_modules(cfg).items():
        if not targeted(m, lcfg.targets):
            continue
        a_init = Init("normal", 1.0 / r) if lcfg.init == "gaussian" else Init("uniform", 1.0 / math.sqrt(n_in))
        D = _hidden(m, n_out, n_in)
        for s in split_cols(m, torch.empty(0, n_in, device="meta"), D):
            w = _base_leaf(base, s)
            out[f"{s}.lora_A"] = ParamSpec((r, w.shape[-1]), ("lora", w.axes[-1]), a_init)
        for s in split_rows(m, torch.empty(n_out, 0, device="meta"), D):
            w = _base_leaf(base, s)
            out[f"{s}.lora_B"] = ParamSpec((*w.shape[:-1], r), (*w.axes[:-1], "lora"), ZEROS)
    if not out:
        raise ValueError(f"LoRA targets {lcfg.targets} match no linear module of the DiT")
    return out


def _base_leaf(base: Spec, stem: str) -> ParamSpec:
    # linear1's shared A multiplies linear1_qkv's input; linear2's shared B produces linear2_attn's output
    return next(base[k] for k in (f"{stem}.weight", f"{stem}_qkv.weight", f"{stem}_attn.weight") if k in base)


def init_lora(cfg: DiTConfig, lcfg: LoraConfig, *, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> Lora:
    """Fresh adapters (A random, B zero): the LoRA model equals the base model."""
    tensors = init(lora_spec(cfg, lcfg), generator=generator, dtype=dtype)
    return Lora(tensors, {m: float(lcfg.alpha) for m in dict.fromkeys(map(module_of, tensors))})


Layout = Callable[[str, Tensor], dict[str, Tensor]]


def hvfunc_layout(module: str, delta: Tensor) -> dict[str, Tensor]:
    """Official-shaped delta W [out, in] of a module -> hvfunc weight leaves."""
    D = _hidden(module, *delta.shape)
    parts = split_cols(module, delta, D) if kind(module) == "linear2" else split_rows(module, delta, D)
    return {f"{s}.weight": v for s, v in parts.items()}


def official_layout(module: str, delta: Tensor) -> dict[str, Tensor]:
    return {f"{module}.weight": delta}


def merge_all(params: Mapping[str, Tensor], loras: Sequence[tuple[Lora, float]], *, layout: Layout = hvfunc_layout,
              partial: bool = False) -> tuple[dict[str, Tensor], list[str]]:
    """W += sum_i scale_i * alpha/r * B @ A, in fp32 from the official fused (B, A) (the same product
    upstream's merge computes), cast once to W's dtype. Returns (weights, modules merged). Leaves a
    module's layout names that are absent are an error, or skipped with `partial` (pruned checkpoints)."""
    acc: dict[str, Tensor] = {}
    merged: list[str] = []
    for lora, scale in loras:
        for m in lora.modules():
            A, B = fused(lora, m)
            delta, factor = B.float() @ A.float(), scale * (lora.alpha[m] / A.shape[0])
            if factor != 1.0:
                delta.mul_(factor)
            parts = {k: v for k, v in layout(m, delta).items() if k in params or not partial}
            for k, v in parts.items():
                if k not in params:
                    raise ValueError(f"LoRA module {m}: the weights have no {k}")
                if tuple(params[k].shape) != tuple(v.shape):
                    raise ValueError(f"LoRA module {m}: {k} is {tuple(params[k].shape)}, the adapter gives "
                                     f"{tuple(v.shape)}")
                acc[k] = acc[k] + v if k in acc else v
            if parts:
                merged.append(m)
    out = dict(params)
    for k, d in acc.items():  # d is this merge's own buffer: add W in place (W + d == d + W exactly)
        out[k] = d.add_(params[k].float()).to(params[k].dtype)
    return out, list(dict.fromkeys(merged))


def scaled(params: Params, scale: float) -> Params:
    """The compute tree of unmerged adapters (training): every `lora_B` leaf as scale * B, with
    scale = alpha / r, so hvfunc.ops adds B'(A x) with no per-module constant. Differentiable: B's
    gradient is scale times the product's, as with y = W x + scale * B(A x). Scale 1 returns the tree."""
    if scale == 1.0:
        return params
    return {k: v * scale if k.endswith(".lora_B") else v for k, v in params.items()}


def one_scale(lora: Lora) -> tuple[int, float]:
    """(rank, alpha) shared by every module of a LoRA (training keeps one scale per tree), or a
    ValueError naming the modules that differ from the first."""
    mods = lora.modules()
    r0, a0 = lora.rank(mods[0]), lora.alpha[mods[0]]
    odd = [f"{m} (rank {lora.rank(m)}, alpha {lora.alpha[m]})" for m in mods
           if (lora.rank(m), lora.alpha[m]) != (r0, a0)]
    if odd:
        raise ValueError(f"LoRA modules differ in rank or alpha from {mods[0]} (rank {r0}, alpha {a0}): "
                         f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}; training needs one rank and alpha")
    return r0, a0


def merge(params: Params, lora: Lora, scale: float = 1.0) -> Params:
    """hvfunc params with one LoRA merged (every adapted weight must be present)."""
    return merge_all(params, [(lora, scale)])[0]
