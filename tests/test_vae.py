"""Causal 3D VAE: parity with diffusers' AutoencoderKLHunyuanVideo, precision, shapes, posterior, loading."""

import inspect
import json

import pytest
import torch
from conftest import random_vae_params
from reference import diffusers_vae, rel_err

from hvfunc import ckpt, io, vae
from hvfunc.config import VAE_PRESETS

CFG = VAE_PRESETS["tiny"]


@pytest.fixture(scope="module")
def params():
    return random_vae_params(CFG)


@pytest.fixture(scope="module")
def ref(params):
    return diffusers_vae(CFG, params)  # load_state_dict(strict=True): our official-key dict loads unchanged


def _video(B=2, T=9, H=32, W=48, seed=1, dtype=torch.float32):
    return torch.randn(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _latents(B=2, t=3, h=4, w=6, seed=2, dtype=torch.float32):
    return torch.randn(B, CFG.latent_channels, t, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", ["tiny", "hunyuan-video"])
def test_spec_is_diffusers_state_dict(name):
    """Same keys and shapes as diffusers' model (the official layout): built on meta, no memory."""
    cfg = VAE_PRESETS[name]
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in diffusers_vae(cfg).state_dict().items()}
    assert {k: s.shape for k, s in vae.vae_spec(cfg).items()} == theirs


@torch.no_grad()
def test_encode_matches_diffusers(params, ref):
    x = _video()
    mean, logvar = vae.encode(params, x, cfg=CFG)
    post = ref.encode(x).latent_dist
    assert mean.shape == (2, 16, 3, 4, 6)
    assert rel_err(mean, post.mean) <= 1e-5 and rel_err(logvar, post.logvar) <= 1e-5
    # fp64 removes rounding: the two computations are the same function
    p64 = {k: v.double() for k, v in params.items()}
    m64, l64 = vae.encode(p64, x.double(), cfg=CFG)
    post64 = diffusers_vae(CFG, p64).double().encode(x.double()).latent_dist
    assert rel_err(m64, post64.mean) <= 1e-14 and rel_err(l64, post64.logvar) <= 1e-14  # measured 4.6e-16, 5.3e-16


@torch.no_grad()
def test_decode_matches_diffusers(params, ref):
    z = _latents()
    y = vae.decode(params, z, cfg=CFG)
    assert y.shape == (2, 3, 9, 32, 48)
    assert rel_err(y, ref.decode(z).sample) <= 1e-5
    p64 = {k: v.double() for k, v in params.items()}
    y64 = diffusers_vae(CFG, p64).double().decode(z.double()).sample
    assert rel_err(vae.decode(p64, z.double(), cfg=CFG), y64) <= 1e-14  # measured 3.6e-15


@torch.no_grad()
def test_single_frame_and_slicing(params, ref):
    """An image is a 1-frame video (latent t=1); batch slicing gives the unsliced result."""
    x = _video(T=1, H=16, W=16)
    mean, _ = vae.encode(params, x, cfg=CFG)
    assert mean.shape == (2, 16, 1, 2, 2) and rel_err(mean, ref.encode(x).latent_dist.mean) <= 1e-5
    z = _latents(t=1)
    y = vae.decode(params, z, cfg=CFG)
    assert y.shape == (2, 3, 1, 32, 48) and rel_err(y, ref.decode(z).sample) <= 1e-5
    assert rel_err(vae.decode(params, z, cfg=CFG, slicing=True), y) <= 1e-6


@torch.no_grad()
def test_posterior_sample_mode_and_scaling(params, ref):
    x = _video(T=5, H=16, W=16)
    mean, logvar = vae.encode(params, x, cfg=CFG)
    post = ref.encode(x).latent_dist
    ours = vae.sample(mean, logvar, generator=torch.Generator().manual_seed(7))
    assert rel_err(ours, post.sample(generator=torch.Generator().manual_seed(7))) <= 1e-5
    assert not torch.equal(ours, vae.sample(mean, logvar, generator=torch.Generator().manual_seed(8)))
    assert torch.equal(vae.mode(mean, logvar), mean)
    from diffusers import AutoencoderKLHunyuanVideo

    official = inspect.signature(AutoencoderKLHunyuanVideo.__init__).parameters["scaling_factor"].default
    assert VAE_PRESETS["hunyuan-video"].scaling_factor == official
    z = vae.scale_latents(mean, cfg=CFG)
    assert torch.allclose(z, mean * official) and torch.allclose(vae.unscale_latents(z, cfg=CFG), mean)
    huge = params | {"quant_conv.bias": torch.cat([torch.zeros(16), torch.full((16,), 1e3)])}
    assert torch.all(vae.encode(huge, x, cfg=CFG)[1] == 20.0)  # upstream clamps logvar to [-30, 20]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@torch.no_grad()
def test_half_precision_close_to_fp32(params, dtype, tol):
    """Weights and activations in bf16 / fp16, GroupNorm in fp32 (upstream's autocast run)."""
    x, z = _video(B=1, T=5, H=16, W=16), _latents(B=1, t=2, h=2, w=2)
    ph = {k: v.to(dtype) for k, v in params.items()}
    mean, _ = vae.encode(params, x, cfg=CFG)
    mean_h, logvar_h = vae.encode(ph, x.to(dtype), cfg=CFG)
    assert mean_h.dtype == logvar_h.dtype == dtype
    assert rel_err(mean_h, mean) <= tol
    y_h = vae.decode(ph, z.to(dtype), cfg=CFG)
    assert y_h.dtype == dtype and torch.isfinite(y_h).all()
    assert rel_err(y_h, vae.decode(params, z, cfg=CFG)) <= tol


def test_shape_errors_name_valid_values(params):
    with pytest.raises(ValueError, match=r"10 frames \(need 4k\+1: use 9 or 13\)"):
        vae.encode(params, torch.zeros(1, 3, 10, 16, 16), cfg=CFG)
    with pytest.raises(ValueError, match=r"height 100 \(need a multiple of 8: use 96 or 104\).*width 4 .*use 8\)"):
        vae.encode(params, torch.zeros(1, 3, 9, 100, 4), cfg=CFG)
    with pytest.raises(ValueError, match=r"width 120 \(need a multiple of 16: use 112 or 128\)"):
        vae.check_video_shape(129, 720, 120, cfg=CFG, size_multiple=16)
    vae.check_video_shape(129, 720, 1280, cfg=CFG, size_multiple=16)
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, T, H, W\], got \(1, 4, 2, 2, 2\)"):
        vae.decode(params, torch.zeros(1, 4, 2, 2, 2), cfg=CFG)


# ---- loading ----------------------------------------------------------------------------------

def _official_dir(tmp, params, *, wrap=True, config=None):
    """What upstream ships in ckpts/hunyuan-video-t2v-720p/vae/: pytorch_model.pt + config.json."""
    d = tmp / "vae"
    d.mkdir(exist_ok=True)
    sd = {f"vae.{k}": v for k, v in params.items()} | {"loss.logvar": torch.zeros(())}
    torch.save({"state_dict": sd} if wrap else dict(params), d / "pytorch_model.pt")
    c = config or {"_class_name": "AutoencoderKLCausal3D", "_diffusers_version": "0.4.2", "act_fn": "silu",
                   "block_out_channels": list(CFG.block_out_channels),
                   "down_block_types": ["DownEncoderBlockCausal3D"] * 4, "in_channels": 3, "latent_channels": 16,
                   "layers_per_block": CFG.layers_per_block, "norm_num_groups": CFG.norm_num_groups,
                   "out_channels": 3, "sample_size": 256, "sample_tsize": 64,
                   "up_block_types": ["UpDecoderBlockCausal3D"] * 4, "scaling_factor": 0.476986,
                   "time_compression_ratio": 4, "mid_block_add_attention": True}
    (d / "config.json").write_text(json.dumps(c))
    return d


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_official_dir(tmp, params):
    d = _official_dir(tmp, params)
    loaded, cfg = ckpt.load_vae(d)
    assert cfg == CFG and _equal(loaded, params)
    loaded, _ = ckpt.load_vae(d / "pytorch_model.pt", CFG, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in loaded.values())
    _official_dir(tmp, params, wrap=False)  # a bare state dict works too
    assert _equal(ckpt.load_vae(d)[0], params)


def test_load_diffusers_save_pretrained(tmp, params, ref):
    """diffusers writes its own folder (safetensors + its config names): we read it back unchanged."""
    ref.save_pretrained(tmp / "vae")
    loaded, cfg = ckpt.load_vae(tmp / "vae")
    assert _equal(loaded, params) and cfg == CFG


def test_load_errors_are_clear(tmp, params):
    d = _official_dir(tmp, params)
    raw = (d / "pytorch_model.pt").read_bytes()
    (d / "pytorch_model.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.pt.*truncated"):
        ckpt.load_vae(d)
    bad = dict(params)
    bad["encoder.conv_in.conv.weights"] = bad.pop("encoder.conv_in.conv.weight")
    d = _official_dir(tmp, bad)
    with pytest.raises(ValueError, match=r"missing \(1\): encoder\.conv_in\.conv\.weight\n.*"
                                         r"unexpected \(1\): encoder\.conv_in\.conv\.weights"):
        ckpt.load_vae(d)
    bad = dict(params) | {"quant_conv.weight": torch.zeros(32, 32, 1, 1, 2)}
    with pytest.raises(ValueError, match=r"quant_conv\.weight: got \(32, 32, 1, 1, 2\), expected \(32, 32, 1, 1, 1\)"):
        ckpt.load_vae(_official_dir(tmp, bad))
    with pytest.raises(ValueError, match=r"cfg disagrees .*'norm_num_groups': \(8, 4\)"):
        ckpt.load_vae(_official_dir(tmp, params), CFG.replace(norm_num_groups=8))
    with pytest.raises(ValueError, match=r"unknown VAE config keys \['shift_factor'\]"):
        ckpt.load_vae(_official_dir(tmp, params, config={"shift_factor": 0.1}))
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json beside"):
        ckpt.load_vae(d)
    with pytest.raises(FileNotFoundError, match="no VAE weights"):
        ckpt.load_vae(tmp)
    io.save_safetensors(params, tmp / "x.safetensors")  # a lone file with cfg given works
    assert _equal(ckpt.load_vae(tmp / "x.safetensors", CFG)[0], params)
