"""The causal 3D VAE: encoder, decoder, encode / decode with tiling, posterior and latent scaling.

Shapes: B batch, T/H/W video frames/height/width, t/h/w latent frames/height/width with
t = (T - 1) / 4 + 1 and h, w = H / 8, W / 8; L latent channels (16). Videos are in
[-1, 1] (upstream's pipeline maps decoded videos to [0, 1] with x / 2 + 0.5).

encode -> (mean, logvar) [B, L, t, h, w]; `mode` or `sample` picks a latent z, and
`scale_latents` (z * 0.476986) gives what the DiT sees. decode takes z (unscaled): call
`unscale_latents` on DiT outputs first. Params may be fp32, bf16 or fp16 (see blocks.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hvfunc.config import VAEConfig
from hvfunc.params import Params, sub
from hvfunc.vae import tiling as tl
from hvfunc.vae.blocks import causal_conv, conv3d, mid_block, norm_act, resnet, upsample
from hvfunc.vae.spec import down_strides, up_factors

Net = Callable[..., Tensor]  # encoder / decoder: (params, x, *, cfg) -> Tensor
LOGVAR_RANGE = (-30.0, 20.0)  # upstream's DiagonalGaussianDistribution clamps logvar to this


def encoder(p: Params, x: Tensor, *, cfg: VAEConfig) -> Tensor:
    """Video [B, 3, T, H, W] -> moments [B, 2L, t, h, w] (after quant_conv; mean | logvar)."""
    g = cfg.norm_num_groups
    h = causal_conv(p, x, "encoder.conv_in.conv")
    for i, stride in enumerate(down_strides(cfg)):
        for j in range(cfg.layers_per_block):
            h = resnet(sub(p, f"encoder.down_blocks.{i}.resnets.{j}."), h, groups=g)
        if stride is not None:
            h = causal_conv(p, h, f"encoder.down_blocks.{i}.downsamplers.0.conv.conv", stride=stride)
    h = mid_block(sub(p, "encoder.mid_block."), h, groups=g)
    h = causal_conv(p, norm_act(p, h, "encoder.conv_norm_out", g), "encoder.conv_out.conv")
    return conv3d(h, p["quant_conv.weight"], p["quant_conv.bias"])


def decoder(p: Params, z: Tensor, *, cfg: VAEConfig) -> Tensor:
    """Latents z [B, L, t, h, w] (post_quant_conv first) -> video [B, 3, 4(t-1)+1, 8h, 8w]."""
    g = cfg.norm_num_groups
    h = conv3d(z, p["post_quant_conv.weight"], p["post_quant_conv.bias"])
    h = mid_block(sub(p, "decoder.mid_block."), causal_conv(p, h, "decoder.conv_in.conv"), groups=g)
    for i, factor in enumerate(up_factors(cfg)):
        for j in range(cfg.layers_per_block + 1):
            h = resnet(sub(p, f"decoder.up_blocks.{i}.resnets.{j}."), h, groups=g)
        if factor is not None:
            h = upsample(sub(p, f"decoder.up_blocks.{i}.upsamplers.0."), h, factor)
    return causal_conv(p, norm_act(p, h, "decoder.conv_norm_out", g), "decoder.conv_out.conv")


def _nearest(n: int, step: int, offset: int = 0) -> str:
    lo = (n - offset) // step * step + offset
    return f"{lo} or {lo + step}" if lo >= max(offset, 1) else f"{lo + step}"


def check_video_shape(frames: int, height: int, width: int, *, cfg: VAEConfig, size_multiple: int | None = None,
                      what: str = "video") -> None:
    """ValueError naming the nearest valid values unless frames = 4k+1 and H, W are multiples of
    `size_multiple` (default the VAE's 8; the DiT's 2x2 patches make the pipeline use 16)."""
    rt, m = cfg.time_compression_ratio, size_multiple or cfg.spatial_compression_ratio
    errors = []
    if frames < 1 or (frames - 1) % rt:
        errors.append(f"{frames} frames (need {rt}k+1: use {_nearest(frames, rt, 1)})")
    for name, n in (("height", height), ("width", width)):
        if n < m or n % m:
            errors.append(f"{name} {n} (need a multiple of {m}: use {_nearest(n, m)})")
    if errors:
        raise ValueError(f"{what} shape not supported by the causal VAE: " + "; ".join(errors))


def _check_input(x: Tensor, channels: int, what: str) -> None:
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"{what} must be [B, {channels}, T, H, W], got {tuple(x.shape)}")


def encode(params: Params, video: Tensor, *, cfg: VAEConfig, tiling: tl.Tiling | None = None,
           slicing: bool = False, net: Net = encoder) -> tuple[Tensor, Tensor]:
    """Video [B, 3, T, H, W] in [-1, 1] -> posterior (mean, logvar) [B, L, t, h, w], logvar clamped.

    `tiling` enables upstream's temporal + spatial tiling (exactly its numbers); `slicing`
    encodes one batch element at a time. Both only bound memory; tiling changes values
    (tiles are blended), slicing does not. `net`: `encoder` or a compiled version of it
    (graphs.vae), run once per tile.
    """
    _check_input(video, cfg.in_channels, "video")
    T, H, W = video.shape[2:]
    check_video_shape(T, H, W, cfg=cfg)
    rt, rs = cfg.time_compression_ratio, cfg.spatial_compression_ratio
    space, time = tl.plan(tiling, cfg, decode=False) if tiling is not None else (None, None)

    def one(x: Tensor) -> Tensor:
        return tl.run(lambda tile: net(params, tile, cfg=cfg), x, space=space, time=time,
                      out_size=((T - 1) // rt + 1, H // rs, W // rs))

    moments = tl.sliced(one, video) if slicing else one(video)
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(*LOGVAR_RANGE)


def decode(params: Params, latents: Tensor, *, cfg: VAEConfig, tiling: tl.Tiling | None = None,
           slicing: bool = False, net: Net = decoder) -> Tensor:
    """Unscaled latents [B, L, t, h, w] -> video [B, 3, 4(t-1)+1, 8h, 8w] (about [-1, 1], not clamped).
    `net`: `decoder` or a compiled version of it (graphs.vae), run once per tile."""
    _check_input(latents, cfg.latent_channels, "latents")
    t, h, w = latents.shape[2:]
    rt, rs = cfg.time_compression_ratio, cfg.spatial_compression_ratio
    space, time = tl.plan(tiling, cfg, decode=True) if tiling is not None else (None, None)

    def one(z: Tensor) -> Tensor:
        return tl.run(lambda tile: net(params, tile, cfg=cfg), z, space=space, time=time,
                      out_size=(rt * (t - 1) + 1, rs * h, rs * w))

    return tl.sliced(one, latents) if slicing else one(latents)


def mode(mean: Tensor, logvar: Tensor) -> Tensor:
    """The posterior's mode: its mean (upstream uses it for the I2V reference frame)."""
    del logvar
    return mean


def sample(mean: Tensor, logvar: Tensor, *, generator: torch.Generator) -> Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, 1) drawn on the generator's device (training latents)."""
    eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)


def scale_latents(z: Tensor, *, cfg: VAEConfig) -> Tensor:
    """VAE latents -> DiT latents: z * scaling_factor (0.476986; upstream has no shift)."""
    return z * cfg.scaling_factor


def unscale_latents(z: Tensor, *, cfg: VAEConfig) -> Tensor:
    """DiT latents -> VAE latents for decode: z / scaling_factor."""
    return z / cfg.scaling_factor
