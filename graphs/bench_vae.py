"""Benchmark: VAE decode (untiled and tiled), hvfunc vs diffusers' AutoencoderKLHunyuanVideo.

Same random weights, same latents, same process and device. Time is the median of
`repeats` runs after one warm-up; peak memory is graphs.memory's (bytes allocated during
the call, output included). Ratios are ours / diffusers: below 1 is better for us. FLOPs
are counted on our call (torch.utils.flop_counter; tiled: the overlapping tiles' work, which
diffusers' tiling repeats too); `mfu` = achieved FLOP/s / the matmul peak measured in the run.
Run: python scripts/bench.py vae [--preset tiny --frames 33 --height 128 ...]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from graphs import bench
from graphs.memory import peak_memory
from hvfunc import params as hp
from hvfunc import vae
from hvfunc.config import VAEConfig, vae_preset


def diffusers_vae(cfg: VAEConfig, params: dict | None = None, tiling: vae.Tiling | None = None):
    """diffusers' AutoencoderKLHunyuanVideo with cfg's architecture, `params` loaded strictly, and
    upstream's tiling: none (diffusers' default 16-frame framewise coding turned off) or `tiling`'s."""
    from diffusers import AutoencoderKLHunyuanVideo

    m = AutoencoderKLHunyuanVideo(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block, act_fn=cfg.act_fn,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor,
        spatial_compression_ratio=cfg.spatial_compression_ratio,
        temporal_compression_ratio=cfg.time_compression_ratio, mid_block_add_attention=cfg.mid_block_add_attention,
    ).eval()
    if params is not None:
        m.load_state_dict(params, strict=True)
    if tiling is None:
        m.use_framewise_encoding = m.use_framewise_decoding = False
    else:
        s, ts, f = tiling.tile_sample_min_size, tiling.tile_sample_min_tsize, tiling.tile_overlap_factor
        m.enable_tiling(tile_sample_min_height=s, tile_sample_min_width=s, tile_sample_min_num_frames=ts,
                        tile_sample_stride_height=int(s * (1 - f)), tile_sample_stride_width=int(s * (1 - f)),
                        tile_sample_stride_num_frames=int(ts * (1 - f)))
    return m


@dataclass(frozen=True, kw_only=True)
class VAEBench:
    """VAE decode, untiled and tiled, ours vs diffusers' AutoencoderKLHunyuanVideo."""

    preset: str = "tiny"
    """VAE preset (tiny, hunyuan-video)."""
    frames: int = 33
    height: int = 128
    width: int = 128
    repeats: int = 3
    device: str = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    json: Path | None = None
    """Also write the rows (and the machine) as JSON here."""


def run(b: VAEBench) -> list[dict]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[b.dtype]
    return bench_vae(preset=b.preset, frames=b.frames, height=b.height, width=b.width, repeats=b.repeats,
                     device=b.device, dtype=dtype)


@torch.no_grad()
def bench_vae(*, preset: str = "tiny", cfg: VAEConfig | None = None, frames: int = 33, height: int = 128,
              width: int = 128, tiling: vae.Tiling | None = None, repeats: int = 3, device: str = "cpu",
              dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict]:
    """Decode rows (untiled, tiled) for a [1, 16, (frames-1)/4+1, height/8, width/8] latent.

    `tiling` defaults to upstream's numbers scaled to the video (tiles of a quarter of the
    frame edge and frames, overlap 0.25) so that small benchmark videos are really tiled.
    """
    cfg = cfg or vae_preset(preset)
    vae.check_video_shape(frames, height, width, cfg=cfg)
    dev = torch.device(device)
    tiling = tiling or vae.Tiling(tile_sample_min_size=max(64, min(height, width) // 2),
                                  tile_sample_min_tsize=max(16, (frames - 1) // 2))
    g = torch.Generator().manual_seed(seed)
    params = hp.init(vae.vae_spec(cfg), generator=g, dtype=dtype, device=dev)
    rt, rs = cfg.time_compression_ratio, cfg.spatial_compression_ratio
    z = torch.randn(1, cfg.latent_channels, (frames - 1) // rt + 1, height // rs, width // rs,
                    generator=g).to(device=dev, dtype=dtype)
    rows, peak = [], bench.matmul_peak(dev, dtype)
    for name, til in (("untiled", None), ("tiled", tiling)):
        ref = diffusers_vae(cfg, params, til)
        if dev.type != "cpu" or dtype != torch.float32:
            ref = ref.to(device=dev, dtype=dtype)
        ours_fn = functools.partial(vae.decode, params, z, cfg=cfg, tiling=til)
        ref_fn = functools.partial(lambda m: m.decode(z).sample, ref)
        y, ours_peak = peak_memory(ours_fn, device=dev)
        y_ref, ref_peak = peak_memory(ref_fn, device=dev)
        err = float((y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max())
        ours_s, ref_s = (bench.median_seconds(f, device=dev, repeats=repeats) for f in (ours_fn, ref_fn))
        flops = bench.count_flops(ours_fn)
        rows.append({"case": f"decode {name}", "video": f"{frames}x{height}x{width}",
                     "tiles": "-" if til is None else f"{til.tile_sample_min_size}px/{til.tile_sample_min_tsize}f",
                     "ours_s": ours_s, "diffusers_s": ref_s, "time_ratio": ours_s / ref_s,
                     "ours_peak_mib": ours_peak / 2**20, "diffusers_peak_mib": ref_peak / 2**20,
                     "peak_ratio": ours_peak / ref_peak, "max_rel_err": err, "gflop": flops / 1e9,
                     "ours_mfu": flops / ours_s / peak, "diffusers_mfu": flops / ref_s / peak,
                     "matmul_peak_tflops": peak / 1e12})
        del ref, y, y_ref
    return rows
