"""The sampler against diffusers' HunyuanVideo pipelines (T2V, I2V) and its scheduler (fp32, CPU)."""

import pytest
import torch
from conftest import random_params, random_vae_params
from reference import diffusers_dit, diffusers_vae, rel_err

from hvfunc import ckpt, sample, vae
from hvfunc.config import DIT_PRESETS, VAE_PRESETS

# README's bounds (final latents relative to diffusers' pipelines, fp32 CPU); measured on the
# development CPU: T2V 2.4e-7 (CFG off) / 9.3e-7 (CFG 3.5), I2V 3.2e-6 to 3.6e-6.
T2V_TOL, I2V_TOL = 1e-6, 4e-6
B, T, H, W = 2, 3, 8, 6  # latents; the video is 9 frames of 64 x 48


def _scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _conds(cfg, seed=1, lens=((5, 9), (7, 4))):
    """cond and uncond with unequal right-padded text lengths (S = 12 and 10)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for S, ls in zip((12, 10), lens):
        mask = (torch.arange(S)[None] < torch.tensor(ls)[:, None]).float()  # diffusers casts masks to float
        out.append({"text_states": torch.randn(B, S, cfg.text_states_dim, generator=g), "text_mask": mask,
                    "text_states_2": torch.randn(B, cfg.text_states_dim_2, generator=g)})
    return out


def _pipe_kwargs(cond, uncond, noise, s: sample.Sampling) -> dict:
    kw = dict(prompt_embeds=cond["text_states"], prompt_attention_mask=cond["text_mask"],
              pooled_prompt_embeds=cond["text_states_2"], latents=noise.clone(), height=8 * H, width=8 * W,
              num_frames=4 * (T - 1) + 1, num_inference_steps=s.steps, guidance_scale=s.guidance,
              true_cfg_scale=s.cfg_scale, output_type="latent", return_dict=False)
    if s.real_cfg:
        kw.update(negative_prompt_embeds=uncond["text_states"], negative_prompt_attention_mask=uncond["text_mask"],
                  negative_pooled_prompt_embeds=uncond["text_states_2"])
    return kw


def _dit(cfg):
    params = random_params(cfg, seed=0, scale=0.1)
    ref = diffusers_dit(cfg)
    ref.load_state_dict(ckpt.dit_to_diffusers(params, cfg), strict=True)
    return params, ref


@pytest.mark.parametrize("steps, shift", [(50, 7.0), (4, 17.0), (1, 1.0)])
def test_sigmas_and_timesteps_match_diffusers_scheduler(steps, shift):
    ref = _scheduler(shift)
    # what both HunyuanVideo pipelines pass: linspace(1, 0, N + 1)[:-1], shifted by the scheduler
    ref.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    ours = sample.sigmas(steps, shift)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,) and ours[-1] == 0 and ours[0] == 1
    assert torch.allclose(ours, ref.sigmas, rtol=0, atol=1e-7)
    assert torch.allclose(ours[:-1] * 1000, ref.timesteps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.5])
def test_t2v_denoise_matches_diffusers_pipeline(cfg_scale):
    from diffusers import HunyuanVideoPipeline

    cfg = DIT_PRESETS["tiny"]
    params, ref = _dit(cfg)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=ref, vae=None,
                                scheduler=_scheduler(7.0), text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _conds(cfg)
    s = sample.Sampling(steps=4, shift=7.0, guidance=6.0, cfg_scale=cfg_scale)
    noise = sample.initial_noise(B, 9, 64, 48, generator=torch.Generator().manual_seed(3))
    seen = []
    ours = sample.denoise(params, noise, cond, uncond, cfg=cfg, sampling=s, callback=lambda i, x: seen.append(i))
    theirs = pipe(**_pipe_kwargs(cond, uncond, noise, s))[0]
    assert seen == list(range(s.steps))
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    assert rel_err(ours, theirs) <= T2V_TOL, rel_err(ours, theirs)
    assert rel_err(ours, noise) > 0.1  # the DiT did something


@pytest.mark.parametrize("cfg_scale, stability", [(1.0, True), (2.5, True), (1.0, False)])
def test_i2v_denoise_matches_diffusers_pipeline(cfg_scale, stability):
    from diffusers import HunyuanVideoImageToVideoPipeline

    cfg, vcfg = DIT_PRESETS["tiny-i2v"], VAE_PRESETS["tiny"]
    params, ref = _dit(cfg)
    vparams = random_vae_params(vcfg, seed=3)
    pipe = HunyuanVideoImageToVideoPipeline(text_encoder=None, tokenizer=None, transformer=ref,
                                            vae=diffusers_vae(vcfg, vparams), scheduler=_scheduler(7.0),
                                            text_encoder_2=None, tokenizer_2=None, image_processor=None)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _conds(cfg)
    s = sample.Sampling(steps=3, shift=7.0, guidance=6.0, cfg_scale=cfg_scale, i2v_stability=stability)
    g = torch.Generator().manual_seed(5)
    image = torch.rand(B, 3, 8 * H, 8 * W, generator=g)  # [0, 1]; the pipeline maps it to [-1, 1]
    noise = torch.randn(B, 16, T, H, W, generator=g)
    # the caller's job: the reference image's VAE mode x scaling factor, from our VAE
    z = vae.scale_latents(vae.mode(*vae.encode(vparams, (2 * image - 1)[:, :, None], cfg=vcfg)), cfg=vcfg)
    ours = sample.denoise(params, noise, cond, uncond, cfg=cfg, sampling=s, image_latents=z)
    if stability:  # diffusers always mixes 0.001 of the image into the start latents
        theirs = pipe(image=image, **_pipe_kwargs(cond, uncond, noise, s))[0]
    else:  # undo its mix: start latents (x - 0.001 z) / 0.999 give exactly `noise` (to rounding)
        t = torch.tensor([sample.STABILITY_T])
        start = (noise - z.expand_as(noise) * (1 - t)) / t
        theirs = pipe(image=image, **_pipe_kwargs(cond, uncond, start, s))[0]
    assert torch.equal(ours[:, :, :1], z)  # frame 0 is the clean image latent
    assert rel_err(ours, theirs) <= I2V_TOL, rel_err(ours, theirs)


def test_cfg_rescale_matches_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 2, 16, 3, 4, 4, generator=g).unbind(0)
    for phi in (0.0, 0.7, 1.0):
        want = rescale_noise_cfg(u + 5.0 * (c - u), c, guidance_rescale=phi)
        assert rel_err(sample.cfg_combine(u, c, 5.0, phi), want) <= 1e-6


def test_i2v_start_latents_follow_upstream_stability_mix():
    g = torch.Generator().manual_seed(0)
    n, z = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 1, 4, 4, generator=g)
    x = sample.initial_latents(n, z, stability=True)
    assert torch.allclose(x, 0.999 * n + 0.001 * z, atol=1e-6) and not torch.equal(x, n)
    assert torch.equal(sample.initial_latents(n, z, stability=False), n)
    assert torch.equal(sample.initial_latents(n), n)


def test_bad_inputs_raise_precise_errors():
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg)
    cond, _ = _conds(cfg)
    noise = torch.randn(B, 16, T, H, W)
    cases = [
        (dict(sampling=sample.Sampling(cfg_scale=2.0)), "needs negative conditioning"),
        (dict(sampling=sample.Sampling(guidance=None)), "guidance_embed=True"),
        (dict(image_latents=noise[:, :, :1]), "model is T2V"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            sample.denoise(params, noise, cond, cfg=cfg, **kw)
    with pytest.raises(ValueError, match="needs image_latents"):
        sample.denoise(params, noise, cond, cfg=DIT_PRESETS["tiny-i2v"])
    with pytest.raises(ValueError, match="batch sizes"):
        sample.denoise(params, noise[:1], cond, cfg=cfg)
    with pytest.raises(ValueError, match="lacks"):
        sample.denoise(params, noise, {"text_states": cond["text_states"]}, cfg=cfg)
    with pytest.raises(ValueError, match="steps must be"):
        sample.Sampling(steps=0)
    with pytest.raises(ValueError, match="frames"):
        sample.initial_noise(1, 10, 64, 48, generator=torch.Generator())


def test_presets_are_the_official_recipes():
    """Independent copy of the official numbers (hunyuanvideo-official.md): section 4 "T2V
    defaults" (--infer-steps 50, --flow-shift 7.0, --embedded-cfg-scale 6.0, --cfg-scale 1.0);
    section 5 "--i2v-stability" (README: shift 7 with --i2v-stability, 17 without; I2V scripts
    pass --embedded-cfg-scale 6.0, real CFG off)."""
    official = {
        "t2v": dict(steps=50, shift=7.0, guidance=6.0, cfg_scale=1.0, guidance_rescale=0.0),
        "i2v": dict(shift=7.0, i2v_stability=True, guidance=6.0, cfg_scale=1.0),
        "i2v-dynamic": dict(shift=17.0, i2v_stability=False, guidance=6.0, cfg_scale=1.0),
    }
    for name, want in official.items():
        got = sample.SAMPLING_PRESETS[name]
        assert {k: getattr(got, k) for k in want} == want, name
        assert not got.real_cfg
    assert sample.Sampling() == sample.SAMPLING_PRESETS["t2v"]  # the defaults are the T2V recipe


@pytest.mark.parametrize("dtype, fed", [(torch.bfloat16, 6016.0), (torch.float32, 6000.0)])
def test_make_step_feeds_guidance_in_the_dit_dtype(monkeypatch, dtype, fed):
    """hunyuanvideo-official.md 1.3: guidance = embedded_cfg_scale x 1000 in the DiT dtype, so
    6.0 reaches a bf16 DiT as 6016 (6000 is no bf16 number: its neighbours are 5984 and 6016)
    and the fp32 sinusoid sees 6016, not 6000. Checked on what make_step hands the DiT's
    embedding, per batch row (2B with real CFG)."""
    from hvfunc import dit

    cfg = DIT_PRESETS["tiny"]
    params = {k: v.to(dtype) for k, v in random_params(cfg).items()}
    cond, uncond = _conds(cfg)
    seen = []
    real_embed = dit.embed
    monkeypatch.setattr(dit, "embed", lambda *a, **kw: seen.append(kw["guidance"]) or real_embed(*a, **kw))
    for s, rows in ((sample.Sampling(steps=1), B), (sample.Sampling(steps=1, cfg_scale=2.0), 2 * B)):
        step = sample.make_step(params, cond, uncond, cfg=cfg, sampling=s)
        step(torch.randn(B, 16, T, H, W), torch.tensor(500.0), torch.tensor(-0.5))
        g = seen.pop()
        assert g.dtype == dtype and g.tolist() == [fed] * rows
