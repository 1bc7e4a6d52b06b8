"""Param spec and block layout of the causal 3D VAE (official `AutoencoderKLCausal3D` keys).

Keys are the official checkpoint's, which diffusers' `AutoencoderKLHunyuanVideo` also
uses unchanged: causal convs hold an inner `conv` (`encoder.conv_in.conv.weight`),
`quant_conv` / `post_quant_conv` are plain 1x1x1 Conv3d, the mid-block attention is
diffusers' `Attention` (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`).
Inits are torch's defaults (Conv3d / Linear kaiming-uniform, GroupNorm ones / zeros).
"""

from __future__ import annotations

from hvfunc.config import VAEConfig
from hvfunc.params import ONES, ZEROS, ParamSpec, Spec, linear_default, linear_spec

Stride = tuple[int, int, int]  # (t, h, w)


def down_strides(cfg: VAEConfig) -> list[Stride | None]:
    """Encoder down block i's downsample stride, None where it has none (official rule).

    Spatial halving in the first log2(spatial ratio) blocks; temporal halving in the two
    blocks before the last; the last block never downsamples. 884: (1,2,2) (2,2,2) (2,2,2) None.
    """
    n = len(cfg.block_out_channels)
    n_space = cfg.spatial_compression_ratio.bit_length() - 1
    n_time = cfg.time_compression_ratio.bit_length() - 1
    out: list[Stride | None] = []
    for i in range(n):
        s, t = i < n_space, n - 1 - n_time <= i < n - 1
        out.append((2 if t else 1, 2 if s else 1, 2 if s else 1) if (s or t) else None)
    return out


def up_factors(cfg: VAEConfig) -> list[Stride | None]:
    """Decoder up block i's nearest-upsample factor (the same rule, on reversed widths)."""
    return down_strides(cfg)


def _norm(prefix: str, c: int) -> Spec:
    return {f"{prefix}.weight": ParamSpec((c,), ("channels",), ONES),
            f"{prefix}.bias": ParamSpec((c,), ("channels",), ZEROS)}


def _conv(prefix: str, c_out: int, c_in: int, k: int) -> Spec:
    fan_in = c_in * k ** 3
    return {f"{prefix}.weight": ParamSpec((c_out, c_in, k, k, k), ("channels", None, None, None, None),
                                          linear_default(fan_in)),
            f"{prefix}.bias": ParamSpec((c_out,), ("channels",), linear_default(fan_in))}


def _resnet(prefix: str, c_in: int, c_out: int) -> Spec:
    s = _norm(f"{prefix}.norm1", c_in) | _conv(f"{prefix}.conv1.conv", c_out, c_in, 3)
    s |= _norm(f"{prefix}.norm2", c_out) | _conv(f"{prefix}.conv2.conv", c_out, c_out, 3)
    if c_in != c_out:
        s |= _conv(f"{prefix}.conv_shortcut.conv", c_out, c_in, 1)
    return s


def _mid(prefix: str, c: int, cfg: VAEConfig) -> Spec:
    s = _resnet(f"{prefix}.resnets.0", c, c)
    if cfg.mid_block_add_attention:
        a = f"{prefix}.attentions.0"
        s |= _norm(f"{a}.group_norm", c)
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            s |= linear_spec(f"{a}.{name}", c, c, ("channels", None))
    return s | _resnet(f"{prefix}.resnets.1", c, c)


def vae_spec(cfg: VAEConfig) -> Spec:
    """Every leaf of the VAE, in the official module order (encoder, decoder, quant convs)."""
    ch, L = cfg.block_out_channels, cfg.latent_channels
    s = _conv("encoder.conv_in.conv", ch[0], cfg.in_channels, 3)
    c_prev = ch[0]
    for i, (c, stride) in enumerate(zip(ch, down_strides(cfg))):
        for j in range(cfg.layers_per_block):
            s |= _resnet(f"encoder.down_blocks.{i}.resnets.{j}", c_prev if j == 0 else c, c)
        if stride is not None:
            s |= _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv.conv", c, c, 3)
        c_prev = c
    s |= _mid("encoder.mid_block", ch[-1], cfg)
    s |= _norm("encoder.conv_norm_out", ch[-1]) | _conv("encoder.conv_out.conv", 2 * L, ch[-1], 3)

    s |= _conv("decoder.conv_in.conv", ch[-1], L, 3)
    s |= _mid("decoder.mid_block", ch[-1], cfg)
    c_prev = ch[-1]
    for i, (c, factor) in enumerate(zip(reversed(ch), up_factors(cfg))):
        for j in range(cfg.layers_per_block + 1):
            s |= _resnet(f"decoder.up_blocks.{i}.resnets.{j}", c_prev if j == 0 else c, c)
        if factor is not None:
            s |= _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv.conv", c, c, 3)
        c_prev = c
    s |= _norm("decoder.conv_norm_out", ch[0]) | _conv("decoder.conv_out.conv", cfg.out_channels, ch[0], 3)
    return s | _conv("quant_conv", 2 * L, 2 * L, 1) | _conv("post_quant_conv", L, L, 1)
