"""Device-specific backends, chosen by name: attention functions and torch.compile backends.

hvfunc stays free of vendor packages; the Ascend pieces live here and import torch_npu /
torchair lazily, only when asked for. UNVERIFIED: both Ascend paths are written against
the torch_npu / torchair documentation; no Ascend hardware was available.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from hvfunc import attention
from hvfunc.attention import AttnFn, cu_seqlens

ATTENTION = (*attention.BACKENDS, "npu")


def npu_fusion(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor | None) -> Tensor:
    """Ascend `npu_fusion_attention` in TND layout with upstream's varlen packing (q, k, v: [B, L, N, K])."""
    import torch_npu  # only exists on Ascend machines

    B, L, N, K = q.shape
    # TND wants host-side cumulative ends; drop the empty padding segments (repeated ends)
    cum = sorted(set(cu_seqlens(kv_len, B, L, q.device)[1:].tolist()))
    o = torch_npu.npu_fusion_attention(
        q.reshape(B * L, N, K), k.reshape(B * L, N, K), v.reshape(B * L, N, K), N, input_layout="TND",
        scale=K ** -0.5, keep_prob=1.0, actual_seq_qlen=cum, actual_seq_kvlen=cum)[0]
    return o.reshape(B, L, N, K)


def attention_backend(name: str) -> AttnFn:
    """sdpa, flash-varlen (hvfunc.attention) or npu, with a clear error when a package is missing."""
    if name != "npu":
        if name not in attention.BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {list(ATTENTION)}")
        return attention.get(name)
    if importlib.util.find_spec("torch_npu") is None:
        raise ValueError("attention backend 'npu' needs the package 'torch_npu', which is not installed")
    return npu_fusion


def default_compile_backend(device: torch.device | str) -> str:
    kind = torch.device(device).type
    return {"cpu": "inductor", "cuda": "inductor", "npu": "torchair"}.get(kind, "eager")


def torchair_backend(options: tuple[str, ...] = ()):
    """Ascend graph mode for torch.compile (ships with torch_npu), its CompilerConfig set by
    `options` (apply_options). UNVERIFIED here: no Ascend hardware."""
    if importlib.util.find_spec("torchair") is None:
        raise ValueError("compile backend 'torchair' needs the package 'torchair' (it ships with torch_npu), "
                         "which is not installed")
    import torchair

    config = torchair.CompilerConfig()
    apply_options(config, options)
    return torchair.get_npu_backend(compiler_config=config)


def _value(raw: str) -> bool | int | float | str:
    if raw in ("True", "False"):
        return raw == "True"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def apply_options(config: object, options: tuple[str, ...]) -> None:
    """Set KEY=VALUE options on a config object tree, KEY a dotted attribute path
    (torchair: "mode=reduce-overhead", "experimental_config.frozen_parameter=True").
    VALUE: True / False, an int, a float, else the string. Unknown keys raise."""
    for opt in options:
        key, sep, raw = opt.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"compile option {opt!r}: expected KEY=VALUE, e.g. mode=reduce-overhead")
        *path, name = key.strip().split(".")
        obj = config
        for i, attr in enumerate([*path, name]):
            if not hasattr(obj, attr):
                where = ".".join([*path, name][:i]) or type(config).__name__
                raise ValueError(f"compile option {opt!r}: {where} has no setting {attr!r}")
            if i < len(path):
                obj = getattr(obj, attr)
        setattr(obj, name, _value(raw.strip()))
