"""Rectified flow as HunyuanVideo trains and samples it.

Path: x_s = (1 - s) x0 + s noise, s in [0, 1]; the model predicts the velocity
noise - x0 and is fed t = s * 1000. Timesteps for training are logit-normal
(sigmoid of N(mean, std)), optionally shifted like the sampler's schedule,
s' = shift s / (1 + (shift - 1) s). Loss is fp32 MSE; for I2V token_replace the clean
latent frame 0 is excluded. RNG is always an explicit generator.
Shapes: B batch, C channels, T latent frames, H, W latent height/width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from hvfunc import dit
from hvfunc.attention import AttnFn, sdpa
from hvfunc.config import DiTConfig
from hvfunc.params import Params


def shift_sigmas(s: Tensor, shift: float) -> Tensor:
    """SD3-style shift used by the official scheduler (shift 1 is the identity)."""
    return s if shift == 1.0 else shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True, kw_only=True)
class TimestepSampling:
    """Distribution of training sigmas."""

    mode: str = "logit_normal"
    """"logit_normal" (sigmoid of a normal draw) or "uniform"."""
    mean: float = 0.0
    """Mean of the normal before the sigmoid."""
    std: float = 1.0
    """Std of the normal before the sigmoid."""
    shift: float = 1.0
    """Schedule shift applied after drawing (T2V recipe 1.0 = none; I2V recipe 7.0)."""

    def __post_init__(self) -> None:
        if self.mode not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep mode must be 'logit_normal' or 'uniform', got {self.mode!r}")
        if self.std <= 0 or self.shift <= 0:
            raise ValueError(f"std and shift must be positive, got std={self.std}, shift={self.shift}")


def sample_sigmas(n: int, how: TimestepSampling, *, generator: torch.Generator) -> Tensor:
    """n training sigmas in (0, 1), fp32 (drawn on the generator's device)."""
    dev = generator.device
    if how.mode == "uniform":
        s = torch.rand(n, generator=generator, device=dev)
    else:
        s = torch.sigmoid(torch.randn(n, generator=generator, device=dev) * how.std + how.mean)
    return shift_sigmas(s, how.shift)


def noised(x0: Tensor, noise: Tensor, sigma_B: Tensor) -> tuple[Tensor, Tensor]:
    """(x_s, target velocity) for latents x0 [B, C, T, H, W] and per-sample sigmas [B]."""
    s = sigma_B.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def replace_first_frame(x: Tensor, cond_BC1HW: Tensor) -> Tensor:
    """I2V token_replace: latent frame 0 is the clean image latent."""
    return torch.cat([cond_BC1HW.to(x.dtype), x[:, :, 1:]], dim=2)


def token_loss(params: Params, batch: dict, sigma_B: Tensor, noise: Tensor, *, cfg: DiTConfig,
               guidance: Tensor | None, attn: AttnFn = sdpa, block_attn: AttnFn | None = None,
               tokens: tuple[int, int] | None = None, tp: dit.TPHooks = dit.NO_TP,
               blocks: dit.Blocks = dit.Blocks()) -> tuple[Tensor, int]:
    """Flow-matching loss terms of one batch at the token level: (sum of squares, count).

    batch: latents [B, C, T, H, W], text_states, text_mask, text_states_2, and for I2V
    cond_latents [B, C, 1, H, W]. `tokens` restricts to a slice of video tokens (context
    parallelism; `block_attn` then is the cp attention, `attn` serves the text refiner).
    Squared errors cover the same elements as upstream's mean (I2V: frame 0 excluded).
    """
    x0 = batch["latents"].float()
    x_s, target = noised(x0, noise.float(), sigma_B)
    i2v = cfg.i2v_condition_type == "token_replace"
    if i2v:
        x_s = replace_first_frame(x_s, batch["cond_latents"])
    e = dit.embed(params, x_s, sigma_B * 1000, batch["text_states"], batch["text_mask"], batch["text_states_2"],
                  cfg=cfg, guidance=guidance, attn=attn, tokens=tokens, text_multiple=tp.sp[1] if tp.sp else 1)
    start, end = tokens or (0, e.img.shape[1])
    if tp.sp:  # sequence parallel: this rank keeps its share of the slice's video tokens
        r, n = tp.sp
        step = (end - start) // n
        first = min(max(e.first - r * step, 0), step)
        e = dataclasses.replace(e, img=tp.split(e.img), first=first)
        start, end = start + r * step, start + (r + 1) * step
    img = dit.run_blocks(params, e, cfg=cfg, attn=block_attn or attn, tp=tp, blocks=blocks)
    pred = dit.final_layer(params, img, tp.cond(e.vec))
    tgt = dit.patchify(target, cfg.patch_size)[:, start:end]
    if i2v:  # drop this slice's tokens of latent frame 0
        skip = min(max(e.grid[1] * e.grid[2] - start, 0), end - start)
        pred, tgt = pred[:, skip:], tgt[:, skip:]
    d = pred.float() - tgt.float()
    return d.square().sum(), d.numel()
