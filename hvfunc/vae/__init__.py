"""The causal 3D VAE of HunyuanVideo ("884-16c-hy") as pure functions; see docs/vae.md.

`encode` / `decode` (optionally tiled with upstream's `Tiling` numbers, and batch-sliced),
the posterior helpers `mode` / `sample`, latent scaling for the DiT, the param spec, and
the shape rule (frames 4k+1, sizes multiples of 8) with errors naming valid values.
"""

from hvfunc.vae.model import (
    LOGVAR_RANGE,
    check_video_shape,
    decode,
    decoder,
    encode,
    encoder,
    mode,
    sample,
    scale_latents,
    unscale_latents,
)
from hvfunc.vae.spec import vae_spec
from hvfunc.vae.tiling import Tiling

__all__ = ["LOGVAR_RANGE", "Tiling", "check_video_shape", "decode", "decoder", "encode", "encoder", "mode",
           "sample", "scale_latents", "unscale_latents", "vae_spec"]
