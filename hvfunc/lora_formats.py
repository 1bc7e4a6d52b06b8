"""LoRA files of HunyuanVideo in every community key format: read (auto-detected), write, merge.

Module `double_blocks.0.img_attn_qkv` (official name) in each format:
  official   Hunyuan_video_I2V_lora_double_blocks_0_img_attn_qkv.lora_down.weight / .lora_up / .alpha
  musubi     lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / .lora_up / .alpha
  comfyui    diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight / .lora_B (.alpha when != rank);
             read also with a `transformer.` prefix (diffusion-pipe)
  diffusers  transformer.transformer_blocks.0.attn.to_q.lora_A.weight (to_k, to_v): A duplicated, B
             split (names from hvfunc.ckpt's diffusers table); alpha in PEFT's `lora_adapter_metadata`
  mindspeed  double_blocks.0.img_attn_qkv.lora_A.default.weight; linear1 -> linear1_qkv / linear1_mlp
             (A duplicated, B split at row 3D), final_layer.linear -> proj_out, ...; no alpha upstream
  hvfunc     hvfunc.lora's layout; alpha (and stacked parts) in the safetensors metadata
Module names are found without the model's depth: the block indices in the keys size the table.
Reading split parts whose A's differ (independently trained q/k/v) into one fused module stacks
their ranks (A concatenated, B block-diagonal: the same delta W) and warns; the parts are kept
in `Lora.blocks`, so split formats are written back exactly.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from hvfunc import io
from hvfunc.ckpt import DIFFUSERS_ROOTS, OFFICIAL_ROOTS, _diffusers_table, _swap, detect_format
from hvfunc.config import DiTConfig
from hvfunc.lora import Layout, Lora, fused, hvfunc_layout, is_adapter, merge_all, module_of, official_layout, \
    official_modules, unfused

Format = Literal["hvfunc", "official", "musubi", "comfyui", "diffusers", "mindspeed"]
FORMATS: tuple[str, ...] = ("hvfunc", "official", "musubi", "comfyui", "diffusers", "mindspeed")
_PEFT_META = "lora_adapter_metadata"


@dataclass(frozen=True)
class _Style:
    prefixes: tuple[str, ...]  # written with the first, read with any
    a: str
    b: str
    kohya: bool = False  # module dots -> "_"


_STYLES = {
    "official": _Style(("Hunyuan_video_I2V_lora_",), ".lora_down.weight", ".lora_up.weight", kohya=True),
    "musubi": _Style(("lora_unet_",), ".lora_down.weight", ".lora_up.weight", kohya=True),
    "comfyui": _Style(("diffusion_model.", "transformer.", ""), ".lora_A.weight", ".lora_B.weight"),
    "diffusers": _Style(("transformer.", ""), ".lora_A.weight", ".lora_B.weight"),
    "mindspeed": _Style(("",), ".lora_A.default.weight", ".lora_B.default.weight"),
}
# official -> MindSpeed-MM module renames (mindspeed-mm convert_mapping); all other names are official
_MINDSPEED = (("txt_in.t_embedder.mlp.", "txt_in.t_embedder.time_embed."), ("time_in.mlp.", "time_in.time_embed."),
              ("guidance_in.mlp.", "guidance_in.time_embed."), ("vector_in.in_layer", "vector_in.fc1"),
              ("vector_in.out_layer", "vector_in.fc2"), ("final_layer.linear", "proj_out"),
              ("final_layer.adaLN_modulation.1", "adaLN_modulation.1"))


@functools.lru_cache(maxsize=8)
def _table(depth: int) -> DiTConfig:
    # names only: every block list `depth` long covers every index a file can hold
    return DiTConfig(mm_double_blocks_depth=depth, mm_single_blocks_depth=depth, text_refiner_depth=max(depth, 2))


def _depth(keys) -> int:
    return 1 + max((int(i) for k in keys for i in re.findall(r"blocks[._](\d+)(?:[._]|$)", k)), default=0)


@functools.lru_cache(maxsize=32)
def _names(fmt: str, depth: int) -> dict[str, tuple[tuple[str, ...], str]]:
    """Official module -> (its names in `fmt`, how: same / swap / split (q, k, v[, mlp]) / split2 (qkv, mlp))."""
    cfg, out = _table(depth), {}
    mods = official_modules(cfg)
    if fmt == "diffusers":
        return {o: (ds, how) for o, ds, how in _diffusers_table(cfg) if o in mods}
    for m in mods:
        if fmt in ("official", "musubi"):
            out[m] = ((m.replace(".", "_"),), "same")
        elif fmt == "mindspeed":
            mm = next((m.replace(a, b, 1) for a, b in _MINDSPEED if m.startswith(a)), m)
            out[m] = ((f"{mm}_qkv", f"{mm}_mlp"), "split2") if m.endswith(".linear1") and "single_" in m else (
                (mm,), "same")
        else:
            out[m] = ((m,), "same")
    return out


def _sizes(how: str, n_parts: int, out: int, hidden: int) -> list[int]:
    if how == "split2":
        return [3 * hidden, out - 3 * hidden]
    return [hidden] * 3 + ([out - 3 * hidden] if n_parts == 4 else [])


def detect(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    keys = list(sd)
    if (metadata or {}).get("format") == "hvfunc-lora" or any(k.endswith((".lora_A", ".lora_B")) for k in keys):
        return "hvfunc"
    for fmt in ("mindspeed", "official", "musubi"):
        st = _STYLES[fmt]
        if any(k.endswith(st.a) and k.startswith(st.prefixes[0]) for k in keys):
            return fmt
    bare = [k.split(".", 1)[1] if k.startswith(("transformer.", "diffusion_model.")) else k
            for k in keys if k.endswith(".lora_A.weight")]
    if any(k.startswith(OFFICIAL_ROOTS) for k in bare):
        return "comfyui"
    if any(k.startswith(DIFFUSERS_ROOTS) for k in bare):
        return "diffusers"
    raise ValueError(f"not a HunyuanVideo LoRA in a known format ({', '.join(FORMATS)}); keys start "
                     f"{keys[:3]}")


def _split_keys(sd: Mapping[str, Tensor], fmt: str) -> dict[tuple[str, int], dict[str, Tensor]]:
    """Keys -> {(official module, part): {"A", "B", "alpha"}}; a key naming no target module is an error."""
    st, names = _STYLES[fmt], _names(fmt, _depth(sd))
    inverse = {(n.replace(".", "_") if st.kohya else n): (m, i) for m, (ns, _) in names.items()
               for i, n in enumerate(ns)}
    got: dict[tuple[str, int], dict[str, Tensor]] = {}
    bad = []
    for k, v in sd.items():
        hit = next(((inverse[k[len(p):-len(s)]], w) for p in st.prefixes for w, s in
                    (("A", st.a), ("B", st.b), ("alpha", ".alpha"))
                    if k.startswith(p) and k.endswith(s) and k[len(p):-len(s)] in inverse), None)
        if hit is None:
            bad.append(k)
        else:
            got.setdefault(hit[0], {})[hit[1]] = v
    if bad:
        raise ValueError(f"{len(bad)} keys match no LoRA target of the HunyuanVideo DiT ({fmt} format): "
                         f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")
    return got


def _join(m: str, parts: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor, float, tuple | None]:
    """Row parts (A_i, B_i, alpha_i) of one module -> one fused (A, B, alpha[, stacked parts])."""
    A0, al0 = parts[0][0], parts[0][2]
    if any(a.shape[1] != A0.shape[1] or a.shape[0] != b.shape[1] for a, b, _ in parts):
        raise ValueError(f"{m}: the parts' lora_A / lora_B shapes disagree: "
                         f"{[(tuple(a.shape), tuple(b.shape)) for a, b, _ in parts]}")
    if all(a.shape == A0.shape and torch.equal(a, A0) and al == al0 for a, _, al in parts):
        return A0, torch.cat([b for _, b, _ in parts], dim=0), al0, None
    R = sum(a.shape[0] for a, _, _ in parts)
    scales = [al / a.shape[0] if a.shape[0] else None for a, _, al in parts]
    same = len({s for s in scales if s is not None}) == 1
    s0 = next(s for s in scales if s is not None)
    Bs = [b if same or s is None else (b.float() * s).to(b.dtype) for (_, b, _), s in zip(parts, scales)]
    return (torch.cat([a for a, _, _ in parts], dim=0), torch.block_diag(*Bs), s0 * R if same else float(R),
            tuple((a.shape[0], al) for a, _, al in parts))


def _fill(parts: list, how: str) -> list[tuple[Tensor, Tensor, float]]:
    """Absent row parts (a LoRA on to_q/to_k/to_v only) as rank-0 adapters; an absent MLP part has
    HunyuanVideo's 4 x hidden rows."""
    A = next(p[0] for p in parts if p is not None)
    D = A.shape[1]
    rows = [3 * D, 4 * D] if how == "split2" else [D, D, D, 4 * D]
    return [p if p is not None else (A.new_zeros(0, D), A.new_zeros(n, 0), 0.0) for p, n in zip(parts, rows)]


def from_state_dict(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, fmt: str = "auto") -> Lora:
    """A LoRA state dict in any format -> adapters in hvfunc's layout."""
    metadata = dict(metadata or {})
    fmt = detect(sd, metadata) if fmt == "auto" else fmt
    if fmt == "hvfunc":
        return _from_hvfunc(sd, metadata)
    flags = {k for k in sd if k in ("use_rslora_flag", "use_dora_flag")}  # musubi's buffers
    if any(bool(sd[k]) for k in flags):
        raise ValueError(f"RS-LoRA / DoRA files are not plain LoRA: {sorted(k for k in flags if bool(sd[k]))}")
    got = _split_keys({k: v for k, v in sd.items() if k not in flags}, fmt)
    alpha_of = _metadata_alpha(fmt, metadata)
    names, tensors, alpha, blocks, stacked = _names(fmt, _depth(sd)), {}, {}, {}, []
    for m, (ns, how) in names.items():
        if not any((m, i) in got for i in range(len(ns))):
            continue
        parts = []
        for i, n in enumerate(ns):
            p = got.get((m, i))
            if p is not None and ("A" not in p or "B" not in p):
                raise ValueError(f"{m}: {fmt} part {n} lacks its {'lora_A' if 'A' not in p else 'lora_B'}")
            al = None if p is None else float(p["alpha"]) if "alpha" in p else alpha_of(m, n, p["A"].shape[0])
            parts.append(None if p is None else (p["A"], _swap(p["B"]) if how == "swap" else p["B"], al))
        A, B, alpha[m], blk = _join(m, _fill(parts, how) if None in parts else parts)
        if blk:
            blocks[m] = blk
            stacked.append(m)
        tensors |= unfused(m, A, B)
    if stacked:
        warnings.warn(f"{len(stacked)} modules hold independently trained split adapters ({stacked[0]}, ...): "
                      f"stacked into one adapter each (ranks summed, block-diagonal B; the same delta W). Fused "
                      f"formats store the stacked rank; split formats write the parts back exactly.", stacklevel=2)
    return Lora(tensors, alpha, blocks)


def _metadata_alpha(fmt: str, metadata: Mapping[str, str]):
    """alpha(module, name in file, rank) for parts without an .alpha key."""
    if fmt == "mindspeed" and "alpha" in metadata:
        table = json.loads(metadata["alpha"])
        return lambda m, n, r: float(table.get(m, r))
    if fmt != "diffusers" or _PEFT_META not in metadata:
        return lambda m, n, r: float(r)  # PEFT's and upstream's convention: no alpha means scale 1
    cfg = {k.removeprefix("transformer."): v for k, v in json.loads(metadata[_PEFT_META]).items()}
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ValueError("RS-LoRA / DoRA adapters (lora_adapter_metadata) are not plain LoRA")
    pattern, default = cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha")

    def alpha(m: str, n: str, r: int) -> float:  # PEFT's get_pattern_key rule
        key = next((p for p in pattern if re.match(rf"(.*\.)?({p})$", n)), None)
        return float(pattern[key] if key is not None else (r if default is None else default))
    return alpha


def _from_hvfunc(sd: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Lora:
    if not all(is_adapter(k) for k in sd):
        raise ValueError(f"hvfunc LoRA keys must end in .lora_A / .lora_B: {[k for k in sd if not is_adapter(k)][:10]}")
    known, tensors = _names("hvfunc", _depth(sd)), dict(sd)
    alpha, blocks = json.loads(metadata.get("alpha", "{}")), json.loads(metadata.get("blocks", "{}"))
    lora = Lora(tensors, {}, {})
    for m in lora.modules():
        try:
            want = unfused(m, *fused(lora, m)) if m in known else None
        except KeyError as e:
            raise ValueError(f"{m}: the hvfunc LoRA lacks {e.args[0]}") from None
        if want is None or any(tuple(v.shape) != tuple(sd[k].shape) for k, v in want.items()):
            raise ValueError(f"{m}: not a LoRA target of the DiT, or its leaves do not fit "
                             f"({[(k, tuple(v.shape)) for k, v in sd.items() if module_of(k) == m]})")
    mods = lora.modules()
    return Lora(tensors, {m: float(alpha.get(m, lora.rank(m))) for m in mods},
                {m: tuple((int(r), float(a)) for r, a in blocks[m]) for m in mods if m in blocks})


def _split(lora: Lora, m: str, A: Tensor, B: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor, float]]:
    """One fused module -> row parts: its stacked parts back when B is still block-diagonal, else A duplicated."""
    Bs, blk = B.split(sizes, dim=0), lora.blocks.get(m)
    if blk and len(blk) == len(sizes):
        offs = [sum(r for r, _ in blk[:i]) for i in range(len(blk) + 1)]
        if all(not Bs[i][:, offs[j]:offs[j + 1]].any() for i in range(len(blk)) for j in range(len(blk)) if i != j):
            return [(A[offs[i]:offs[i + 1]], Bs[i][:, offs[i]:offs[i + 1]], al) for i, (_, al) in enumerate(blk)]
    return [(A, b, lora.alpha[m]) for b in Bs]


def to_state_dict(lora: Lora, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Adapters -> (state dict, safetensors metadata) in `fmt`."""
    if fmt == "hvfunc":
        return dict(lora.tensors), {"format": "hvfunc-lora", "alpha": json.dumps(dict(lora.alpha)),
                                    "blocks": json.dumps({m: list(map(list, b)) for m, b in lora.blocks.items()})}
    if fmt not in _STYLES:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    st, names = _STYLES[fmt], _names(fmt, _depth(lora.tensors))
    sd: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for m in lora.modules():
        A, B = fused(lora, m)
        ns, how = names[m]
        parts = [(A, _swap(B) if how == "swap" else B, lora.alpha[m])] if len(ns) == 1 else \
            _split(lora, m, A, B, _sizes(how, len(ns), B.shape[0], A.shape[1]))
        for n, (a, b, al) in zip(ns, parts):
            if not a.shape[0]:  # a part the source file never adapted
                continue
            key = st.prefixes[0] + (n.replace(".", "_") if st.kohya else n)
            sd[key + st.a], sd[key + st.b] = a, b
            if st.kohya or (fmt == "comfyui" and al != a.shape[0]):
                sd[key + ".alpha"] = torch.tensor(al, dtype=a.dtype)
            ranks[n] = (a.shape[0], al)
    return sd, _format_metadata(fmt, lora, ranks)


def _format_metadata(fmt: str, lora: Lora, ranks: dict[str, tuple[int, float]]) -> dict[str, str]:
    if fmt == "mindspeed":
        if any(al != r for r, al in ranks.values()):
            warnings.warn("MindSpeed-MM LoRA files carry no alpha and its merge takes --lora-alpha/--lora-rank "
                          "for all modules: alpha != rank here (kept in this file's metadata for hvfunc)",
                          stacklevel=3)
        return {"alpha": json.dumps(dict(lora.alpha))}
    if fmt != "diffusers":
        return {}
    r = Counter(r for r, _ in ranks.values()).most_common(1)[0][0]
    a = Counter(al for _, al in ranks.values()).most_common(1)[0][0]
    cfg = {"r": r, "lora_alpha": a, "target_modules": "^(?:" + "|".join(map(re.escape, ranks)) + ")$",
           "rank_pattern": {f"^{n}": v for n, (v, _) in ranks.items() if v != r},
           "alpha_pattern": {f"^{n}": v for n, (_, v) in ranks.items() if v != a}}
    return {"format": "pt", _PEFT_META: json.dumps({f"transformer.{k}": v for k, v in cfg.items()})}


def parse_spec(spec: str) -> tuple[Path, float]:
    """FILE[:SCALE] (command lines: several LoRAs with scales) -> (path, scale); scale 1 by default."""
    path, _, scale = spec.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(spec), 1.0)
    except ValueError:
        return Path(spec), 1.0


def read(path: str | Path, fmt: str = "auto") -> Lora:
    """A LoRA file (.safetensors or a torch pickle) in any format -> adapters in hvfunc's layout."""
    path = Path(path)
    if path.suffix == ".safetensors":
        sd, meta = io.load_safetensors(path), io.safetensors_metadata(path)
    else:
        sd, meta = io.load_pickle(path), {}
        for wrap in ("model", "module", "state_dict"):  # MindSpeed / DeepSpeed wrappers
            if isinstance(sd, dict) and isinstance(sd.get(wrap), dict):
                sd = sd[wrap]
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise ValueError(f"{path} is not a state dict of tensors")
    try:
        return from_state_dict(sd, meta, fmt)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def write(lora: Lora, path: str | Path, fmt: str) -> Path:
    """Write atomically: safetensors, or a torch pickle for .pt/.pth/.bin targets (no metadata there)."""
    sd, meta = to_state_dict(lora, fmt)
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        io.save_pickle(sd, path)
    else:
        io.save_safetensors(sd, path, metadata=meta or None)
    return path


def _diffusers_layout(depth: int) -> Layout:
    names = _names("diffusers", depth)

    def layout(m: str, delta: Tensor) -> dict[str, Tensor]:
        ns, how = names[m]
        if len(ns) == 1:
            return {f"{ns[0]}.weight": _swap(delta) if how == "swap" else delta}
        parts = delta.split(_sizes(how, len(ns), delta.shape[0], delta.shape[1]), dim=0)
        return {f"{n}.weight": p for n, p in zip(ns, parts)}
    return layout


def merge_state_dict(sd: Mapping[str, Tensor], loras: list[tuple[Lora, float]]) -> tuple[dict[str, Tensor], list[str]]:
    """Merge into DiT weights in their own layout, matching by key: a partial or pruned checkpoint
    merges the modules it holds. Returns (weights, modules merged); none matching is an error."""
    fmt = detect_format(sd)
    layout = {"official": official_layout, "hvfunc": hvfunc_layout}.get(fmt) or _diffusers_layout(
        max(_depth(sd), *(_depth(lo.tensors) for lo, _ in loras)))
    out, merged = merge_all(sd, loras, layout=layout, partial=True)
    if not merged:
        mods = loras[0][0].modules()
        raise ValueError(f"no LoRA module has its weight in the base ({fmt} layout); LoRA modules such as "
                         f"{mods[:3]}")
    return out, merged
