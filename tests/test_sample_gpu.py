"""Sampling on CUDA: the CUDA-graph step (eager or Inductor blocks) equals eager sampling (fp32)."""

import pytest
import torch
from conftest import random_params
from reference import rel_err
from test_sample import B, H, T, W, _conds

from graphs import sampling
from hvfunc import sample
from hvfunc.config import DIT_PRESETS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"
TOL = 1e-5


def _run(cfg, graphs: sampling.SampleGraphs, *, cfg_scale: float = 1.0, steps: int = 4) -> torch.Tensor:
    params = {k: v.to(DEV) for k, v in random_params(cfg, seed=0, scale=0.1).items()}
    cond, uncond = ({k: v.to(DEV) for k, v in c.items()} for c in _conds(cfg))
    g = torch.Generator().manual_seed(2)
    noise, z = torch.randn(B, 16, T, H, W, generator=g).to(DEV), torch.randn(B, 16, 1, H, W, generator=g).to(DEV)
    s = sample.Sampling(steps=steps, cfg_scale=cfg_scale, guidance_rescale=0.5 if cfg_scale > 1 else 0.0)
    i2v = cfg.i2v_condition_type is not None
    return sampling.denoise(params, noise, cond, uncond, cfg=cfg, sampling=s, image_latents=z if i2v else None,
                            graphs=graphs)


@pytest.mark.parametrize("name, cfg_scale", [("tiny", 1.0), ("tiny-i2v", 3.0)])
def test_cuda_graph_step_matches_eager(name, cfg_scale):
    cfg = DIT_PRESETS[name]
    eager = _run(cfg, sampling.SampleGraphs(), cfg_scale=cfg_scale)
    graph = _run(cfg, sampling.SampleGraphs(cuda_graph=True), cfg_scale=cfg_scale)
    assert graph.device.type == "cuda" and graph.dtype == torch.float32
    assert rel_err(graph, eager) <= TOL, rel_err(graph, eager)


@pytest.mark.slow
def test_inductor_blocks_in_cuda_graph_match_eager():
    torch._dynamo.reset()
    cfg = DIT_PRESETS["tiny-i2v"]
    eager = _run(cfg, sampling.SampleGraphs(), cfg_scale=3.0)
    fast = _run(cfg, sampling.SampleGraphs(backend="inductor", cuda_graph=True), cfg_scale=3.0)
    assert rel_err(fast, eager) <= TOL, rel_err(fast, eager)
