"""Shared test helpers: seeded inputs and random (non-degenerate) params for any DiT config."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from hvfunc.config import DiTConfig  # noqa: E402
from hvfunc.dit_spec import dit_spec  # noqa: E402
from hvfunc.params import Params  # noqa: E402


def random_params(cfg: DiTConfig, seed: int = 0, scale: float = 0.2, dtype=torch.float32) -> Params:
    """Every leaf N(0, scale): zero-initialised modulation would hide bugs behind zeros."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s.shape, generator=g) * scale).to(dtype) for k, s in dit_spec(cfg).items()}


def dit_inputs(cfg: DiTConfig, *, B: int = 2, T: int = 3, H: int = 8, W: int = 6, S: int = 12,
               lens: tuple[int, ...] = (5, 9), seed: int = 1, guidance: bool | None = None) -> dict:
    """Keyword inputs of hvfunc.dit.forward: batch B, text lengths `lens` (right-padded to S)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    use_g = cfg.guidance_embed if guidance is None else guidance
    return dict(x=torch.randn(B, cfg.in_channels, T, H, W, generator=g),
                t=torch.rand(B, generator=g) * 1000,
                text_states=torch.randn(B, S, cfg.text_states_dim, generator=g),
                text_mask=mask,
                text_states_2=torch.randn(B, cfg.text_states_dim_2, generator=g),
                guidance=(torch.rand(B, generator=g) * 8000 + 1000) if use_g else None)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def random_vae_params(cfg, seed: int = 0, gain: float = 1.5, dtype=torch.float32) -> Params:
    """VAE weights N(0, gain^2 / fan_in) (activations stay O(1), so fp32 rounding is not blown up
    by tiny signals), norm affines and biases perturbed away from 1 / 0."""
    from hvfunc.vae import vae_spec

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in vae_spec(cfg).items():
        noise = torch.randn(s.shape, generator=g)
        if len(s.shape) > 1:
            out[k] = noise * gain / math.sqrt(math.prod(s.shape[1:]))
        else:
            out[k] = (1.0 if "norm" in k and k.endswith("weight") else 0.0) + 0.2 * noise
        out[k] = out[k].to(dtype)
    return out
