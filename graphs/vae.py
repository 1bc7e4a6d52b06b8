"""The VAE's encoder / decoder under torch.compile, for hvfunc.vae.encode / decode (`net=`).

Static shapes by default: hvfunc.vae runs its network once per tile, and a tiling plan has
a few distinct tile shapes (full tiles, edge tiles, the causal first chunk), each compiled
once and shared by every clip of a bucket. (Dynamic shapes compile far slower: ~2 min per
VAE graph on 2 CPU cores.) Many buckets exceed dynamo's per-function recompile limit (8),
which ends a fullgraph run, so the nets raise it while they run. On CPU the compiled
convolutions lose hvfunc's direct oneDNN call and run slower than eager; the switch is
meant for GPUs, where it has not been measured yet (docs/vae.md). The encoder compiles
with Inductor (torch 2.13); the decoder only with aot_eager: Inductor fails on it
("vr must not be None for symbol q2", an indexing simplification), so sampling-side decode
stays eager until that is solved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from graphs.blocks import Compile, compiled, resolve
from hvfunc import vae
from hvfunc.vae.model import Net

RECOMPILE_LIMIT = 256
"""Compiled tile shapes allowed per network (distinct tile shapes over all buckets)."""


# dynamo's per-function limit ("cache_size_limit" before it was renamed)
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def _wrap(fn: Net, c: Compile, backend_fn: Callable | None) -> Net:
    f = compiled(fn, c, backend_fn)
    if f is fn:
        return fn

    def run(p, x, *, cfg):
        with torch._dynamo.config.patch(**{_LIMIT: RECOMPILE_LIMIT}):
            return f(p, x, cfg=cfg)

    return run


def vae_nets(c: Compile, *, device: torch.device | str = "cpu",
             backend_fn: Callable | None = None) -> tuple[Net, Net]:
    """(encoder, decoder) compiled as `c` says (backend "none": the plain functions; dynamic
    None means static here). backend_fn: a dynamo backend callable overriding c.backend (tests)."""
    c = resolve(c, device)
    c = dataclasses.replace(c, dynamic=False if c.dynamic is None else c.dynamic)
    return _wrap(vae.encoder, c, backend_fn), _wrap(vae.decoder, c, backend_fn)
