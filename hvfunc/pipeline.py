"""The three sampling stages as functions of loaded models (DESIGN decision 10):
prompts (+ images) -> conditioning -> latents -> video.

1. `encode`: LLaVA + CLIP conditioning of each prompt and, with real CFG, of the negative
   prompt (I2V: with a black image of the reference's size, upstream's uncond branch).
   Without real CFG the negative prompt is not encoded (upstream sets it to "").
2. `image_latents` (I2V) and `hvfunc.sample.denoise`: the reference image's VAE mode x
   scaling factor, then the Euler loop.
3. `decode`: latents / scaling factor -> VAE decode (tiled with upstream's numbers).
Loading, freeing and moving models between the stages, rank roles and file writing are
the caller's (parallel/sampler.py). Shapes: B videos, C latent channels, T/H/W latent
frames/height/width, S text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hvfunc import vae
from hvfunc.config import VAEConfig
from hvfunc.params import Params
from hvfunc.sample import Cond
from hvfunc.text import TextEncoders, black_images, encode_prompts


@dataclass(frozen=True)
class Conditioning:
    """One prompt's DiT inputs (batch 1): cond, and uncond when real CFG is on."""

    cond: Cond
    uncond: Cond | None


def _split(t, n: int) -> list[Cond]:
    return [{"text_states": t.text_states[i:i + 1], "text_mask": t.text_mask[i:i + 1],
             "text_states_2": t.text_states_2[i:i + 1]} for i in range(n)]


def encode(text: TextEncoders, prompts: Sequence[str], *, negative: str | None, images: Sequence | None = None,
           device: torch.device | str = "cpu", batch_size: int | None = None) -> list[Conditioning]:
    """Conditioning per prompt, fp32 on `device`. negative: None -> no uncond (CFG off).

    images: one reference image per prompt (I2V encoders: LLaVA sees it; CLIP sees text only)."""
    prompts = list(prompts)
    if any(not p.strip() for p in prompts):
        raise ValueError(f"empty prompt at position {[i for i, p in enumerate(prompts) if not p.strip()]}")
    kw = dict(device=device, dtype=torch.float32, video=True, batch_size=batch_size)
    cond = _split(encode_prompts(text, prompts, images=images, **kw), len(prompts))
    if negative is None:
        return [Conditioning(c, None) for c in cond]
    neg_images = black_images(images) if images is not None else None
    uncond = _split(encode_prompts(text, [negative] * len(prompts), images=neg_images, **kw), len(prompts))
    return [Conditioning(c, u) for c, u in zip(cond, uncond)]


def image_latents(params: Params, image_BCHW: Tensor, *, cfg: VAEConfig) -> Tensor:
    """Reference images in [-1, 1] [B, 3, H, W] -> [B, C, 1, H/8, W/8] fp32: the VAE posterior's
    mode of the image encoded as one frame, times the scaling factor (upstream's I2V latent)."""
    dtype = next(iter(params.values())).dtype
    mean, logvar = vae.encode(params, image_BCHW[:, :, None].to(dtype), cfg=cfg)
    return vae.scale_latents(vae.mode(mean, logvar).float(), cfg=cfg)


def decode(params: Params, latents: Tensor, *, cfg: VAEConfig, tiling: vae.Tiling | None = vae.Tiling()) -> Tensor:
    """Scaled latents [B, C, T, H, W] -> video [B, 3, 4(T-1)+1, 8H, 8W] fp32, about [-1, 1]
    (hvfunc.media.to_unit / to_uint8 clamp it as upstream). Runs in the VAE params' dtype."""
    dtype = next(iter(params.values())).dtype
    z = vae.unscale_latents(latents.float(), cfg=cfg).to(dtype)
    return vae.decode(params, z, cfg=cfg, tiling=tiling, slicing=True).float()
