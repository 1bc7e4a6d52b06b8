"""One-process training of a (tiny) causal VAE on raw clips, written in the official VAE layout.

The demo's VAE: the pure VAE functions (hvfunc.vae encode / sample / decode) trained with
AdamW (parallel.optim) over the param dict's leaves, on clips loaded by the real dataset
code (hvfunc.data.dataset, the extraction's frame and size rules), then written as
`<out>/vae/pytorch_model.pt` + `config.json` (hvfunc.vae.ckpt.save_vae) for extraction and
sampling. Samples are whole clips (optionally random temporal + spatial crops: conv cost is per
voxel) or, for `image_fraction` of the steps, single frames (the causal
VAE encodes frame 0 alone, as for the I2V reference frame; GroupNorm statistics span the
whole clip, so a lone frame is not the same input as a clip's first frame).
Init (`train_init`): torch's default init, then two changes that decide whether a short run
learns at all. (1) Every k3 causal conv starts "inflated": its two past-frame taps zero, the
current-frame tap x sqrt(3) (same activation scale). With the default init the replicate
padding makes frame 0 dominate every latent frame (measured at init: replacing frame 0 moves
all 5 latent frames of a 17-frame clip by 0.17, replacing frame 16 moves its own by 0.001), so
the decoder learns the clip's time average and stays at the plain-background PSNR; inflated,
latent frame j starts as an encoding of frame 4j and the past taps learn the motion.
(2) The posterior's logvar half of quant_conv starts at weight 0, bias -10 (std 0.7%): with
the default logvar ~0 the reparameterised noise (std 1) drowns the latents; with kl_weight 0
nothing raises it, so extraction's posterior samples are the mean. The saved config's
scaling_factor is 1 / std of the posterior means over the dataset: the DiT sees unit variance.
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
    lr: float = 1e-3
    """Peak AdamW learning rate (short linear warm-up, cosine decay to a tenth)."""
    batch_size: int = 2
    frames: int | None = None
    """Frames of a clip sample (4k+1), a random window of the loaded clip; None: the whole clip as
    extraction loads it. Train on the length the VAE will code: a VAE trained on 9 frames drifts
    towards grey on frames 9-16 of a 17-frame clip (frame-causal attention and GroupNorm span all frames)."""
    crop: int | None = None
    """Square random crop in pixels (a multiple of 8, at most every bucket's side); None: whole frames."""
    image_fraction: float = 0.25
    """Fraction of the steps that train on single frames (4 * batch_size of them)."""
    kl_weight: float = 0.0
    """Weight of the mean KL per latent element against the mean squared error per pixel (0: a plain
    autoencoder with a fixed small posterior std, see the module docstring)."""
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
    of their first frames encoded alone, of a flat picture (each clip's mean colour: what a VAE that draws
    no shapes reaches), and the std of the scaled posterior samples (what the DiT sees)."""
    se, n, se0, n0, flat, lat = 0.0, 0, 0.0, 0, 0.0, []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for i in range(len(ds)):
        x = ds[i]["video"][None].to(device)
        mean, logvar = vae.encode(p, x, cfg=cfg)
        se += float((vae.decode(p, vae.mode(mean, logvar), cfg=cfg) - x).square().sum())
        n += x.numel()
        flat += float((x - x.mean((2, 3, 4), keepdim=True)).square().sum())
        lat.append(vae.scale_latents(vae.sample(mean.cpu(), logvar.cpu(), generator=g), cfg=cfg).flatten())
        m0, _ = vae.encode(p, x[:, :, :1], cfg=cfg)
        se0 += float((vae.decode(p, m0, cfg=cfg) - x[:, :, :1]).square().sum())
        n0 += x[:, :, :1].numel()
    psnr = lambda s, k: 10 * math.log10(4.0 / max(s / k, 1e-12))
    return {"psnr": psnr(se, n), "psnr_frame0": psnr(se0, n0), "psnr_flat": psnr(flat, n),
            "latent_std": float(torch.cat(lat).std())}


def train_init(vcfg: VAEConfig, seed: int, device: torch.device) -> hp.Params:
    """The spec's init with inflated causal convs and a small fixed posterior logvar (module docstring)."""
    p = hp.init(vae.vae_spec(vcfg), generator=torch.Generator().manual_seed(seed), device=device)
    for k, w in p.items():
        if k.endswith(".conv.weight") and w.ndim == 5 and w.shape[2] == 3:  # [Co, Ci, kt, kh, kw], causal k3
            w[:, :, :2] = 0
            w[:, :, 2] *= math.sqrt(3)
    L = vcfg.latent_channels
    p["quant_conv.weight"][L:] = 0
    p["quant_conv.bias"][L:] = -10.0
    return p


@torch.no_grad()
def unit_scale(p: hp.Params, ds: VideoDataset, cfg: VAEConfig, device: torch.device) -> float:
    """1 / std of the posterior means of every clip: the scaling_factor that gives the DiT unit variance."""
    means = [vae.encode(p, ds[i]["video"][None].to(device), cfg=cfg)[0].flatten().cpu() for i in range(len(ds))]
    return 1.0 / float(torch.cat(means).std())


def train_vae(cfg: VAETrainConfig) -> Path:
    """Train, log metrics.jsonl, write <out>/vae in the official layout; returns that folder."""
    device, vcfg = runtime.pick_device(cfg.device), vae_preset(cfg.preset)
    ds = build_dataset(cfg.data, data_preset(cfg.data_preset), seed=cfg.seed)
    clips = _Clips(ds, cfg)
    p = train_init(vcfg, cfg.seed, device)
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
    vcfg = vcfg.replace(scaling_factor=round(unit_scale(p, ds, vcfg, device), 6))
    after = evaluate(p, ds, vcfg, device, cfg.seed)
    print(f"after {cfg.steps} steps: PSNR {after['psnr']:.2f} dB (frame 0 alone {after['psnr_frame0']:.2f} dB), "
          f"scaled latent std {after['latent_std']:.3f} (scaling_factor {vcfg.scaling_factor})", flush=True)
    io.write_atomic(cfg.out / "eval.json", json.dumps({"before": before, "after": after}, indent=1).encode())
    return save_vae({k: v.cpu() for k, v in p.items()}, vcfg, cfg.out / "vae")
