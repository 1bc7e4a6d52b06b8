"""Compiled and static-buffer sampling steps give eager results; compiles do not grow with steps."""

import pytest
import torch
from conftest import random_params
from reference import rel_err
from test_sample import B, H, T, W, _conds
from torch._dynamo.testing import CompileCounterWithBackend

from graphs import sampling
from hvfunc import dit, sample
from hvfunc.config import DIT_PRESETS

TOL = 1e-5
CFG = DIT_PRESETS["tiny-i2v"]  # every path at once: frame-0 modulation, image latents, real CFG (2B)


def _run(steps: int, denoise=sampling.denoise, **kw) -> torch.Tensor:
    params = random_params(CFG, seed=0, scale=0.1)
    cond, uncond = _conds(CFG)
    g = torch.Generator().manual_seed(2)
    noise, z = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 16, 1, H, W, generator=g)
    s = sample.Sampling(steps=steps, cfg_scale=3.0, guidance_rescale=0.5)
    return denoise(params, noise, cond, uncond, cfg=CFG, sampling=s, image_latents=z, **kw)


def test_compiled_sampling_matches_eager_and_compiles_once_for_any_step_count():
    counts = []
    for steps in (2, 5):
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        got = _run(steps, graphs=sampling.SampleGraphs(backend="aot_eager"), backend_fn=cnt)  # fullgraph=True
        assert rel_err(got, _run(steps)) <= TOL
        counts.append(cnt.frame_count)
    assert counts[0] == counts[1] == 2, counts  # one graph per block kind, whatever the step count


def test_static_buffer_runner_matches_eager():
    """The CUDA-graph runner's buffer plumbing on CPU: `capture` returns fn itself, so every step
    replays the step-0 closure; only the copies into its buffers bring each step's inputs."""
    captured = []

    def capture(fn):
        captured.append(fn)
        return fn

    got = _run(4, sample.denoise, runner=lambda step: sampling.static_runner(step, capture))
    assert len(captured) == 1
    assert rel_err(got, _run(4)) <= TOL


def test_static_runner_rejects_changed_shapes_and_cuda_graph_needs_cuda():
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg)
    cond, _ = _conds(cfg)
    step = sample.make_step(params, cond, cfg=cfg)
    run = sampling.static_runner(step, capture=lambda fn: fn)
    x, t, dt = torch.randn(B, 16, T, H, W), torch.tensor(900.0), torch.tensor(-0.1)
    run(x, t, dt)
    with pytest.raises(ValueError, match="fixed inputs"):
        run(torch.randn(B, 16, T, H + 2, W), t, dt)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        sampling.denoise(params, x, cond, cfg=cfg, graphs=sampling.SampleGraphs(cuda_graph=True))


def test_the_whole_step_reads_nothing_on_the_host():
    """What a CUDA graph needs of the whole step: it traces as one graph with fullgraph=True
    (a host read of a tensor - int(), bool(), .item() - is a graph break, which fullgraph
    makes an error) and gives eager results; embed reading the text lengths itself cannot."""
    params = random_params(CFG, seed=0, scale=0.1)
    cond, uncond = _conds(CFG)  # unequal text lengths: the key-mask path
    z = torch.randn(B, 16, 1, H, W)
    step = sample.make_step(params, cond, uncond, cfg=CFG, sampling=sample.Sampling(cfg_scale=3.0), image_latents=z)
    x, t, dt = torch.randn(B, 16, T, H, W), torch.tensor(900.0), torch.tensor(-0.1)
    torch._dynamo.reset()
    got = torch.compile(lambda x, t, dt: step(x, t, dt), backend="eager", fullgraph=True)(x, t, dt)
    assert rel_err(got, step(x, t, dt)) <= TOL

    def embed(layout):
        return lambda x, t: dit.embed(params, x, t, **cond, cfg=CFG, guidance=t * 6, layout=layout).txt

    lay = dit.text_layout(cond["text_mask"])
    assert lay == dit.TextLayout(keep=9, full=False)
    torch.compile(embed(lay), backend="eager", fullgraph=True)(x, t.expand(B))
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):  # a data-dependent size or a graph break
        torch.compile(embed(None), backend="eager", fullgraph=True)(x, t.expand(B))
