"""Latent-space sampling: the official Euler flow-matching sampler with CFG and I2V token_replace.

Schedule (official FlowMatchDiscreteScheduler with --flow-reverse): sigmas =
linspace(1, 0, N + 1) in fp32, shifted s' = shift s / (1 + (shift - 1) s); the DiT sees
t = sigma_i * 1000 as floats and predicts v = noise - data; one Euler step is
x <- x + v (sigma_{i+1} - sigma_i) in fp32 (latents stay fp32 between steps).
Embedded guidance is scale * 1000 in the params' dtype (upstream casts 6.0 to the DiT
dtype before multiplying: in bf16 that is 6016). Real CFG (cfg_scale > 1) batches
[uncond | cond] in one forward and mixes u + s (c - u), optionally rescaled
(guidance_rescale, applied to the velocity as upstream does). I2V token_replace: latent
frame 0 is the clean image latent before every forward and after every step; only frames
1.. are stepped. Initial I2V latents with `i2v_stability`: 0.999 noise + 0.001 image
latent (repeated over frames), else pure noise.

A step (embedding, blocks, final layer, CFG, Euler) has fixed shapes and no host sync
(text lengths are read once per run), so graphs/ can compile the blocks and capture the
whole step in a CUDA graph without a second model code path. The opt-in step cache
(hvfunc.cache: teacache, fbcache) decides on the host each step, so it runs outside one.
Shapes: B batch, C latent channels, T/H/W latent frames/height/width, S text tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hvfunc import dit
from hvfunc.attention import AttnFn, sdpa
from hvfunc.cache import CacheState, CacheStats, Reduce, StepCache
from hvfunc.config import DiTConfig, VAEConfig
from hvfunc.flow import replace_first_frame, shift_sigmas
from hvfunc.params import Params
from hvfunc.vae import check_video_shape

Cond = dict[str, Tensor]  # text_states [B, S, Dt], text_mask [B, S] (right-padded), text_states_2 [B, D2]
COND_KEYS = ("text_states", "text_mask", "text_states_2")
STABILITY_T = 0.999  # upstream's i2v_stability mix: latents = t noise + (1 - t) image


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampler settings (defaults: the official T2V recipe)."""

    steps: int = 50
    """Euler steps."""
    shift: float = 7.0
    """Schedule shift (T2V 7; I2V 7 with i2v_stability, 17 without: official README)."""
    guidance: float | None = 6.0
    """Embedded (distilled) guidance scale, fed as scale * 1000; None for a model without guidance_in."""
    cfg_scale: float = 1.0
    """Real classifier-free guidance; > 1 needs negative conditioning and doubles the batch."""
    guidance_rescale: float = 0.0
    """CFG rescale phi (Lin et al. 2023, sec. 3.4) on the velocity; used only with cfg_scale > 1."""
    i2v_stability: bool = True
    """I2V start 0.999 noise + 0.001 image latent (official predict() default, diffusers, MindSpeed-MM);
    False: pure noise (official CLI without --i2v-stability)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.cfg_scale < 1 or not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"need cfg_scale >= 1 and 0 <= guidance_rescale <= 1, got cfg_scale={self.cfg_scale}, "
                             f"guidance_rescale={self.guidance_rescale}")

    @property
    def real_cfg(self) -> bool:
        return self.cfg_scale > 1


SAMPLING_PRESETS: dict[str, Sampling] = {
    "t2v": Sampling(),
    "i2v": Sampling(shift=7.0, i2v_stability=True),  # README's "stable" recipe
    "i2v-dynamic": Sampling(shift=17.0, i2v_stability=False),  # README's "dynamic" recipe, official CLI default
}


def sigmas(steps: int, shift: float, *, device: torch.device | str | None = None) -> Tensor:
    """[steps + 1] fp32 shifted sigmas from 1 down to 0 (the last one is exactly 0)."""
    return shift_sigmas(torch.linspace(1, 0, steps + 1, dtype=torch.float32), shift).to(device)


def initial_noise(batch: int, frames: int, height: int, width: int, *, generator: torch.Generator,
                  device: torch.device | str | None = None, channels: int = 16, vae: VAEConfig = VAEConfig()) -> Tensor:
    """Initial noise [B, C, (frames - 1) / 4 + 1, height / 8, width / 8] fp32 for a video of that size
    (frames 4k+1, sizes multiples of 16), drawn on the generator's device then moved (as diffusers'
    randn_tensor, so a CPU generator gives the same noise on any device)."""
    check_video_shape(frames, height, width, cfg=vae, size_multiple=2 * vae.spatial_compression_ratio)
    r, s = vae.time_compression_ratio, vae.spatial_compression_ratio
    shape = (batch, channels, (frames - 1) // r + 1, height // s, width // s)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def initial_latents(noise: Tensor, image_latents: Tensor | None = None, *, stability: bool = True) -> Tensor:
    """fp32 start latents: the noise, or for I2V with stability 0.999 noise + 0.001 image latent."""
    x = noise.float()
    if image_latents is None or not stability:
        return x
    t = torch.tensor([STABILITY_T], device=x.device)  # fp32, so 1 - t rounds as upstream's
    return x * t + image_latents.float().expand_as(x) * (1 - t)


def euler(x: Tensor, v: Tensor, dt: Tensor, image_latents: Tensor | None = None) -> Tensor:
    """x + v dt in fp32; I2V steps frames 1.. only and frame 0 stays the clean image latent."""
    if image_latents is None:
        return x.float() + v.float() * dt
    return torch.cat([image_latents.float(), x[:, :, 1:].float() + v[:, :, 1:].float() * dt], dim=2)


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """u + scale (c - u); with rescale phi mix in the result rescaled to the per-sample std of c
    (unbiased std over all non-batch dims, as upstream's rescale_noise_cfg)."""
    out = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = list(range(1, cond.dim()))
        rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        out = rescale * rescaled + (1 - rescale) * out
    return out


StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x fp32 [B, C, T, H, W], t [] = sigma * 1000, dt []) -> x


def _check(noise: Tensor, cond: Cond, uncond: Cond | None, image_latents: Tensor | None, *,
           cfg: DiTConfig, sampling: Sampling) -> None:
    if sampling.real_cfg and uncond is None:
        raise ValueError(f"cfg_scale {sampling.cfg_scale} > 1 needs negative conditioning (uncond); got None")
    if noise.dim() != 5 or noise.shape[1] != cfg.in_channels:
        raise ValueError(f"noise must be [B, {cfg.in_channels}, T, H, W], got {tuple(noise.shape)}")
    B = noise.shape[0]
    for what, c in {"cond": cond, **({"uncond": uncond} if sampling.real_cfg else {})}.items():
        missing = [k for k in COND_KEYS if k not in c]
        if missing:
            raise ValueError(f"{what} lacks {missing}; it needs {list(COND_KEYS)}")
        if any(c[k].shape[0] != B for k in COND_KEYS):
            raise ValueError(f"{what} batch sizes {[tuple(c[k].shape) for k in COND_KEYS]} differ from noise's {B}")
    i2v = cfg.i2v_condition_type == "token_replace"
    if i2v and image_latents is None:
        raise ValueError("this I2V (token_replace) model needs image_latents [B, C, 1, H, W]")
    if not i2v and image_latents is not None:
        raise ValueError("image_latents were given but this model is T2V (i2v_condition_type=None)")
    if i2v and tuple(image_latents.shape) != (B, noise.shape[1], 1, *noise.shape[3:]):
        raise ValueError(f"image_latents must be {(B, noise.shape[1], 1, *noise.shape[3:])} for noise "
                         f"{tuple(noise.shape)}, got {tuple(image_latents.shape)}")
    if cfg.guidance_embed != (sampling.guidance is not None):
        raise ValueError(f"guidance={sampling.guidance} but the model has guidance_embed={cfg.guidance_embed}: "
                         "a guidance-distilled model needs a scale (6.0 upstream), others None")


def _cfg_batch(cond: Cond, uncond: Cond | None) -> Cond:
    """[uncond | cond] along the batch (upstream's order), text right-padded to a common length."""
    if uncond is None:
        return {k: cond[k] for k in COND_KEYS}
    S = max(cond["text_states"].shape[1], uncond["text_states"].shape[1])

    def pad(c: Cond) -> Cond:
        n = S - c["text_states"].shape[1]
        return {"text_states": F.pad(c["text_states"], (0, 0, 0, n)), "text_mask": F.pad(c["text_mask"], (0, n)),
                "text_states_2": c["text_states_2"]}

    u, c = pad(uncond), pad(cond)
    return {k: torch.cat([u[k].to(c[k].dtype), c[k]]) for k in COND_KEYS}


@dataclass(frozen=True)
class TokenSplit:
    """A step's video tokens split over context-parallel ranks (parallel/ builds it; the model
    only calls what it is given). Text and the modulation vectors stay whole on every rank."""

    tokens: tuple[int, int]
    """This rank's [start, end) of the video tokens (t-h-w order)."""
    attn: AttnFn
    """Joint attention of the blocks over [this rank's video tokens | all text] (Ulysses)."""
    gather: Callable[[Tensor], Tensor]
    """[B, l, F] this rank's final-layer outputs -> [B, L, F] of every rank, in token order."""
    reduce: Reduce
    """Sums a small tensor over the ranks (the step cache's distance sums: one decision)."""


def make_step(params: Params, cond: Cond, uncond: Cond | None = None, *, cfg: DiTConfig,
              sampling: Sampling = Sampling(), image_latents: Tensor | None = None, attn: AttnFn = sdpa,
              blocks: dit.Blocks = dit.Blocks(), cache: StepCache | None = None, stats: CacheStats | None = None,
              reduce: Reduce | None = None, split: TokenSplit | None = None) -> StepFn:
    """One Euler step of a run (I2V frame replace, CFG batch, embedding, blocks, final layer,
    CFG mix, Euler): conditioning, guidance and image latents are fixed here. Shapes are
    fixed for the run and nothing in the step reads the host (the text layout is read
    once, here), so graphs/ can capture the whole step in a CUDA graph.

    cache (hvfunc.cache): the blocks run or come from the cache; the step then keeps a
    per-run state (call it once per step, in order), reads one float per step on the host
    and fills `stats`. reduce: sums the cache's [2] distance sums over the ranks holding
    other video tokens (context parallelism; None: this rank holds them all).
    split: this rank's share of the video tokens (context parallelism; its reduce is the cache's)."""
    text = _cfg_batch(cond, uncond if sampling.real_cfg else None)
    layout = dit.text_layout(text["text_mask"])  # validated and read on the host once per run
    n = text["text_states"].shape[0]  # B, or 2B with real CFG
    dtype, device = params["img_in.proj.weight"].dtype, text["text_states"].device
    # upstream casts the scale to the DiT dtype before * 1000 (bf16: 6.0 -> 6016.0)
    guidance = None if sampling.guidance is None else torch.full((n,), sampling.guidance, dtype=dtype,
                                                                 device=device) * 1000.0

    state = _cache_state(cache, stats, reduce or (split and split.reduce), cfg=cfg, steps=sampling.steps)
    block_attn = attn if split is None else split.attn

    def run_blocks(e: dit.Embedded, after_first: Callable[[Tensor], Tensor | None] | None = None) -> Tensor:
        return dit.run_blocks(params, e, cfg=cfg, attn=block_attn, blocks=blocks, after_first=after_first)

    def step(x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        xin = x if image_latents is None else replace_first_frame(x, image_latents)
        e = dit.embed(params, xin.repeat(n // x.shape[0], 1, 1, 1, 1), t.float().expand(n), **text, cfg=cfg,
                      guidance=guidance, attn=attn, layout=layout, tokens=split and split.tokens)
        img = run_blocks(e) if state is None else state.run(params, e, run_blocks)
        out = dit.final_layer(params, img, e.vec)  # [n, l, F] for this rank's tokens
        v = dit.unpatchify(out if split is None else split.gather(out), e.grid, cfg.patch_size).float()
        if sampling.real_cfg:
            v = cfg_combine(*v.chunk(2), sampling.cfg_scale, sampling.guidance_rescale)
        return euler(x, v, dt, image_latents)

    return step


def _cache_state(cache: StepCache | None, stats: CacheStats | None, reduce: Reduce | None, *, cfg: DiTConfig,
                 steps: int) -> CacheState | None:
    if cache is None or not cache.enabled:
        return None
    if cfg.mm_double_blocks_depth < 1:
        raise ValueError(f"cache.kind={cache.kind} reads the first double block; this DiT has none")
    return CacheState(cache, steps, stats=stats, **({} if reduce is None else {"reduce": reduce}))


def denoise(params: Params, noise: Tensor, cond: Cond, uncond: Cond | None = None, *, cfg: DiTConfig,
            sampling: Sampling = Sampling(), image_latents: Tensor | None = None, attn: AttnFn = sdpa,
            blocks: dit.Blocks = dit.Blocks(), runner: Callable[[StepFn], StepFn] | None = None,
            callback: Callable[[int, Tensor], None] | None = None, cache: StepCache | None = None,
            stats: CacheStats | None = None, split: TokenSplit | None = None) -> Tensor:
    """Sample latents [B, C, T, H, W] fp32 (I2V: frame 0 = image_latents) from `noise` of that shape.

    cond / uncond: text_states, text_mask, text_states_2 (uncond only used with cfg_scale > 1).
    image_latents [B, C, 1, H, W]: VAE mode x scaling factor of the reference image (I2V models).
    blocks / runner: graphs.sampling passes compiled blocks and a CUDA-graph runner (default: eager).
    callback(i, x) runs after step i (progress bars, previews).
    cache: an opt-in step cache (hvfunc.cache.StepCache; None or kind "none": every step
    computed); `stats` (a CacheStats) gets which steps ran and the rule's distances.
    split: context parallelism (TokenSplit): every rank of the group returns the whole latents.
    """
    _check(noise, cond, uncond, image_latents, cfg=cfg, sampling=sampling)
    sig = sigmas(sampling.steps, sampling.shift, device=noise.device)
    t, dt = sig[:-1] * 1000, sig[1:] - sig[:-1]
    step = make_step(params, cond, uncond, cfg=cfg, sampling=sampling, image_latents=image_latents, attn=attn,
                     blocks=blocks, cache=cache, stats=stats, split=split)
    run = runner(step) if runner else step
    x = initial_latents(noise, image_latents, stability=sampling.i2v_stability)
    with torch.no_grad():
        for i in range(sampling.steps):
            x = run(x, t[i], dt[i])
            if callback is not None:
                callback(i, x)
    return x
