"""Model configs: frozen keyword-only dataclasses and named presets.

Field names follow the official HunyuanVideo code (`hyvideo/modules/models.py`,
`HUNYUAN_VIDEO_CONFIG`, the `--rope-theta` / `--text-states-dim` CLI defaults) so a
reader can put the two side by side. Presets are plain Python objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


def _preset(table: dict, name: str, what: str):
    """Look up a preset by name with an error that lists the valid ones."""
    if name not in table:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {sorted(table)}")
    return table[name]


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Architecture of the HunyuanVideo diffusion transformer (HYVideo-T/2 family)."""

    hidden_size: int = 3072
    """Model width D; equals heads_num * head_dim."""
    heads_num: int = 24
    """Attention heads N (head_dim K = hidden_size / heads_num)."""
    mlp_width_ratio: float = 4.0
    """MLP hidden width as a multiple of hidden_size (blocks and token refiner)."""
    mm_double_blocks_depth: int = 20
    """Number of double-stream (separate img/txt weights, joint attention) blocks."""
    mm_single_blocks_depth: int = 40
    """Number of single-stream (fused linear1/linear2) blocks."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch (t, h, w) of the Conv3d patch embedding."""
    in_channels: int = 16
    """Latent channels in (16 = the causal VAE's latent channels)."""
    out_channels: int = 16
    """Latent channels out."""
    rope_dim_list: tuple[int, int, int] = (16, 56, 56)
    """RoPE dims per axis (t, h, w); must sum to head_dim."""
    rope_theta: float = 256.0
    """RoPE base (the official `--rope-theta` default; not 10000)."""
    text_states_dim: int = 4096
    """Width of the LLM text states (LLaVA-Llama-3-8B hidden size)."""
    text_states_dim_2: int = 768
    """Width of the pooled CLIP-L text embedding that feeds `vector_in`."""
    guidance_embed: bool = True
    """Embedded (distilled) guidance input `guidance_in`, as in HYVideo-T/2-cfgdistill."""
    qkv_bias: bool = True
    """Bias on every q/k/v projection."""
    qk_norm: bool = True
    """Per-head RMSNorm on q and k in the double/single blocks (never in the refiner)."""
    text_refiner_depth: int = 2
    """Blocks in the token refiner `txt_in` (hard-coded 2 upstream)."""
    text_refiner_mlp_ratio: float = 4.0
    """MLP width ratio of the token refiner (its own constant upstream, not mlp_width_ratio)."""
    timestep_freq_dim: int = 256
    """Width of the sinusoidal timestep/guidance features."""
    i2v_condition_type: Literal["token_replace"] | None = None
    """Image-to-video conditioning: None (T2V) or "token_replace" (HunyuanVideo-I2V):
    latent frame 0 is the clean image latent and its tokens are modulated by
    time_in(0) + vector_in(clip) in every block."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads_num {self.heads_num}")
        if sum(self.rope_dim_list) != self.head_dim:
            raise ValueError(f"rope_dim_list {self.rope_dim_list} sums to {sum(self.rope_dim_list)}, "
                             f"not head_dim {self.head_dim}")
        if any(d % 2 for d in self.rope_dim_list):
            raise ValueError(f"rope_dim_list {self.rope_dim_list} must hold even dims (rotation acts on pairs)")
        if self.i2v_condition_type not in (None, "token_replace"):
            raise ValueError(f"i2v_condition_type must be None or 'token_replace', got {self.i2v_condition_type!r}")
        if self.i2v_condition_type == "token_replace" and self.patch_size[0] != 1:
            raise ValueError(f"token_replace needs a temporal patch of 1, got patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_width_ratio)

    def replace(self, **changes) -> DiTConfig:
        return dataclasses.replace(self, **changes)


_T2V = DiTConfig()

DIT_PRESETS: dict[str, DiTConfig] = {
    # HYVideo-T/2-cfgdistill: the official T2V checkpoint (hunyuan-video-t2v-720p).
    "hunyuan-video-t2v": _T2V,
    # HunyuanVideo-I2V: HYVideo-T/2 with guidance_embed forced on by its scripts.
    "hunyuan-video-i2v": _T2V.replace(i2v_condition_type="token_replace"),
    # Seconds on a CPU: every code path of the full model at toy width.
    "tiny": DiTConfig(hidden_size=64, heads_num=4, mlp_width_ratio=4.0, mm_double_blocks_depth=2,
                      mm_single_blocks_depth=2, rope_dim_list=(4, 6, 6), text_states_dim=32,
                      text_states_dim_2=16),
}
DIT_PRESETS["tiny-i2v"] = DIT_PRESETS["tiny"].replace(i2v_condition_type="token_replace")


def dit_preset(name: str) -> DiTConfig:
    return _preset(DIT_PRESETS, name, "DiT")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Raw-video dataset rules: which frames and which pixels a clip contributes (hvfunc.data)."""

    num_frames: int = 93
    """Most frames per clip after fps resampling (93 = 4*23+1 -> 24 latent frames)."""
    min_frames: int = 29
    """Clips that yield fewer frames (after resampling and 4k+1 rounding) are skipped."""
    train_fps: float | None = 24.0
    """Resample every clip to this rate (source frames repeated or skipped); None keeps the source rate."""
    temporal_stride: int = 4
    """VAE time compression: frame counts are rounded down to stride*k+1."""
    cp: int = 1
    """Context-parallel degree: latent frame counts ((frames-1)/stride+1) are made divisible by it."""
    resize: Literal["dynamic", "fixed"] = "dynamic"
    """fixed: every clip becomes max_height x max_width (resize + centre crop); dynamic: keep the
    aspect, scale down to max_area, align to `stride` (upstream's force_resolution=false)."""
    max_height: int = 480
    """Output height in fixed mode."""
    max_width: int = 848
    """Output width in fixed mode."""
    max_area: int = 407040
    """Largest height*width in dynamic mode (480*848)."""
    min_area: int | None = None
    """Clips whose source height*width is below this are skipped; None: a quarter of the output area."""
    max_aspect: float = 2.0
    """Aspect limit: dynamic keeps h/w in [1/max_aspect, max_aspect]; fixed keeps h/w within a
    factor max_aspect of max_height/max_width."""
    stride: int = 16
    """Output height and width are multiples of this (VAE 8 x DiT patch 2 = 16)."""
    backend: Literal["auto", "decord", "pyav"] = "auto"
    """Video decoder; auto takes decord when it imports, else PyAV."""

    def __post_init__(self) -> None:
        if self.temporal_stride < 1 or self.cp < 1 or self.stride < 1:
            raise ValueError(f"temporal_stride ({self.temporal_stride}), cp ({self.cp}) and stride ({self.stride}) "
                             "must be >= 1")
        if not 1 <= self.min_frames <= self.num_frames:
            raise ValueError(f"need 1 <= min_frames ({self.min_frames}) <= num_frames ({self.num_frames})")
        if self.train_fps is not None and self.train_fps <= 0:
            raise ValueError(f"train_fps must be positive or None, got {self.train_fps}")
        if self.resize not in ("dynamic", "fixed"):
            raise ValueError(f"resize must be 'dynamic' or 'fixed', got {self.resize!r}")
        if self.resize == "fixed" and (self.max_height % self.stride or self.max_width % self.stride):
            raise ValueError(f"max_height x max_width {self.max_height}x{self.max_width} must be multiples of "
                             f"stride {self.stride}")
        if self.max_area < self.stride**2 or self.max_aspect < 1.0:
            raise ValueError(f"max_area ({self.max_area}) must hold one stride^2 tile and max_aspect "
                             f"({self.max_aspect}) must be >= 1")

    @property
    def out_area(self) -> int:
        return self.max_height * self.max_width if self.resize == "fixed" else self.max_area

    @property
    def min_source_area(self) -> int:
        return self.out_area // 4 if self.min_area is None else self.min_area

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)


DATA_PRESETS: dict[str, DataConfig] = {
    # MindSpeed-MM's HunyuanVideo T2V feature-extraction data config, stride 16 instead of 8 (see docs/data.md).
    "hunyuan-video-t2v": DataConfig(),
    # The synthetic dataset (hvfunc.data.synthetic) on a CPU: 17 frames, about 64x96 pixels.
    "tiny": DataConfig(num_frames=17, min_frames=9, max_height=64, max_width=96, max_area=64 * 96),
}


def data_preset(name: str) -> DataConfig:
    return _preset(DATA_PRESETS, name, "data")


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Architecture of the causal 3D VAE ("884-16c-hy", official class `AutoencoderKLCausal3D`).

    Field names are the official `vae/config.json` keys; hvfunc.vae.ckpt reads that file.
    """

    in_channels: int = 3
    """Video channels in (RGB)."""
    out_channels: int = 3
    """Video channels out."""
    latent_channels: int = 16
    """Latent channels (the encoder emits 2x: mean and logvar)."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """Widths of the encoder's down blocks (the decoder's up blocks use them reversed)."""
    layers_per_block: int = 2
    """ResNets per encoder down block; decoder up blocks hold one more."""
    norm_num_groups: int = 32
    """GroupNorm groups of every norm (eps 1e-6 throughout)."""
    act_fn: Literal["silu", "swish"] = "silu"
    """Activation ("swish" is the same function)."""
    sample_size: int = 256
    """Official default spatial tile in pixels (hvfunc.vae.Tiling's tile_sample_min_size)."""
    sample_tsize: int = 64
    """Official default temporal tile in frames (hvfunc.vae.Tiling's tile_sample_min_tsize)."""
    scaling_factor: float = 0.476986
    """Latents times this are what the DiT sees (no shift factor)."""
    time_compression_ratio: int = 4
    """Frames T -> (T - 1) / 4 + 1 latent frames; the official code supports only 4."""
    spatial_compression_ratio: int = 8
    """Pixels per latent along H and W (one stride-2 down block per factor of 2)."""
    mid_block_add_attention: bool = True
    """Single-head frame-causal self-attention between the two mid-block ResNets."""

    def __post_init__(self) -> None:
        n_space = self.spatial_compression_ratio.bit_length() - 1
        if self.time_compression_ratio != 4:
            raise ValueError(f"time_compression_ratio must be 4 (as upstream), got {self.time_compression_ratio}")
        if 1 << n_space != self.spatial_compression_ratio or n_space >= len(self.block_out_channels):
            raise ValueError(f"spatial_compression_ratio {self.spatial_compression_ratio} must be a power of 2 "
                             f"below 2**len(block_out_channels) = {2 ** len(self.block_out_channels)}")
        if len(self.block_out_channels) < 3:
            raise ValueError(f"block_out_channels {self.block_out_channels} needs >= 3 blocks for 4x time")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels "
                             f"entry {self.block_out_channels}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn must be 'silu' (or its alias 'swish'), got {self.act_fn!r}")

    def replace(self, **changes) -> VAEConfig:
        return dataclasses.replace(self, **changes)


VAE_PRESETS: dict[str, VAEConfig] = {
    # The official 884-16c-hy VAE of HunyuanVideo and HunyuanVideo-I2V (pytorch_model.pt + config.json).
    "hunyuan-video": VAEConfig(),
    # Seconds on a CPU, same 16 latent channels and 4x / 8x8 compression: pairs with the tiny DiT.
    "tiny": VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
    # The demo's trained VAE (parallel/vae_train.py): tiny, one GroupNorm group. A lone shape on a flat
    # background is the only variation a norm sees, so each group normalises its intensity away and
    # only ratios inside a group carry colour: with 2 channels a group the decoded shapes come out
    # one beige (600 steps: 24.5 dB, colour off by 47-72 of 255), with one group they keep their colour
    # (26.2 dB, 33-43).
    "demo": VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=1),
}


def vae_preset(name: str) -> VAEConfig:
    return _preset(VAE_PRESETS, name, "VAE")
