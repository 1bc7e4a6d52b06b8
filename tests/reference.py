"""Independent references for parity tests: diffusers' HunyuanVideo modules built from our configs."""

from __future__ import annotations

import torch

from graphs.bench_vae import diffusers_vae  # noqa: F401 - the VAE oracle, shared with the benchmark
from hvfunc import ckpt
from hvfunc.config import DiTConfig


def diffusers_dit(cfg: DiTConfig):
    """diffusers' HunyuanVideoTransformer3DModel with the same architecture as `cfg` (random weights)."""
    from diffusers import HunyuanVideoTransformer3DModel

    kw = {k: v for k, v in ckpt.diffusers_config(cfg).items() if not k.startswith("_")}
    return HunyuanVideoTransformer3DModel(**kw).eval()


def diffusers_inputs(x, t, text_states, text_mask, text_states_2, guidance=None) -> dict:
    kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=text_states, encoder_attention_mask=text_mask,
              pooled_projections=text_states_2, return_dict=False)
    if guidance is not None:
        kw["guidance"] = guidance
    return kw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's scale (max |b|)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _blend_rows(a: torch.Tensor, b: torch.Tensor, dim: int, extent: int) -> None:
    """Upstream's blend_v / blend_h / blend_t: one slice at a time, in place on b."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        b.select(dim, y).copy_(a.select(dim, a.shape[dim] - extent + y) * (1 - y / extent)
                               + b.select(dim, y) * (y / extent))


def official_tiled(fn, x: torch.Tensor, *, tile: int, stride: int, blend: int, keep: int, ttile: int,
                   tstride: int, tblend: int, tkeep: int) -> torch.Tensor:
    """Upstream's temporal_tiled_* around spatial_tiled_* (AutoencoderKLCausal3D), list-based and
    without diffusers' final crop, for any tile function `fn` (input tile -> output tile)."""
    def spatial(c: torch.Tensor) -> torch.Tensor:
        if c.shape[-1] <= tile and c.shape[-2] <= tile:
            return fn(c)
        rows = [[fn(c[:, :, :, i:i + tile, j:j + tile]) for j in range(0, c.shape[-1], stride)]
                for i in range(0, c.shape[-2], stride)]
        out_rows = []
        for i, row in enumerate(rows):
            for j, t in enumerate(row):
                if i > 0:
                    _blend_rows(rows[i - 1][j], t, 3, blend)
                if j > 0:
                    _blend_rows(row[j - 1], t, 4, blend)
            out_rows.append(torch.cat([t[:, :, :, :keep, :keep] for t in row], dim=4))
        return torch.cat(out_rows, dim=3)

    if x.shape[2] <= ttile:
        return spatial(x)
    chunks = []
    for i in range(0, x.shape[2], tstride):
        y = spatial(x[:, :, i:i + ttile + 1])
        chunks.append(y[:, :, 1:] if i > 0 else y)
    for i in range(1, len(chunks)):
        _blend_rows(chunks[i - 1], chunks[i], 2, tblend)
    return torch.cat([c[:, :, :tkeep + (i == 0)] for i, c in enumerate(chunks)], dim=2)
