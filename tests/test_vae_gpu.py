"""The VAE on CUDA: fp32 parity with diffusers (tiled too), fp16 as upstream runs it, flat tiled memory."""

import pytest
import torch
from conftest import random_vae_params
from reference import diffusers_vae, rel_err

from graphs.memory import peak_memory, tensor_bytes
from hvfunc import vae
from hvfunc.config import VAE_PRESETS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CFG = VAE_PRESETS["tiny"]
TILING = vae.Tiling(tile_sample_min_size=64, tile_sample_min_tsize=16)
DEV = "cuda"


@pytest.fixture(scope="module")
def params():
    return {k: v.to(DEV) for k, v in random_vae_params(CFG, seed=4).items()}


@pytest.mark.parametrize("tiling", [None, TILING])
@torch.no_grad()
def test_fp32_matches_diffusers_on_cuda(params, tiling):
    ref = diffusers_vae(CFG, params, tiling).to(DEV)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 21, 88, 72, generator=g).to(DEV)
    z = torch.randn(2, 16, 6, 11, 9, generator=g).to(DEV)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        mean, logvar = vae.encode(params, x, cfg=CFG, tiling=tiling)
        post = ref.encode(x).latent_dist
        y = vae.decode(params, z, cfg=CFG, tiling=tiling)
        y_ref = ref.decode(z).sample
    assert rel_err(mean, post.mean) <= 1e-5 and rel_err(logvar, post.logvar) <= 1e-5
    assert rel_err(y, y_ref) <= 1e-5


@torch.no_grad()
def test_fp16_matches_upstreams_autocast_run(params):
    """Upstream runs the VAE with fp16 weights under fp16 autocast (GroupNorm then runs in fp32)."""
    ref = diffusers_vae(CFG, params).to(DEV, torch.float16)
    p16 = {k: v.half() for k, v in params.items()}
    z = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEV)
    y32 = vae.decode(params, z, cfg=CFG)
    y16 = vae.decode(p16, z.half(), cfg=CFG)
    with torch.autocast("cuda", dtype=torch.float16):
        y_up = ref.decode(z.half()).sample
    assert y16.dtype == torch.float16
    assert rel_err(y16, y_up) <= 2e-3
    assert rel_err(y16, y32) <= 5e-3


@torch.no_grad()
def test_tiled_decode_memory_is_flat_on_cuda(params):
    work = {}
    for thw in ((5, 8, 8), (9, 16, 16), (17, 24, 24)):
        z = torch.randn(1, 16, *thw, device=DEV)
        for tiling in (None, TILING):
            out, peak = peak_memory(lambda z=z, t=tiling: vae.decode(params, z, cfg=CFG, tiling=t), device=DEV)
            work[thw, tiling is not None] = peak - tensor_bytes(out)
    assert work[(17, 24, 24), True] <= 1.5 * work[(5, 8, 8), True]
    assert work[(17, 24, 24), False] >= 10 * work[(5, 8, 8), False]
