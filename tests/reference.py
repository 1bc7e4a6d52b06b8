"""Independent references for parity tests: diffusers' HunyuanVideo modules built from our configs."""

from __future__ import annotations

import torch

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
