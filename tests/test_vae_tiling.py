"""Tiled VAE: upstream's tile numbers, parity with diffusers and with upstream's list-based algorithm,
and working memory that does not grow with the video."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_vae_params
from reference import diffusers_vae, official_tiled, rel_err

from graphs.memory import peak_memory, tensor_bytes
from hvfunc import vae
from hvfunc.config import VAE_PRESETS
from hvfunc.vae import tiling as tl

CFG = VAE_PRESETS["tiny"]
SMALL = vae.Tiling(tile_sample_min_size=64, tile_sample_min_tsize=16)  # upstream's 256 / 64 / 0.25, scaled down


@pytest.fixture(scope="module")
def params():
    return random_vae_params(CFG, seed=3)


def test_default_tiling_is_upstreams():
    """The numbers of upstream's AutoencoderKLCausal3D with its config (sample_size 256, sample_tsize 64)."""
    full = VAE_PRESETS["hunyuan-video"]
    t = vae.Tiling()
    assert (t.tile_sample_min_size, t.tile_sample_min_tsize) == (full.sample_size, full.sample_tsize)
    # decode: latent tiles 32 stepping 24, 64 px blended, 192 kept; 16(+1) latent frames stepping 12, 16 blended
    assert tl.plan(t, full, decode=True) == (tl.Axis(32, 24, 64, 192), tl.Axis(16, 12, 16, 48))
    # encode: 256 px tiles stepping 192, 8 latents blended, 24 kept; 64(+1) frames stepping 48, 4 blended
    assert tl.plan(t, full, decode=False) == (tl.Axis(256, 192, 8, 24), tl.Axis(64, 48, 4, 12))


def test_inexact_overlap_is_refused():
    with pytest.raises(ValueError, match=r"does not tile exactly.*steps by 204 but keeps 205"):
        tl.plan(vae.Tiling(tile_overlap_factor=0.2), CFG, decode=True)
    with pytest.raises(ValueError, match="tile_overlap_factor must be in"):
        tl.plan(vae.Tiling(tile_overlap_factor=1.0), CFG, decode=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        tl.plan(vae.Tiling(tile_sample_min_size=100), CFG, decode=False)


def _fake_decoder(z: torch.Tensor) -> torch.Tensor:
    """Causal 4x / 8x nearest upsampling plus a ramp over the tile, so overlapping tiles disagree."""
    y = torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    y = F.interpolate(y, scale_factor=(1, 8, 8), mode="nearest")
    ramp = torch.linspace(0, 1, y.shape[-2])[:, None] + torch.linspace(0, 2, y.shape[-1])
    return y + ramp + torch.arange(y.shape[2])[:, None, None] * 0.1


@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("thw", [(1, 3, 5), (5, 9, 4), (13, 8, 7), (25, 5, 3), (60, 2, 2)])
def test_streaming_equals_upstream_algorithm(thw, overlap):
    """Our streamed tiling == upstream's list-based one (in-place blends, no crop) on a cheap fake
    decoder, for ragged last tiles, trailing one-frame chunks (t=13, 25) and long videos."""
    t, h, w = thw
    z = torch.randn(1, 2, t, h, w, generator=torch.Generator().manual_seed(t))
    til = vae.Tiling(tile_sample_min_size=32, tile_sample_min_tsize=16, tile_overlap_factor=overlap)
    space, time = tl.plan(til, CFG, decode=True)
    ours = tl.run(_fake_decoder, z, space=space, time=time, out_size=(4 * (t - 1) + 1, 8 * h, 8 * w))
    ref = official_tiled(_fake_decoder, z, tile=space.tile, stride=space.stride, blend=space.blend,
                         keep=space.keep, ttile=time.tile, tstride=time.stride, tblend=time.blend, tkeep=time.keep)
    assert ours.shape == ref.shape and rel_err(ours, ref) <= 1e-6


@torch.no_grad()
def test_tiled_matches_diffusers(params):
    """Temporal + spatial tiling, encode and decode (batch-sliced), vs diffusers' tiling."""
    til = SMALL
    ref = diffusers_vae(CFG, params, til)
    x = torch.randn(2, 3, 21, 88, 72, generator=torch.Generator().manual_seed(5))
    mean, logvar = vae.encode(params, x, cfg=CFG, tiling=til)
    post = ref.encode(x).latent_dist
    assert mean.shape == (2, 16, 6, 11, 9)
    assert rel_err(mean, post.mean) <= 1e-5 and rel_err(logvar, post.logvar) <= 1e-5
    assert rel_err(mean, vae.encode(params, x, cfg=CFG)[0]) > 1e-2  # tiles really were blended
    z = torch.randn(2, 16, 6, 11, 9, generator=torch.Generator().manual_seed(6))
    y = vae.decode(params, z, cfg=CFG, tiling=til, slicing=True)
    assert y.shape == (2, 3, 21, 88, 72) and rel_err(y, ref.decode(z).sample) <= 1e-5


@torch.no_grad()
def test_video_within_one_tile_is_not_tiled(params):
    z = torch.randn(1, 16, 4, 8, 8)  # t <= 16 / 4, h, w <= 64 / 8: upstream runs it whole
    assert torch.equal(vae.decode(params, z, cfg=CFG, tiling=SMALL), vae.decode(params, z, cfg=CFG))


def test_peak_memory_counts_allocations():
    def two_live():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more while a is alive
        del a
        return b

    out, peak = peak_memory(two_live)
    assert 8 << 20 <= peak <= (8 << 20) + 256  # + a few scalar temporaries
    assert tensor_bytes(out) == 4 << 20
    assert peak_memory(lambda: None)[1] == 0


@torch.no_grad()
def test_tiled_decode_memory_is_flat(params):
    """Working memory (peak during the call minus the returned video) as the video grows 7x:
    flat when tiled (one tile's activations), growing with the video untiled."""
    work = {}
    for thw in ((5, 8, 8), (9, 16, 16)):
        z = torch.randn(1, 16, *thw)
        for tiling in (None, SMALL):
            out, peak = peak_memory(lambda z=z, t=tiling: vae.decode(params, z, cfg=CFG, tiling=t))
            work[thw, tiling is not None] = peak - tensor_bytes(out)
    small, big = (5, 8, 8), (9, 16, 16)
    assert work[big, True] <= 1.5 * work[small, True]
    assert work[big, False] >= 4 * work[small, False]
    assert work[big, True] <= 0.3 * work[big, False]


@torch.no_grad()
def test_compiled_nets_match_diffusers_one_graph_per_tile_shape(params):
    """graphs.vae: encoder / decoder compiled (fullgraph, static shapes; frames counted on
    aot_eager), tiled encode + decode equal diffusers' as the eager ones do; a second video of
    the same size compiles nothing new."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from graphs.blocks import Compile
    from graphs.vae import vae_nets

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    enc, dec = vae_nets(Compile(backend="aot_eager"), backend_fn=counter)
    ref = diffusers_vae(CFG, params, SMALL)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 21, 88, 72, generator=g)
    mean, logvar = vae.encode(params, x, cfg=CFG, tiling=SMALL, net=enc)
    post = ref.encode(x).latent_dist
    assert rel_err(mean, post.mean) <= 1e-5 and rel_err(logvar, post.logvar) <= 1e-5
    z = torch.randn(1, 16, 6, 11, 9, generator=g)
    assert rel_err(vae.decode(params, z, cfg=CFG, tiling=SMALL, net=dec), ref.decode(z).sample) <= 1e-5
    frames = counter.frame_count
    assert frames == 16, frames  # one per distinct tile shape (edges, first chunk), encode and decode (docs/vae.md)
    x, z = torch.randn_like(x), torch.randn_like(z)
    assert rel_err(vae.encode(params, x, cfg=CFG, tiling=SMALL, net=enc)[0], ref.encode(x).latent_dist.mean) <= 1e-5
    assert rel_err(vae.decode(params, z, cfg=CFG, tiling=SMALL, net=dec), ref.decode(z).sample) <= 1e-5
    assert counter.frame_count == frames
