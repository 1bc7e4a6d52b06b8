"""DiT weights: official <-> hvfunc <-> diffusers key tables, and loading from a path.

hvfunc's layout differs from the official one only for fused projections (see
hvfunc.dit_spec); diffusers renames modules, splits q/k/v and single-block linear1, and
stores the final layer's modulation as (scale, shift) where upstream has (shift, scale).
Conversions are reshapes, splits, concatenations and that swap: exact both ways.
Converted leaves are views where possible (a memory-mapped 25.6 GB file is not copied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from hvfunc import io
from hvfunc.config import DiTConfig
from hvfunc.dit_spec import dit_spec
from hvfunc.params import ParamSpec, Params, Spec, check_tree

_QKV = re.compile(r"(_attn_qkv|self_attn_qkv|\.linear1_qkv)\.(weight|bias)$")


def official_spec(cfg: DiTConfig) -> Spec:
    """Shapes of the official checkpoint's leaves (the spec of `dit_to_official`'s output)."""
    out: Spec = {}
    for k, s in dit_spec(cfg).items():
        if _QKV.search(k):
            k = k.replace(".linear1_qkv.", ".linear1.") if ".linear1_qkv." in k else k
            s = ParamSpec((s.shape[0] * s.shape[1], *s.shape[2:]), (s.axes[1], *s.axes[2:]), s.init)
            if k.endswith(".linear1.weight") or k.endswith(".linear1.bias"):
                s = ParamSpec((s.shape[0] + cfg.mlp_hidden, *s.shape[1:]), s.axes, s.init)
        elif ".linear1_mlp." in k:
            continue
        elif k.endswith(".linear2_attn.weight"):
            k, s = k.replace("linear2_attn", "linear2"), ParamSpec((s.shape[0], s.shape[1] + cfg.mlp_hidden),
                                                                  s.axes, s.init)
        elif k.endswith(".linear2_mlp.weight"):
            continue
        out[k] = s
    return out


def dit_from_official(sd: dict[str, Tensor], cfg: DiTConfig) -> Params:
    """Official state dict -> hvfunc params (views; exact). Raises on any key/shape mismatch."""
    check_tree(sd, official_spec(cfg), what="official DiT weights")
    D, out = cfg.hidden_size, {}
    for k, v in sd.items():
        if _QKV.search(k):
            out[k] = v.view(3, D, *v.shape[1:])
        elif re.search(r"\.linear1\.(weight|bias)$", k):
            qkv, mlp = v.split([3 * D, v.shape[0] - 3 * D], dim=0)
            out[k.replace("linear1", "linear1_qkv")] = qkv.view(3, D, *v.shape[1:])
            out[k.replace("linear1", "linear1_mlp")] = mlp
        elif k.endswith(".linear2.weight"):
            a, m = v.split([D, v.shape[1] - D], dim=1)
            out[k.replace("linear2", "linear2_attn")], out[k.replace("linear2", "linear2_mlp")] = a, m
        else:
            out[k] = v
    return {k: out[k] for k in dit_spec(cfg)}  # spec order


def dit_to_official(params: Params, cfg: DiTConfig) -> dict[str, Tensor]:
    """hvfunc params -> official state dict (exact inverse of dit_from_official)."""
    check_tree(params, dit_spec(cfg), what="hvfunc DiT params")
    out: dict[str, Tensor] = {}
    for k, v in params.items():
        if ".linear1_mlp." in k or ".linear2_mlp." in k:
            continue
        if ".linear1_qkv." in k:
            mlp = params[k.replace("linear1_qkv", "linear1_mlp")]
            out[k.replace("linear1_qkv", "linear1")] = torch.cat([v.flatten(0, 1), mlp], dim=0)
        elif _QKV.search(k):
            out[k] = v.flatten(0, 1)
        elif k.endswith(".linear2_attn.weight"):
            out[k.replace("linear2_attn", "linear2")] = torch.cat(
                [v, params[k.replace("linear2_attn", "linear2_mlp")]], dim=1)
        else:
            out[k] = v
    return out


# official module -> (diffusers modules, how): "same" rename, "split" along dim 0 into the
# listed modules (q, k, v[, mlp]), "swap" the two halves (final layer shift/scale).
def _diffusers_table(cfg: DiTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    t: list[tuple[str, tuple[str, ...], str]] = [("img_in.proj", ("x_embedder.proj",), "same")]
    for o, d in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
        if o == "guidance_in" and not cfg.guidance_embed:
            continue
        t += [(f"{o}.mlp.0", (f"time_text_embed.{d}.linear_1",), "same"),
              (f"{o}.mlp.2", (f"time_text_embed.{d}.linear_2",), "same")]
    t += [("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), "same"),
          ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), "same"),
          ("txt_in.input_embedder", ("context_embedder.proj_in",), "same"),
          ("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",), "same"),
          ("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",), "same"),
          ("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",), "same"),
          ("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",), "same")]
    for i in range(cfg.text_refiner_depth):
        o, d = f"txt_in.individual_token_refiner.blocks.{i}", f"context_embedder.token_refiner.refiner_blocks.{i}"
        t += [(f"{o}.norm1", (f"{d}.norm1",), "same"), (f"{o}.norm2", (f"{d}.norm2",), "same"),
              (f"{o}.self_attn_qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), "split"),
              (f"{o}.self_attn_proj", (f"{d}.attn.to_out.0",), "same"),
              (f"{o}.mlp.fc1", (f"{d}.ff.net.0.proj",), "same"), (f"{o}.mlp.fc2", (f"{d}.ff.net.2",), "same"),
              (f"{o}.adaLN_modulation.1", (f"{d}.norm_out.linear",), "same")]
    for i in range(cfg.mm_double_blocks_depth):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for s, ctx, add in (("img", "", ""), ("txt", "_context", "add_")):
            qn, kn = ("norm_q", "norm_k") if s == "img" else ("norm_added_q", "norm_added_k")
            t += [(f"{o}.{s}_mod.linear", (f"{d}.norm1{ctx}.linear",), "same"),
                  (f"{o}.{s}_attn_qkv", tuple(f"{d}.attn.{add}{x}" for x in
                                              (("to_q", "to_k", "to_v") if s == "img" else
                                               ("q_proj", "k_proj", "v_proj"))), "split"),
                  (f"{o}.{s}_attn_q_norm", (f"{d}.attn.{qn}",), "same"),
                  (f"{o}.{s}_attn_k_norm", (f"{d}.attn.{kn}",), "same"),
                  (f"{o}.{s}_attn_proj", (f"{d}.attn.to_out.0" if s == "img" else f"{d}.attn.to_add_out",), "same"),
                  (f"{o}.{s}_mlp.fc1", (f"{d}.ff{ctx}.net.0.proj",), "same"),
                  (f"{o}.{s}_mlp.fc2", (f"{d}.ff{ctx}.net.2",), "same")]
    for i in range(cfg.mm_single_blocks_depth):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        t += [(f"{o}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), "split"),
              (f"{o}.linear2", (f"{d}.proj_out",), "same"), (f"{o}.q_norm", (f"{d}.attn.norm_q",), "same"),
              (f"{o}.k_norm", (f"{d}.attn.norm_k",), "same"),
              (f"{o}.modulation.linear", (f"{d}.norm.linear",), "same")]
    t += [("final_layer.linear", ("proj_out",), "same"),
          ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap")]
    return t


def _swap(v: Tensor) -> Tensor:
    a, b = v.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def official_to_diffusers(sd: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    check_tree(sd, official_spec(cfg), what="official DiT weights")
    D, out = cfg.hidden_size, {}
    for o, ds, how in _diffusers_table(cfg):
        for leaf in ("weight", "bias"):
            if f"{o}.{leaf}" not in sd:
                continue
            v = sd[f"{o}.{leaf}"]
            if how == "split":
                parts = v.split([D] * 3 + ([v.shape[0] - 3 * D] if len(ds) == 4 else []), dim=0)
                out.update({f"{d}.{leaf}": p for d, p in zip(ds, parts)})
            else:
                out[f"{ds[0]}.{leaf}"] = _swap(v) if how == "swap" else v
    return out


def diffusers_to_official(sd: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    expected = {f"{d}.{leaf}" for o, ds, _ in _diffusers_table(cfg) for d in ds for leaf in ("weight", "bias")
                if f"{o}.{leaf}" in official_spec(cfg)}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"diffusers DiT weights do not match the config: missing {missing[:20]} "
                         f"({len(missing)}), unexpected {unexpected[:20]} ({len(unexpected)})")
    out: dict[str, Tensor] = {}
    spec = official_spec(cfg)
    for o, ds, how in _diffusers_table(cfg):
        for leaf in ("weight", "bias"):
            if f"{o}.{leaf}" not in spec:
                continue
            parts = [sd[f"{d}.{leaf}"] for d in ds]
            v = torch.cat(parts, dim=0) if how == "split" else parts[0]
            out[f"{o}.{leaf}"] = _swap(v) if how == "swap" else v
    check_tree(out, spec, what="diffusers DiT weights (as official)")
    return out


def diffusers_config(cfg: DiTConfig) -> dict:
    """`config.json` of diffusers' HunyuanVideoTransformer3DModel for this architecture."""
    pt, ph, pw = cfg.patch_size
    if ph != pw or cfg.text_refiner_mlp_ratio != 4.0:
        raise ValueError(f"diffusers cannot express patch_size {cfg.patch_size} / refiner MLP ratio "
                         f"{cfg.text_refiner_mlp_ratio} (one spatial patch size, refiner ratio fixed at 4)")
    return dict(_class_name="HunyuanVideoTransformer3DModel", in_channels=cfg.in_channels,
                out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num, attention_head_dim=cfg.head_dim,
                num_layers=cfg.mm_double_blocks_depth, num_single_layers=cfg.mm_single_blocks_depth,
                num_refiner_layers=cfg.text_refiner_depth, mlp_ratio=cfg.mlp_width_ratio, patch_size=ph,
                patch_size_t=pt, qk_norm="rms_norm", guidance_embeds=cfg.guidance_embed,
                text_embed_dim=cfg.text_states_dim, pooled_projection_dim=cfg.text_states_dim_2,
                rope_theta=cfg.rope_theta, rope_axes_dim=list(cfg.rope_dim_list),
                image_condition_type=cfg.i2v_condition_type)


def dit_from_diffusers(sd: dict[str, Tensor], cfg: DiTConfig) -> Params:
    return dit_from_official(diffusers_to_official(sd, cfg), cfg)


def dit_to_diffusers(params: Params, cfg: DiTConfig) -> dict[str, Tensor]:
    return official_to_diffusers(dit_to_official(params, cfg), cfg)


Format = Literal["auto", "official", "diffusers", "hvfunc"]


# top-level module names of the official / diffusers layouts (partial checkpoints have some of them)
OFFICIAL_ROOTS = ("double_blocks.", "single_blocks.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
                  "final_layer.")
DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "context_embedder.", "time_text_embed.",
                   "x_embedder.", "proj_out.", "norm_out.")


def detect_format(sd: dict[str, Tensor]) -> Literal["official", "diffusers", "hvfunc"]:
    """Layout of DiT weights from their keys, also of partial or pruned ones (no key is required)."""
    if any(k.startswith(DIFFUSERS_ROOTS) for k in sd):
        return "diffusers"
    if any(re.search(r"\.(linear1_qkv|linear1_mlp|linear2_attn|linear2_mlp)\.", k) or (
            _QKV.search(k) and k.endswith("weight") and sd[k].dim() == 3) for k in sd):
        return "hvfunc"
    if any(k.startswith((*OFFICIAL_ROOTS, "img_in.")) for k in sd):
        return "official"
    raise ValueError(f"cannot tell the DiT format from keys such as {list(sd)[:3]}: expected official "
                     "(img_in, double_blocks, ...), hvfunc or diffusers (x_embedder, transformer_blocks, ...) names")


def read_state_dict(path: str | Path, *, key: str = "module") -> dict[str, Tensor]:
    """A file (.pt/.pth/.bin/.safetensors) or a directory of them -> one flat state dict.

    Official `*_model_states.pt` wrap weights under `key` ("module", or "ema"); a directory
    may hold `mp_rank_00_model_states.pt`, `pytorch_model_*.pt` or safetensors shards.
    """
    path = Path(path)
    if path.is_dir():
        files = (sorted(path.glob("*_model_states.pt")) or sorted(path.glob("pytorch_model_*.pt"))
                 or sorted(path.glob("*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no checkpoint in {path}: expected *_model_states.pt, pytorch_model_*.pt "
                                    f"or *.safetensors")
        if files[0].suffix == ".pt" and len(files) > 1:
            raise ValueError(f"{path} holds several .pt checkpoints {[f.name for f in files]}: pass one file")
        out: dict[str, Tensor] = {}
        for f in files:
            out.update(read_state_dict(f, key=key))
        return out
    if path.suffix == ".safetensors":
        return io.load_safetensors(path)
    obj = io.load_pickle(path)
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    elif isinstance(obj, dict) and any(isinstance(v, dict) for v in obj.values()):
        raise ValueError(f"{path} wraps its weights under {sorted(k for k in obj if isinstance(obj[k], dict))}, "
                         f"not {key!r}: pass the right key (official files use 'module' or 'ema')")
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return dict(obj)


def load_dit(path: str | Path, cfg: DiTConfig, *, source: Format = "auto", key: str = "module",
             dtype: torch.dtype | None = None) -> Params:
    """Read DiT weights in any supported format; all-or-nothing with a precise error."""
    sd = read_state_dict(path, key=key)
    fmt = detect_format(sd) if source == "auto" else source
    try:
        if fmt == "official":
            params = dit_from_official(sd, cfg)
        elif fmt == "diffusers":
            params = dit_from_diffusers(sd, cfg)
        else:
            check_tree(sd, dit_spec(cfg), what="hvfunc DiT params")
            params = {k: sd[k] for k in dit_spec(cfg)}
    except ValueError as e:
        raise ValueError(f"{path} ({fmt} format): {e}") from None
    return params if dtype is None else {k: v.to(dtype) for k, v in params.items()}


from hvfunc.vae.ckpt import load_vae, vae_from_official  # noqa: E402,F401
