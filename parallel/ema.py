"""Exponential moving average of the trainable leaves: config, creation, update.

The EMA is a dict of fp32 DTensors, one per trainable leaf, with that leaf's mesh and
placements (a detached clone), so it costs one more sharded copy of the trainable
weights per rank and no collective. After every optimizer step that was taken,
ema = decay * ema + (1 - decay) * param, leaf by leaf on the local shards. Checkpoints
store it next to the params (DCP key "ema": resumable, reshardable); `convert.py export
--ema` writes it (official .pt: the `ema` key next to `module`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hvfunc.params import Params


@dataclass(frozen=True, kw_only=True)
class EMAConfig:
    """EMA of the trained weights (0: off)."""

    decay: float = 0.0
    """Weight of the old average per optimizer step, in [0, 1); 0 keeps no EMA. The average spans about
    1 / (1 - decay) steps (0.99: the last ~100), so a short run wants a smaller decay."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"--ema.decay must be in [0, 1) (0 = off), got {self.decay}")

    @property
    def enabled(self) -> bool:
        return self.decay > 0


def init(params: Params, cfg: EMAConfig) -> Params | None:
    """The EMA's starting value: a copy of the trainable leaves (same placements), None when off."""
    if not cfg.enabled:
        return None
    return {k: p.detach().clone() for k, p in params.items() if p.requires_grad}


@torch.no_grad()
def update_(ema: Params, params: Params, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param, in place on each rank's shards."""
    for k, e in ema.items():
        e.mul_(decay).add_(params[k].detach(), alpha=1.0 - decay)
