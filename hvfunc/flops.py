"""Analytic FLOP count of a DiT forward (for MFU in training logs; benchmarks count them instead).

Matmuls: 2 * (in * out) per token per linear; attention: 4 * L_q * L_kv * D per block
(QK^T and PV). Per-sample work (modulation, embedders) is negligible and left out.
A training step (forward + backward) is 3x the forward.
"""

from __future__ import annotations

import math

from hvfunc.config import DiTConfig


def forward_flops(cfg: DiTConfig, *, batch: int, video_tokens: int, text_tokens: int) -> float:
    D, M = cfg.hidden_size, cfg.mlp_hidden
    Mr = int(D * cfg.text_refiner_mlp_ratio)
    stream = 3 * D * D + D * D + 2 * D * M  # qkv, proj, fc1, fc2 of one double-block stream
    single = (3 * D + M) * D + (D + M) * D  # linear1, linear2
    refiner = cfg.text_refiner_depth * (4 * D * D + 2 * D * Mr) + cfg.text_states_dim * D
    n = video_tokens + text_tokens
    per_token = (cfg.mm_double_blocks_depth * stream * (video_tokens + text_tokens)
                 + cfg.mm_single_blocks_depth * single * n + refiner * text_tokens
                 + (cfg.in_channels + cfg.out_channels) * math.prod(cfg.patch_size) * D * video_tokens)
    attn = 4 * D * ((cfg.mm_double_blocks_depth + cfg.mm_single_blocks_depth) * n * n
                    + cfg.text_refiner_depth * text_tokens ** 2)
    return float(batch) * (2 * per_token + attn)
