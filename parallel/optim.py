"""AdamW over the named param tree, LR schedules, and gradient clipping over DTensor leaves.

Gradient norm: each leaf's local shard contributes its sum of squares divided by how
many ranks hold that same shard (the product of its Replicate mesh dims); one all-reduce
over the world then gives the exact global norm, whatever mix of placements the leaves have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from hvfunc.params import Params


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (scripts/train.py's presets set the recipes' values)."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Warm-up steps from warmup_start_lr to lr (shape: warmup_shape)."""
    warmup_start_lr: float = 1e-6
    warmup_shape: Literal["linear", "log"] = "linear"
    """Warm-up fraction at step s (0-based): (s + 1) / warmup_steps, or log(s + 1) / log(warmup_steps),
    the default shape of DeepSpeed's WarmupLR (upstream's I2V LoRA run): it starts at warmup_start_lr."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant, or cosine decay to min_lr_ratio * lr at total_steps."""
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Global gradient-norm clip (<= 0 disables)."""

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            w = self.warmup_steps
            frac = (step + 1) / w if self.warmup_shape == "linear" or w == 1 else math.log(step + 1) / math.log(w)
            return self.warmup_start_lr + (self.lr - self.warmup_start_lr) * frac
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(params: Params, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over named leaves (its state_dict keeps the names, so checkpoints are keyed)."""
    trainable = [(k, v) for k, v in params.items() if v.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters (nothing has requires_grad=True)")
    return torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             foreach=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def grad_norm(params: Params) -> Tensor:
    """Global L2 norm of all gradients (fp32), exact for any mix of DTensor placements."""
    total: Tensor | float = 0.0
    world_sum = False
    for v in params.values():
        g = v.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            reps = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if isinstance(p, Replicate))
            total = total + g.to_local().float().square().sum() / reps
            world_sum = True
        else:
            total = total + g.float().square().sum()
    if not isinstance(total, Tensor):
        return torch.zeros(())
    if world_sum and dist.is_initialized():
        dist.all_reduce(total)  # on the gradients' device: nccl reduces device tensors only
    return total.sqrt()


def clip_(params: Params, max_norm: float) -> float:
    """Scale gradients so their global norm is at most max_norm; returns the norm before."""
    norm = grad_norm(params)
    if max_norm > 0 and math.isfinite(float(norm)):
        scale = min(1.0, max_norm / (float(norm) + 1e-6))
        for v in params.values():
            if v.grad is not None and scale < 1.0:
                v.grad.mul_(scale)
    return float(norm)
