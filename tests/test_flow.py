"""The training objective (hvfunc.flow) and the LR schedule (OptimConfig.lr_at) against oracles.

Oracles: diffusers' timestep density and FlowMatchEulerDiscreteScheduler, diffusers'
HunyuanVideoTransformer3DModel carrying our weights (the loss), torch's CosineAnnealingLR,
and the recipes written down in /work/shared/reference (the training presets).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dit_inputs, random_params
from reference import diffusers_dit

from hvfunc import ckpt, flow
from hvfunc.config import DIT_PRESETS, dit_preset
from hvfunc.flow import TimestepSampling
from parallel.optim import OptimConfig
from parallel.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# --- timestep sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.3, 1.7), (-1.0, 0.5)])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_logit_normal_matches_diffusers_density(n, mean, std):
    """Same generator state -> the same draws as diffusers' SD3 logit-normal sampler.
    diffusers draws torch.normal(mean, std) where we draw randn * std + mean: one stream,
    so only the last bit may differ (fused multiply-add), hence atol 1e-6 on values in (0, 1)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling as density

    ref = density("logit_normal", n, logit_mean=mean, logit_std=std, generator=torch.Generator().manual_seed(3))
    ours = flow.sample_sigmas(n, TimestepSampling(mean=mean, std=std), generator=torch.Generator().manual_seed(3))
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), float((ours - ref).abs().max())
    assert ((ours > 0) & (ours < 1)).all()


def test_uniform_matches_diffusers_density():
    from diffusers.training_utils import compute_density_for_timestep_sampling as density

    ref = density("none", 500, generator=torch.Generator().manual_seed(4))
    ours = flow.sample_sigmas(500, TimestepSampling(mode="uniform"), generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shift", [1.0, 5.0, 7.0, 17.0])
def test_shift_matches_diffusers_scheduler(shift):
    """The scheduler built with `shift` holds shifted train sigmas; shift_sigmas of its unshifted
    ones must give the same (the formula both HunyuanVideo trainers and the sampler use)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas
    ours = flow.shift_sigmas(plain, shift)
    assert torch.allclose(ours, shifted, rtol=0, atol=1e-7), float((ours - shifted).abs().max())
    if shift > 1:  # a real shift moves mass towards noise (s = 1): guards against a no-op
        assert (ours[1:-1] > plain[1:-1]).all()


def test_shifted_draws_are_the_shifted_logit_normal():
    """sample_sigmas applies the shift after the sigmoid (the I2V recipe: 7t / (1 + 6t))."""
    from diffusers.training_utils import compute_density_for_timestep_sampling as density

    u = density("logit_normal", 64, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(5))
    ours = flow.sample_sigmas(64, TimestepSampling(shift=7.0), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ours, 7 * u / (1 + 6 * u), rtol=0, atol=1e-6)


def test_bad_sampling_settings_raise():
    for kw in (dict(mode="beta"), dict(std=0.0), dict(shift=-1.0)):
        with pytest.raises(ValueError):
            TimestepSampling(**kw)


# --- the path ----------------------------------------------------------------------------------

def _latents(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 3, 4, 5, generator=g), torch.randn(B, 4, 3, 4, 5, generator=g)


def test_noised_endpoints_and_per_sample_sigmas():
    """Each sample gets its own sigma over all of [C, T, H, W]: s = 0 is the clean latent,
    s = 1 is pure noise, exactly; a middle sample equals itself noised alone."""
    x0, noise = _latents()
    x_s, target = flow.noised(x0, noise, torch.tensor([0.0, 1.0, 0.3]))
    assert x_s.shape == x0.shape and target.shape == x0.shape
    assert torch.equal(x_s[0], x0[0])
    assert torch.equal(x_s[1], noise[1])
    alone, _ = flow.noised(x0[2:], noise[2:], torch.tensor([0.3]))
    assert torch.equal(x_s[2], alone[0])
    assert not torch.allclose(x_s[2], x0[2]) and not torch.allclose(x_s[2], noise[2])


def test_target_is_the_path_velocity():
    """target == d x_s / d s: a finite difference along the path (linear, so any two points)."""
    x0, noise = _latents(B=2, seed=1)
    x0, noise = x0.double(), noise.double()
    s1, s2 = torch.tensor([0.1, 0.45]), torch.tensor([0.8, 0.5])
    a, target = flow.noised(x0, noise, s1)
    b, target2 = flow.noised(x0, noise, s2)
    fd = (b - a) / (s2.double() - s1.double()).view(-1, 1, 1, 1, 1)
    assert torch.equal(target, target2)  # the velocity does not depend on s
    assert torch.allclose(fd, target, rtol=0, atol=1e-9), float((fd - target).abs().max())
    # and it points from data to noise: x0 + 1 * target is the noise
    assert torch.allclose(x0 + target, noise, rtol=0, atol=1e-12)


# --- the loss ----------------------------------------------------------------------------------

def _oracle_loss(ref, batch: dict, sigma: torch.Tensor, noise: torch.Tensor, guidance, i2v: bool) -> torch.Tensor:
    """Upstream's objective written out on diffusers' transformer (HunyuanVideo-I2V
    transport.training_losses; MindSpeed-MM section 4.1): fp32 MSE of the velocity, and for
    token_replace the clean condition as input frame 0 and frames 1: only in the mean."""
    x0 = batch["latents"]
    s = sigma.view(-1, 1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * noise
    if i2v:
        x_s = torch.cat([batch["cond_latents"], x_s[:, :, 1:]], dim=2)
    kw = dict(guidance=guidance) if guidance is not None else {}
    out = ref(hidden_states=x_s, timestep=sigma * 1000, encoder_hidden_states=batch["text_states"],
              encoder_attention_mask=batch["text_mask"], pooled_projections=batch["text_states_2"],
              return_dict=False, **kw)[0]
    d = out.float() - (noise - x0)
    return (d[:, :, 1:] if i2v else d).square().mean()


@pytest.mark.parametrize("name, shift", [("tiny", 1.0), ("tiny-i2v", 7.0)])
def test_token_loss_matches_diffusers_objective(name, shift):
    """Batch of 2 with unequal text lengths and distinct sigmas; I2V's condition latent is
    unrelated to the clean frame 0, so using either one for the other would show."""
    cfg = DIT_PRESETS[name]
    i2v = cfg.i2v_condition_type == "token_replace"
    params = random_params(cfg, seed=0)
    ref = diffusers_dit(cfg)
    ref.load_state_dict(ckpt.dit_to_diffusers(params, cfg), strict=True)
    inp = dit_inputs(cfg, B=2, T=3, H=8, W=6, lens=(5, 9), seed=1)
    g = torch.Generator().manual_seed(2)
    batch = dict(latents=inp["x"], text_states=inp["text_states"], text_mask=inp["text_mask"],
                 text_states_2=inp["text_states_2"])
    if i2v:
        batch["cond_latents"] = torch.randn(2, cfg.in_channels, 1, 8, 6, generator=g)
    sigma = flow.sample_sigmas(2, TimestepSampling(shift=shift), generator=g)
    noise = torch.randn(inp["x"].shape, generator=g)
    with torch.no_grad():
        sq, n = flow.token_loss(params, batch, sigma, noise, cfg=cfg, guidance=inp["guidance"])
        want = _oracle_loss(ref, batch, sigma, noise, inp["guidance"], i2v)
    assert n == 2 * cfg.in_channels * (3 - i2v) * 8 * 6  # frame 0 counts for nothing in I2V
    got = sq / n
    assert got.dtype == torch.float32
    assert math.isclose(float(got), float(want), rel_tol=1e-5), (float(got), float(want))


# --- training presets --------------------------------------------------------------------------

def _train_presets() -> dict:
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the CLI runs under `if __name__ == "__main__"` only
    return {k: cfg for k, (_, cfg) in mod.PRESETS.items()}


def test_training_presets_follow_the_official_recipes():
    presets = _train_presets()
    t2v, i2v = presets["hunyuan-video-t2v"], presets["hunyuan-video-i2v"]
    # mindspeed-mm.md section 4.1, T2V: u ~ diffusers logit_normal(mean 0, std 1) and the
    # training sigmas are not shifted (shift only at inference); guidance 1.0 -> 1000.
    assert t2v.timesteps == TimestepSampling(mode="logit_normal", mean=0.0, std=1.0, shift=1.0)
    assert t2v.guidance == 1.0
    # mindspeed-mm.md section 4.1, I2V, and hunyuanvideo-official.md section 5 (LoRA,
    # "Flow-matching training"): t = sigmoid(N(0, 1)) then shifted by 7.0; guidance 6.016
    # (6.0 cast to bf16 before x1000, mindspeed-mm.md section 2.1 / official section 1.3).
    assert i2v.timesteps == TimestepSampling(mode="logit_normal", mean=0.0, std=1.0, shift=7.0)
    assert i2v.guidance == 6.016
    # the CPU demo presets train like their full-size recipes
    assert presets["tiny"].timesteps == t2v.timesteps and presets["tiny-i2v"].timesteps == i2v.timesteps
    assert dit_preset(i2v.model).i2v_condition_type == "token_replace"
    assert dit_preset(t2v.model).i2v_condition_type is None
    # mindspeed-mm.md section 4.2 (T2V and I2V full): 5e-6 constant, no warm-up, wd 0.01, clip 1.0.
    for p in (t2v, i2v):
        o = p.optim
        assert (o.lr, o.schedule, o.warmup_steps, o.weight_decay, o.grad_clip) == (5e-6, "constant", 0, 0.01, 1.0)
        assert (o.betas, o.eps) == ((0.9, 0.999), 1e-8)
    # a TrainConfig without a preset trains like T2V
    assert TrainConfig(features=Path("f"), out=Path("o")).timesteps == t2v.timesteps


# --- learning-rate schedule --------------------------------------------------------------------

def test_warmup_is_linear_and_reaches_lr_at_its_last_step():
    """Convention: step k of W warm-up steps uses the (k + 1)-th of W equal increments from
    warmup_start_lr, so step 0 is already above the start and step W - 1 is lr (up to rounding)."""
    cfg = OptimConfig(lr=3e-4, warmup_steps=8, warmup_start_lr=1e-6, schedule="constant")
    ramp = np.linspace(cfg.warmup_start_lr, cfg.lr, cfg.warmup_steps + 1)[1:]
    ours = [cfg.lr_at(k) for k in range(cfg.warmup_steps)]
    np.testing.assert_allclose(ours, ramp, rtol=1e-12, atol=0)
    assert math.isclose(ours[-1], cfg.lr, rel_tol=1e-15)
    assert all(cfg.lr_at(k) == cfg.lr for k in range(cfg.warmup_steps, 3 * cfg.warmup_steps))
    assert OptimConfig(lr=2e-5, warmup_steps=0).lr_at(0) == 2e-5


@pytest.mark.parametrize("warmup, total, ratio", [(5, 40, 0.1), (0, 17, 0.0), (3, 4, 0.5)])
def test_cosine_matches_torch_cosine_annealing(warmup, total, ratio):
    """After warm-up, steps warmup..total follow CosineAnnealingLR(T_max=total - warmup,
    eta_min=ratio * lr) step by step; from total on the rate stays at ratio * lr."""
    cfg = OptimConfig(lr=1e-3, warmup_steps=warmup, warmup_start_lr=1e-5, schedule="cosine",
                      total_steps=total, min_lr_ratio=ratio)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=ratio * cfg.lr)
    worst = 0.0
    for step in range(warmup, total + 1):
        want = opt.param_groups[0]["lr"]
        worst = max(worst, abs(cfg.lr_at(step) - want) / cfg.lr)
        opt.step()
        sched.step()
    assert worst <= 1e-12, worst  # torch's recursive form drifts by rounding only
    assert cfg.lr_at(warmup) == cfg.lr
    assert all(cfg.lr_at(total + k) == ratio * cfg.lr for k in range(0, 50, 7))
    if warmup:  # the warm-up is the same ramp as for a constant schedule
        assert math.isclose(cfg.lr_at(warmup - 1), cfg.lr, rel_tol=1e-15) and cfg.lr_at(0) < cfg.lr
