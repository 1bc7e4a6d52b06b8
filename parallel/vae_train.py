"""One-process training of a (tiny) causal VAE on raw clips, written in the official VAE layout.

The demo's VAE: the pure VAE functions (hvfunc.vae encode / sample / decode) trained with
AdamW (parallel.optim) over the param dict's leaves, on clips loaded by the real dataset
code (hvfunc.data.dataset, the extraction's frame and size rules), then written as
`<out>/vae/pytorch_model.pt` + `config.json` (hvfunc.vae.ckpt.save_vae) for extraction and
sampling. Samples are random temporal + spatial crops of the clips (conv cost is per voxel,
and the shapes are local) or, for `image_fraction` of the steps, single frames (the causal
VAE encodes frame 0 alone, as for the I2V reference frame; GroupNorm statistics span the
whole clip, so a lone frame is not the same input as a clip's first frame).
Loss: mean (x - x')^2 over pixels in [-1, 1] + kl_weight * mean KL(posterior || N(0, 1)) per
latent element (MSE, not L1: L1's optimum under uncertainty is the median pixel, the
background, and a short run then never draws the shapes). Shapes: B batch, T frames, H x W pixels, L = 16 latent channels.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hvfunc import io, vae
from hvfunc import params as hp
from hvfunc.config import VAEConfig, data_preset, vae_preset
from hvfunc.data.buckets import mix_seed
from hvfunc.data.dataset import VideoDataset, build_dataset
from hvfunc.vae.ckpt import save_vae
from parallel import optim, runtime

_DRAWS = 4  # temporal crops decoded per clip, cached: a clip is decoded at most this many times


@dataclass(frozen=True, kw_only=True)
class VAETrainConfig:
    """A short VAE training run (scripts/train_vae.py)."""

    data: Path
    """data.txt listing `<folder>,<data.json>` lines."""
    out: Path
    """Run folder: vae/ (pytorch_model.pt + config.json) and metrics.jsonl."""
    preset: str = "tiny"
    """VAE architecture (hvfunc.config.VAE_PRESETS)."""
    data_preset: str = "tiny"
    """Frame and size rules of the clips (hvfunc.config.DATA_PRESETS), as extraction uses them."""
    steps: int = 300
    lr: float = 2e-3
    """Peak AdamW learning rate (short linear warm-up, cosine decay to a tenth)."""
    batch_size: int = 2
    frames: int | None = None
    """Frames of a clip sample (4k+1), a random window of the loaded clip; None: the whole clip as
    extraction loads it. Train on the length the VAE will code: a VAE trained on 9 frames drifts
    towards grey on frames 9-16 of a 17-frame clip (frame-causal attention and GroupNorm span all frames)."""
    crop: int | None = 32
    """Square random crop in pixels (a multiple of 8, at most every bucket's side); None: whole frames."""
    image_fraction: float = 0.25
    """Fraction of the steps that train on single frames (4 * batch_size of them)."""
    kl_weight: float = 1e-4
    """Weight of the mean KL per latent element against the mean squared error per pixel."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.kl_weight < 0:
            raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0, kl_weight >= 0; got {self.steps}, "
                             f"{self.batch_size}, {self.lr}, {self.kl_weight}")
        if self.frames is not None and (self.frames < 1 or (self.frames - 1) % 4):
            raise ValueError(f"frames must be 4k+1, got {self.frames}")
        if self.crop is not None and (self.crop < 8 or self.crop % 8):
            raise ValueError(f"crop must be a positive multiple of 8 (or None), got {self.crop}")
        if not 0 <= self.image_fraction <= 1:
            raise ValueError(f"image_fraction must be in [0, 1], got {self.image_fraction}")


class _Clips:
    """Random training batches [B, 3, T, h, w] from a dataset, decoded clips cached per (clip, draw)."""

    def __init__(self, ds: VideoDataset, cfg: VAETrainConfig):
        small = [(k, min(k[1:])) for k in ds.buckets if cfg.crop is not None and min(k[1:]) < cfg.crop]
        if small:
            raise ValueError(f"--crop {cfg.crop} is larger than bucket (frames, height, width) {small[0][0]}")
        long = [k for k in ds.buckets if cfg.frames is not None and k[0] < cfg.frames]
        if long:
            raise ValueError(f"--frames {cfg.frames} is more than bucket (frames, height, width) {long[0]} holds")
        self.ds, self.cfg, self.cache = ds, cfg, {}
        self.g = torch.Generator().manual_seed(cfg.seed)

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.g))

    def _clip(self, i: int) -> Tensor:
        key = (i, self._randint(_DRAWS))
        if key not in self.cache:
            self.cache[key] = self.ds.load(i, mix_seed(mix_seed(self.cfg.seed, i), key[1]))["video"]
        return self.cache[key]

    def batch(self, frames: int | None, n: int) -> Tensor:
        key = self.ds.keys[self._randint(len(self.ds))]  # (T, H, W): a batch stacks one shape
        pool = [j for j, k in enumerate(self.ds.keys)
                if (k == key if self.cfg.crop is None else frames is not None or k[0] == key[0])]
        out = []
        for _ in range(n):
            v = self._clip(pool[self._randint(len(pool))])  # [3, T, H, W]
            T, H, W = v.shape[1:]
            f = frames or T
            h, w = (H, W) if self.cfg.crop is None else (self.cfg.crop, self.cfg.crop)
            t0, y0, x0 = self._randint(T - f + 1), self._randint(H - h + 1), self._randint(W - w + 1)
            out.append(v[:, t0:t0 + f, y0:y0 + h, x0:x0 + w])
        return torch.stack(out)


def vae_loss(p: hp.Params, x: Tensor, *, cfg: VAEConfig, kl_weight: float,
             generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, reconstruction MSE, KL) of video x [B, 3, T, H, W] in [-1, 1]: posterior sample
    (reparameterised), decoded; KL(N(mean, exp(logvar)) || N(0, 1)) averaged over latent elements."""
    mean, logvar = vae.encode(p, x, cfg=cfg)
    recon = (vae.decode(p, vae.sample(mean, logvar, generator=generator), cfg=cfg) - x).square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    return recon + kl_weight * kl, recon, kl


@torch.no_grad()
def evaluate(p: hp.Params, ds: VideoDataset, cfg: VAEConfig, device: torch.device, seed: int) -> dict:
    """Reconstruction PSNR (dB, pixels in [-1, 1], posterior mode) of every clip as extraction loads it,
    of their first frames encoded alone, and the std of the scaled posterior samples (what the DiT sees)."""
    se, n, se0, n0, lat = 0.0, 0, 0.0, 0, []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for i in range(len(ds)):
        x = ds[i]["video"][None].to(device)
        mean, logvar = vae.encode(p, x, cfg=cfg)
        se += float((vae.decode(p, vae.mode(mean, logvar), cfg=cfg) - x).square().sum())
        n += x.numel()
        lat.append(vae.scale_latents(vae.sample(mean.cpu(), logvar.cpu(), generator=g), cfg=cfg).flatten())
        m0, _ = vae.encode(p, x[:, :, :1], cfg=cfg)
        se0 += float((vae.decode(p, m0, cfg=cfg) - x[:, :, :1]).square().sum())
        n0 += x[:, :, :1].numel()
    psnr = lambda s, k: 10 * math.log10(4.0 / max(s / k, 1e-12))
    return {"psnr": psnr(se, n), "psnr_frame0": psnr(se0, n0), "latent_std": float(torch.cat(lat).std())}


def train_vae(cfg: VAETrainConfig) -> Path:
    """Train, log metrics.jsonl, write <out>/vae in the official layout; returns that folder."""
    device, vcfg = runtime.pick_device(cfg.device), vae_preset(cfg.preset)
    ds = build_dataset(cfg.data, data_preset(cfg.data_preset), seed=cfg.seed)
    clips = _Clips(ds, cfg)
    p = hp.init(vae.vae_spec(vcfg), generator=torch.Generator().manual_seed(cfg.seed), device=device)
    before = evaluate(p, ds, vcfg, device, cfg.seed)
    print(f"before: PSNR {before['psnr']:.2f} dB (frame 0 alone {before['psnr_frame0']:.2f} dB), "
          f"scaled latent std {before['latent_std']:.3f}", flush=True)
    p = {k: v.requires_grad_() for k, v in p.items()}
    oc = optim.OptimConfig(lr=cfg.lr, warmup_steps=max(1, cfg.steps // 20), schedule="cosine",
                           total_steps=cfg.steps, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0)
    opt, g = optim.make_optimizer(p, oc), torch.Generator(device=device).manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    bar = runtime.progress(cfg.steps, desc="vae", unit="step", enabled=cfg.progress)
    with (cfg.out / "metrics.jsonl").open("w") as metrics:
        for s in range(cfg.steps):
            t0 = time.perf_counter()
            image = float(torch.rand((), generator=clips.g)) < cfg.image_fraction
            x = clips.batch(1, 4 * cfg.batch_size) if image else clips.batch(cfg.frames, cfg.batch_size)
            x = x.to(device)
            loss, recon, kl = vae_loss(p, x, cfg=vcfg, kl_weight=cfg.kl_weight, generator=g)
            optim.set_lr(opt, oc.lr_at(s))
            loss.backward()
            norm = optim.clip_(p, oc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = {"step": s, "loss": loss.item(), "recon_mse": recon.item(), "kl": kl.item(), "grad_norm": norm,
                   "lr": oc.lr_at(s), "frames": x.shape[2], "seconds": time.perf_counter() - t0}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            bar.update()
    bar.close()
    p = {k: v.detach() for k, v in p.items()}
    after = evaluate(p, ds, vcfg, device, cfg.seed)
    print(f"after {cfg.steps} steps: PSNR {after['psnr']:.2f} dB (frame 0 alone {after['psnr_frame0']:.2f} dB), "
          f"scaled latent std {after['latent_std']:.3f}", flush=True)
    io.write_atomic(cfg.out / "eval.json", json.dumps({"before": before, "after": after}, indent=1).encode())
    return save_vae({k: v.cpu() for k, v in p.items()}, vcfg, cfg.out / "vae")
