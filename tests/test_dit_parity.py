"""The DiT forward against diffusers' HunyuanVideoTransformer3DModel (fp32, CPU)."""

import pytest
import torch
from conftest import dit_inputs, random_params
from reference import diffusers_dit, diffusers_inputs, rel_err

from hvfunc import attention, ckpt, dit
from hvfunc.config import DIT_PRESETS

# README's bound for the forward (relative to the output scale, fp32 CPU): measured 3.9e-7 to
# 5.3e-7 against diffusers. Gradients (no README claim) through a longer chain of roundings:
# measured up to 5.2e-6 (a k-norm weight), asserted 1e-5.
TOL, GRAD_TOL = 1e-6, 1e-5


def _ref_and_params(cfg, seed=0):
    params = random_params(cfg, seed)
    ref = diffusers_dit(cfg)
    ref.load_state_dict(ckpt.dit_to_diffusers(params, cfg), strict=True)
    return ref, params


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
@pytest.mark.parametrize("guidance_embed", [True, False])
def test_forward_matches_diffusers_batch2_unequal_text(name, guidance_embed):
    cfg = DIT_PRESETS[name].replace(guidance_embed=guidance_embed)
    ref, params = _ref_and_params(cfg)
    inp = dit_inputs(cfg, lens=(5, 9))
    with torch.no_grad():
        ours = dit.forward(params, **inp, cfg=cfg)
        theirs = ref(**diffusers_inputs(**inp))[0]
        # the reference driven by our dict (converted), not by its own parameters
        fc = torch.func.functional_call(ref, ckpt.dit_to_diffusers(params, cfg), (), diffusers_inputs(**inp))[0]
    assert ours.shape == inp["x"].shape
    assert rel_err(ours, theirs) <= TOL
    assert rel_err(ours, fc) <= TOL


def test_i2v_first_frame_uses_its_own_modulation():
    """token_replace changes exactly what depends on frame-0 modulation: not a no-op."""
    t2v, i2v = DIT_PRESETS["tiny"], DIT_PRESETS["tiny-i2v"]
    params = random_params(t2v)
    inp = dit_inputs(t2v)
    with torch.no_grad():
        a, b = dit.forward(params, **inp, cfg=t2v), dit.forward(params, **inp, cfg=i2v)
    assert rel_err(a, b) > 1e-2


def test_padding_text_is_invisible():
    """Trimming, padding length and junk in padding positions do not change the output."""
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg)
    inp = dit_inputs(cfg, S=12, lens=(5, 9))
    junk = dict(inp, text_states=inp["text_states"].clone())
    junk["text_states"][inp["text_mask"] == 0] = 1e3
    with torch.no_grad():
        base = dit.forward(params, **inp, cfg=cfg)
        assert rel_err(dit.forward(params, **junk, cfg=cfg), base) <= TOL
        assert rel_err(dit.forward(params, **inp, cfg=cfg, trim_text=False), base) <= TOL
        # each sample alone (batch 1, its own length) equals its row of the batch
        for b, n in enumerate((5, 9)):
            one = {k: None if v is None else v[b:b + 1] for k, v in inp.items()}
            one["text_states"], one["text_mask"] = one["text_states"][:, :n], one["text_mask"][:, :n]
            assert rel_err(dit.forward(params, **one, cfg=cfg), base[b:b + 1]) <= TOL


def test_varlen_packing_matches_sdpa():
    """Upstream's cu_seqlens packing (emulated on CPU) == SDPA with a key mask at valid rows."""
    cfg = DIT_PRESETS["tiny-i2v"]
    params = random_params(cfg)
    inp = dit_inputs(cfg, lens=(3, 12), S=12)
    with torch.no_grad():
        a = dit.forward(params, **inp, cfg=cfg, attn=attention.sdpa)
        b = dit.forward(params, **inp, cfg=cfg, attn=attention.varlen(attention.varlen_reference))
    assert rel_err(b, a) <= TOL
    cu = attention.cu_seqlens(torch.tensor([3, 7]), 2, 10, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 10, 17, 20]


def test_bf16_forward_close_to_fp32():
    """bf16 within 1e-2 (norm-relative) of fp32, and no less accurate than diffusers run in bf16."""
    cfg = DIT_PRESETS["tiny-i2v"]
    ref, params = _ref_and_params(cfg)
    params = {k: v * 0.25 for k, v in params.items()}  # N(0, 0.05) weights
    ref.load_state_dict(ckpt.dit_to_diffusers(params, cfg))
    inp = dit_inputs(cfg)
    with torch.no_grad():
        f32 = dit.forward(params, **inp, cfg=cfg)
        bf16 = dit.forward({k: v.bfloat16() for k, v in params.items()}, **inp, cfg=cfg)
        low = ("hidden_states", "encoder_hidden_states", "pooled_projections")
        theirs = ref.to(torch.bfloat16)(**{k: v.bfloat16() if k in low else v
                                          for k, v in diffusers_inputs(**inp).items()})[0].float()
    assert bf16.dtype == torch.float32  # output follows x's dtype
    err = lambda a: float((a - f32).norm() / f32.norm())  # noqa: E731
    assert err(bf16) <= 1e-2
    assert err(bf16) <= 1.25 * err(theirs), (err(bf16), err(theirs))


def test_bad_inputs_raise_clear_errors():
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg)
    inp = dit_inputs(cfg)
    with pytest.raises(ValueError, match="right-padded"):
        m = inp["text_mask"].clone()
        m[0, 0] = 0
        dit.forward(params, **dict(inp, text_mask=m), cfg=cfg)
    with pytest.raises(ValueError, match="no valid token"):
        dit.forward(params, **dict(inp, text_mask=torch.zeros_like(inp["text_mask"])), cfg=cfg)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        dit.forward(params, **dict(inp, x=inp["x"][..., :7, :]), cfg=cfg)
    with pytest.raises(ValueError, match="guidance"):
        dit.forward(params, **dict(inp, guidance=None), cfg=cfg)
    with pytest.raises(ValueError, match="text_states_2"):
        dit.forward(params, **dict(inp, text_states_2=inp["text_states_2"][:, :3]), cfg=cfg)


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_gradients_match_diffusers(name):
    """Backward against diffusers' autograd: every weight's gradient (mapped to our layout by
    the same conversion as the weights) and the input's. Ours has hand-written backward
    code (hvfunc.ops.qkv), so the forward parity alone would not cover it."""
    cfg = DIT_PRESETS[name]
    ref, params = _ref_and_params(cfg)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    inp = dit_inputs(cfg, lens=(5, 9))
    x_ours, x_ref = (inp["x"].clone().requires_grad_(True) for _ in range(2))
    w = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(5))
    (dit.forward(params, **dict(inp, x=x_ours), cfg=cfg) * w).sum().backward()
    (ref(**diffusers_inputs(**dict(inp, x=x_ref)))[0] * w).sum().backward()
    theirs = ckpt.dit_from_diffusers({k: p.grad for k, p in ref.named_parameters()}, cfg)
    assert rel_err(x_ours.grad, x_ref.grad) <= GRAD_TOL
    worst = max((rel_err(params[k].grad, theirs[k]), k) for k in params)
    assert worst[0] <= GRAD_TOL, worst


def test_bf16_keeps_fp32_where_upstream_does():
    """In bf16, RMSNorm's statistics, RoPE and the timestep sinusoid are computed in fp32 as
    upstream does: bit-equal to diffusers' RMSNorm, apply_rotary_emb and get_timestep_embedding."""
    from diffusers.models.embeddings import apply_rotary_emb, get_timestep_embedding
    from diffusers.models.normalization import RMSNorm

    from hvfunc import ops

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 3, 16, generator=g) * torch.logspace(-2, 2, 16)).bfloat16()  # [B, L, N, K]
    w = (1 + 0.1 * torch.randn(16, generator=g)).bfloat16()
    norm = RMSNorm(16, eps=1e-6).bfloat16()
    norm.weight.data.copy_(w)
    assert torch.equal(ops.rms_norm(x, w), norm(x))
    cos, sin = ops.rope_freqs((1, 1, 7), (4, 6, 6), 256.0)
    want = apply_rotary_emb(x, (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)), sequence_dim=1)
    assert torch.equal(ops.apply_rope(x, cos, sin), want)
    t = torch.tensor([1.0, 999.0, 437.5]).bfloat16()
    emb = ops.timestep_embedding(t, 256)
    assert emb.dtype == torch.float32
    assert torch.equal(emb, get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
