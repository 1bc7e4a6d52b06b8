"""Tiled and batch-sliced execution of the VAE, with the official tile arithmetic and blending.

Shapes: B batch, C channels, T/H/W frames/height/width of the input (pixels to encode,
latents to decode); outputs are 4x / 8x smaller (encode) or larger (decode).

What upstream (`AutoencoderKLCausal3D`) does, and so what we compute:
- Temporal tiling when T > tile: chunks of tile + 1 input frames every `stride` frames;
  every chunk but the first drops its first output frame (a causal chunk's frame 0 has no
  past); each chunk's first `blend` output frames are linearly blended with the previous
  chunk's last ones; the first chunk keeps keep + 1 frames, the others `keep`.
- Spatial tiling (inside each chunk) when H or W > tile: tiles of tile x tile every
  `stride`, in raster order each blended with the tile above, then the one to the left
  (both already blended), then cropped to keep x keep.
Blends read neighbours *after* their own blending (upstream blends in place), which we
reproduce. Unlike upstream, finished pixels go straight into the preallocated output and
only the strips that later tiles blend with are kept, so the working memory is one tile's
activations plus the strips, not every decoded tile of the video.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from hvfunc.config import VAEConfig

TileFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True, kw_only=True)
class Tiling:
    """Tile sizes of tiled encode / decode, in pixels and frames (upstream's names and defaults)."""

    tile_sample_min_size: int = 256
    """Spatial tile edge in pixels (latent tile = this / spatial_compression_ratio)."""
    tile_sample_min_tsize: int = 64
    """Temporal tile in frames (latent tile = this / time_compression_ratio); chunks hold one more."""
    tile_overlap_factor: float = 0.25
    """Fraction of a tile blended with its neighbour; tiles step by (1 - this) of a tile."""


@dataclass(frozen=True)
class Axis:
    """One axis of a tiling, resolved for one direction (input units in, output units out)."""

    tile: int
    """Input tile length; the axis is tiled only when the input is longer."""
    stride: int
    """Input step between tile starts."""
    blend: int
    """Output length blended with the previous tile."""
    keep: int
    """Output length each tile contributes (the first temporal chunk one more)."""


def plan(tiling: Tiling, cfg: VAEConfig, *, decode: bool) -> tuple[Axis, Axis]:
    """(spatial, temporal) axes with upstream's int() rounding; ValueError if they do not tile exactly.

    Upstream computes the input stride and the output keep separately; for overlap factors
    where they disagree (e.g. 0.2 with 256 px) its output has duplicated or missing rows,
    so such settings are refused rather than reproduced.
    """
    f, s, ts = tiling.tile_overlap_factor, tiling.tile_sample_min_size, tiling.tile_sample_min_tsize
    rs, rt = cfg.spatial_compression_ratio, cfg.time_compression_ratio
    if not 0.0 <= f < 1.0:
        raise ValueError(f"tile_overlap_factor must be in [0, 1), got {f}")
    if s <= 0 or s % rs or ts <= 0 or ts % rt:
        raise ValueError(f"tile_sample_min_size {s} must be a positive multiple of {rs} and "
                         f"tile_sample_min_tsize {ts} a positive multiple of {rt}")
    axes = []
    for sample, ratio in ((s, rs), (ts, rt)):
        latent = sample // ratio
        if decode:
            ax = Axis(latent, int(latent * (1 - f)), int(sample * f), sample - int(sample * f))
            ok = ax.keep == ax.stride * ratio
        else:
            ax = Axis(sample, int(sample * (1 - f)), int(latent * f), latent - int(latent * f))
            ok = ax.stride == ax.keep * ratio
        if not ok or ax.stride <= 0:
            raise ValueError(f"{tiling} does not tile exactly: a tile of {sample} steps by {int(sample * (1 - f))} "
                             f"but keeps {sample - int(sample * f)} (upstream would duplicate or drop pixels); "
                             f"use an overlap factor that is a multiple of {ratio}/{sample}, e.g. 0.25")
        axes.append(ax)
    return axes[0], axes[1]


def blend_into(a: Tensor, b: Tensor, dim: int, n: int) -> None:
    """b's first e = min(n, len a, len b) slices along `dim` <- a's last e * (1 - w) + b's * w, w = i / e."""
    e = min(a.shape[dim], b.shape[dim], n)
    if e == 0:
        return
    shape = [1] * b.dim()
    shape[dim] = e
    w = (torch.arange(e, dtype=torch.float64) / e).to(device=b.device, dtype=b.dtype).view(shape)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e) * (1 - w) + head * w)


def _tail(y: Tensor, dim: int, n: int) -> Tensor:
    """A copy of y's last min(n, len) slices (a view would keep the whole tile alive)."""
    m = min(n, y.shape[dim])
    return y.narrow(dim, y.shape[dim] - m, m).clone()


def _spatial(fn: TileFn, x: Tensor, ax: Axis | None) -> Iterator[tuple[int, int, Tensor]]:
    """(output row, output col, finished crop) per spatial tile, in upstream's raster order."""
    H, W = x.shape[-2:]
    if ax is None or (H <= ax.tile and W <= ax.tile):
        yield 0, 0, fn(x)
        return
    above: list[Tensor] = []  # per tile column: bottom strip of the tile above, blended
    for r, i in enumerate(range(0, H, ax.stride)):
        left = None
        for c, j in enumerate(range(0, W, ax.stride)):
            y = fn(x[:, :, :, i:i + ax.tile, j:j + ax.tile])
            if r > 0:
                blend_into(above[c], y, -2, ax.blend)
            if left is not None:
                blend_into(left, y, -1, ax.blend)
            if r == 0:
                above.append(_tail(y, -2, ax.blend))
            else:
                above[c] = _tail(y, -2, ax.blend)
            left = _tail(y, -1, ax.blend)
            yield r * ax.keep, c * ax.keep, y[:, :, :, :ax.keep, :ax.keep]


def _chunks(T: int, ax: Axis | None) -> list[tuple[int, int]]:
    """Input frame ranges; a trailing one-frame chunk is skipped (upstream decodes it, then drops it)."""
    if ax is None or T <= ax.tile:
        return [(0, T)]
    return [(a, min(a + ax.tile + 1, T)) for a in range(0, T, ax.stride) if a == 0 or T - a > 1]


def run(fn: TileFn, x: Tensor, *, space: Axis | None, time: Axis | None, out_size: tuple[int, int, int]) -> Tensor:
    """fn over x's tiles, blended and assembled into one [B, C', *out_size] tensor.

    `fn` maps an input tile [B, C, t, h, w] to its output tile; `space` / `time` None
    disable tiling along those axes. Untiled inputs are passed to fn whole (no copy).
    """
    chunks = _chunks(x.shape[2], time)
    if len(chunks) == 1 and (space is None or max(x.shape[-2:]) <= space.tile):
        return fn(x)
    out: Tensor | None = None
    tails: Tensor | None = None  # previous chunk's last `blend` output frames (blended), full area
    t0 = 0
    for k, (a, b) in enumerate(chunks):
        new_tails, n = None, 0
        for h0, w0, y in _spatial(fn, x[:, :, a:b], space):
            if out is None:
                out = y.new_empty((y.shape[0], y.shape[1], *out_size))
            if k > 0:  # a causal chunk's first output frame saw no past: drop it, blend the next ones
                y = y[:, :, 1:]
            if k > 0 and tails is not None:
                blend_into(tails[:, :, :, h0:h0 + y.shape[3], w0:w0 + y.shape[4]], y, 2, time.blend)
            n = y.shape[2] if time is None or len(chunks) == 1 else min(y.shape[2], time.keep + (k == 0))
            out[:, :, t0:t0 + n, h0:h0 + y.shape[3], w0:w0 + y.shape[4]] = y[:, :, :n]
            if time is not None and len(chunks) > 1 and time.blend:
                if new_tails is None:
                    new_tails = out.new_empty((*out.shape[:2], min(time.blend, y.shape[2]), *out.shape[3:]))
                new_tails[:, :, :, h0:h0 + y.shape[3], w0:w0 + y.shape[4]] = _tail(y, 2, time.blend)
        tails, t0 = new_tails, t0 + n
    assert out is not None and t0 == out.shape[2], f"tiling wrote {t0} of {out_size[0]} frames"
    return out


def sliced(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn per batch element (upstream's `use_slicing`), written into one preallocated output."""
    out: Tensor | None = None
    for b in range(x.shape[0]):
        y = fn(x[b:b + 1])
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out[b:b + 1] = y
    assert out is not None
    return out
