"""Independent references for parity tests: diffusers' HunyuanVideo modules built from our configs."""

from __future__ import annotations

import torch

from hvfunc.config import DiTConfig


def diffusers_dit(cfg: DiTConfig):
    """diffusers' HunyuanVideoTransformer3DModel with the same architecture as `cfg` (random weights)."""
    from diffusers import HunyuanVideoTransformer3DModel

    pt, ph, pw = cfg.patch_size
    assert ph == pw, "diffusers has one spatial patch size"
    assert cfg.text_refiner_mlp_ratio == 4.0, "diffusers' refiner MLP ratio is fixed at 4"
    return HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num,
        attention_head_dim=cfg.head_dim, num_layers=cfg.mm_double_blocks_depth,
        num_single_layers=cfg.mm_single_blocks_depth, num_refiner_layers=cfg.text_refiner_depth,
        mlp_ratio=cfg.mlp_width_ratio, patch_size=ph, patch_size_t=pt, qk_norm="rms_norm",
        guidance_embeds=cfg.guidance_embed, text_embed_dim=cfg.text_states_dim,
        pooled_projection_dim=cfg.text_states_dim_2, rope_theta=cfg.rope_theta,
        rope_axes_dim=tuple(cfg.rope_dim_list), image_condition_type=cfg.i2v_condition_type,
    ).eval()


def diffusers_inputs(x, t, text_states, text_mask, text_states_2, guidance=None) -> dict:
    kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=text_states, encoder_attention_mask=text_mask,
              pooled_projections=text_states_2, return_dict=False)
    if guidance is not None:
        kw["guidance"] = guidance
    return kw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's scale (max |b|)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
