"""Param spec of the HunyuanVideo DiT in hvfunc's layout.

Keys follow the official checkpoint; fused projections are stored so that tensor
parallelism is one plain placement per leaf:
  *_attn_qkv / self_attn_qkv / linear1_qkv  [3, N*K, D]   (official [3*N*K, D], "(K H D)" rows)
  single_blocks.i.linear1 -> linear1_qkv [3, N*K, D] + linear1_mlp [M, D]
  single_blocks.i.linear2 -> linear2_attn [D, N*K] + linear2_mlp [D, M] + linear2.bias [D]
Everything else has the official key and shape. `hvfunc.ckpt` converts exactly.
Inits are upstream's: zero modulation / final layer, N(0, 0.02) timestep MLPs,
xavier patch embedding, torch's Linear default elsewhere.
"""

from __future__ import annotations

import math

from hvfunc.config import DiTConfig
from hvfunc.params import ONES, ZEROS, Init, ParamSpec, Spec, linear_default, linear_spec


def _qkv(prefix: str, cfg: DiTConfig, *, bias: bool) -> Spec:
    D = cfg.hidden_size
    out = {f"{prefix}.weight": ParamSpec((3, D, D), ("qkv", "heads", "embed"), linear_default(D))}
    if bias:
        out[f"{prefix}.bias"] = ParamSpec((3, D), ("qkv", "heads"), linear_default(D))
    return out


def _timestep_mlp(prefix: str, cfg: DiTConfig) -> Spec:
    D, F = cfg.hidden_size, cfg.timestep_freq_dim
    return (linear_spec(f"{prefix}.mlp.0", D, F, ("embed", "freq"), init=Init("normal", 0.02),
                        bias_init=linear_default(F))
            | linear_spec(f"{prefix}.mlp.2", D, D, ("embed", None), init=Init("normal", 0.02),
                          bias_init=linear_default(D)))


def _qk_norms(prefix_q: str, prefix_k: str, cfg: DiTConfig) -> Spec:
    if not cfg.qk_norm:
        return {}
    K = cfg.head_dim
    return {f"{prefix_q}.weight": ParamSpec((K,), ("head_dim",), ONES),
            f"{prefix_k}.weight": ParamSpec((K,), ("head_dim",), ONES)}


def _refiner(cfg: DiTConfig) -> Spec:
    D, T = cfg.hidden_size, cfg.text_states_dim
    M = int(D * cfg.text_refiner_mlp_ratio)
    s = linear_spec("txt_in.input_embedder", D, T, ("embed", "text"))
    s |= _timestep_mlp("txt_in.t_embedder", cfg)
    s |= linear_spec("txt_in.c_embedder.linear_1", D, T, ("embed", "text"))
    s |= linear_spec("txt_in.c_embedder.linear_2", D, D, ("embed", None))
    for i in range(cfg.text_refiner_depth):
        b = f"txt_in.individual_token_refiner.blocks.{i}"
        s |= {f"{b}.norm1.weight": ParamSpec((D,), ("embed",), ONES),
              f"{b}.norm1.bias": ParamSpec((D,), ("embed",), ZEROS)}
        s |= _qkv(f"{b}.self_attn_qkv", cfg, bias=cfg.qkv_bias)
        s |= linear_spec(f"{b}.self_attn_proj", D, D, ("embed", "heads"), bias=cfg.qkv_bias)
        s |= {f"{b}.norm2.weight": ParamSpec((D,), ("embed",), ONES),
              f"{b}.norm2.bias": ParamSpec((D,), ("embed",), ZEROS)}
        s |= linear_spec(f"{b}.mlp.fc1", M, D, ("mlp", "embed"))
        s |= linear_spec(f"{b}.mlp.fc2", D, M, ("embed", "mlp"))
        s |= linear_spec(f"{b}.adaLN_modulation.1", 2 * D, D, ("mod", "embed"), init=ZEROS)
    return s


def _double_block(i: int, cfg: DiTConfig) -> Spec:
    D, M = cfg.hidden_size, cfg.mlp_hidden
    s: Spec = {}
    for st in ("img", "txt"):
        b = f"double_blocks.{i}.{st}"
        s |= linear_spec(f"{b}_mod.linear", 6 * D, D, ("mod", "embed"), init=ZEROS)
        s |= _qkv(f"{b}_attn_qkv", cfg, bias=cfg.qkv_bias)
        s |= _qk_norms(f"{b}_attn_q_norm", f"{b}_attn_k_norm", cfg)
        s |= linear_spec(f"{b}_attn_proj", D, D, ("embed", "heads"), bias=cfg.qkv_bias)
        s |= linear_spec(f"{b}_mlp.fc1", M, D, ("mlp", "embed"))
        s |= linear_spec(f"{b}_mlp.fc2", D, M, ("embed", "mlp"))
    return s


def _single_block(i: int, cfg: DiTConfig) -> Spec:
    D, M = cfg.hidden_size, cfg.mlp_hidden
    b = f"single_blocks.{i}"
    fan2 = linear_default(D + M)  # linear2 is one nn.Linear(D + M, D) upstream
    s = _qkv(f"{b}.linear1_qkv", cfg, bias=True)
    for k in list(s):  # linear1 is one nn.Linear(D, 3D + M): fan_in D, same as _qkv's
        s[k] = ParamSpec(s[k].shape, s[k].axes, linear_default(D))
    s |= linear_spec(f"{b}.linear1_mlp", M, D, ("mlp", "embed"))
    s |= {f"{b}.linear2_attn.weight": ParamSpec((D, D), ("embed", "heads"), fan2),
          f"{b}.linear2_mlp.weight": ParamSpec((D, M), ("embed", "mlp"), fan2),
          f"{b}.linear2.bias": ParamSpec((D,), ("embed",), fan2)}
    s |= _qk_norms(f"{b}.q_norm", f"{b}.k_norm", cfg)
    s |= linear_spec(f"{b}.modulation.linear", 3 * D, D, ("mod", "embed"), init=ZEROS)
    return s


def dit_spec(cfg: DiTConfig) -> Spec:
    """Every leaf of the DiT, in the official module order."""
    D = cfg.hidden_size
    pt, ph, pw = cfg.patch_size
    fan_in, fan_out = cfg.in_channels * pt * ph * pw, D
    s: Spec = {
        "img_in.proj.weight": ParamSpec((D, cfg.in_channels, pt, ph, pw), ("embed", "channels", None, None, None),
                                        Init("uniform", math.sqrt(6.0 / (fan_in + fan_out)))),
        "img_in.proj.bias": ParamSpec((D,), ("embed",), ZEROS),
    }
    s |= _refiner(cfg)
    s |= _timestep_mlp("time_in", cfg)
    s |= linear_spec("vector_in.in_layer", D, cfg.text_states_dim_2, ("embed", "pooled"))
    s |= linear_spec("vector_in.out_layer", D, D, ("embed", None))
    if cfg.guidance_embed:
        s |= _timestep_mlp("guidance_in", cfg)
    for i in range(cfg.mm_double_blocks_depth):
        s |= _double_block(i, cfg)
    for i in range(cfg.mm_single_blocks_depth):
        s |= _single_block(i, cfg)
    out = pt * ph * pw * cfg.out_channels
    s |= linear_spec("final_layer.linear", out, D, ("out", "embed"), init=ZEROS)
    s |= linear_spec("final_layer.adaLN_modulation.1", 2 * D, D, ("mod", "embed"), init=ZEROS)
    return s
