"""Every parallel layout trains exactly like one process (tiny model, fp32, gloo on CPU),
through the trainer's gather (parallel.gather.BlockGather) and block functions."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import random_params
from dist import spawn

from hvfunc import flow
from hvfunc.config import DIT_PRESETS
from graphs.blocks import make_blocks
from parallel import gather, optim, plan, step
from parallel.mesh import ParallelConfig, build

STEPS, SEED = 3, 7
OPT = optim.OptimConfig(lr=1e-3, grad_clip=0.5, warmup_steps=1, warmup_start_lr=1e-4)
HOW = flow.TimestepSampling(shift=3.0)


def _batch(cfg, ids: list[int]) -> dict:
    """Global samples by id: latents [C, 3, 8, 8] (48 tokens), text lengths 5, 9, 12, 7."""
    lens = [5, 9, 12, 7]
    out = {k: [] for k in ("latents", "text_states", "text_mask", "text_states_2", "cond_latents")}
    for i in ids:
        g = torch.Generator().manual_seed(100 + i)
        out["latents"].append(torch.randn(cfg.in_channels, 3, 8, 8, generator=g))
        out["text_states"].append(torch.randn(12, cfg.text_states_dim, generator=g))
        out["text_mask"].append((torch.arange(12) < lens[i % 4]).long())
        out["text_states_2"].append(torch.randn(cfg.text_states_dim_2, generator=g))
        out["cond_latents"].append(torch.randn(cfg.in_channels, 1, 8, 8, generator=g))
    return {k: torch.stack(v) for k, v in out.items()}


def _train(cfg, params, meshes=None, ids=(0, 1, 2, 3)) -> tuple[list[float], list[float], dict]:
    """STEPS AdamW steps on samples `ids` (this rank's share); meshes=None: one process.
    Returns losses, global gradient norms before clipping (AdamW is nearly blind to a
    constant gradient scale, so a wrong norm would not show in losses), params."""
    trainable = {k: v.requires_grad_(True) for k, v in params.items()}
    opt = optim.make_optimizer(trainable, OPT)
    if meshes is not None:  # the trainer's gather (parallel.gather), blocks as make_blocks builds them
        prepare = gather.BlockGather(plan.tp_split(_spec(cfg)), meshes.cfg.sequence_parallel)
        blocks = make_blocks(prepare=prepare, dtensor_params=True)
    losses, norms = [], []
    for s in range(STEPS):
        batch = _batch(cfg, list(ids))
        sigma, noise = step.sample_noise(list(ids), tuple(batch["latents"].shape[1:]), seed=SEED, step=s, how=HOW)
        guidance = torch.full((len(ids),), 6000.0) if cfg.guidance_embed else None
        if meshes is None:
            sq, n = flow.token_loss(params, batch, sigma, noise, cfg=cfg, guidance=guidance)
            loss, value = sq / n, None
        else:
            loss = step.loss(params, batch, sigma, noise, cfg=cfg, meshes=meshes, guidance=guidance,
                             prepare=prepare, blocks=blocks)
            value = step.global_mean(loss, meshes)
        loss.backward()
        optim.set_lr(opt, OPT.lr_at(s))
        norms.append(_clip(trainable, meshes is not None, check=s == 0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) if value is None else value)
    return losses, norms, params


def _clip(params: dict, sharded: bool, check: bool) -> float:
    """Clip to OPT.grad_clip; returns the norm before. One process: torch's clip_grad_norm_ (the
    reference run is torch's own). Sharded: optim.clip_ on the DTensor gradients; with `check`
    (the first step: a gather per leaf is most of the test's time) also against clip_grad_norm_ on
    the gathered whole gradients (norm and every clipped gradient). Every step's norm is compared
    with the reference run's anyway."""
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(list(params.values()), OPT.grad_clip))
    if not check:
        return optim.clip_(params, OPT.grad_clip)
    whole = {k: torch.zeros(v.shape, requires_grad=True) for k, v in params.items()}
    for k, v in params.items():
        whole[k].grad = v.grad.full_tensor()
    want = float(torch.nn.utils.clip_grad_norm_(list(whole.values()), OPT.grad_clip))
    norm = optim.clip_(params, OPT.grad_clip)
    assert norm == pytest.approx(want, rel=1e-6), (norm, want)
    for k, v in params.items():
        torch.testing.assert_close(v.grad.full_tensor(), whole[k].grad, rtol=1e-6, atol=0, msg=k)
    return norm


LAYOUTS = {
    2: [dict(dp_shard=2), dict(dp_shard=1, cp=2), dict(dp_shard=1, tp=2),
        dict(dp_shard=1, tp=2, sequence_parallel=True)],
    4: [dict(dp_shard=2, cp=2), dict(dp_shard=2, tp=2), dict(dp_shard=1, cp=2, tp=2),
        dict(dp_replicate=2, dp_shard=2), dict(dp_shard=1, cp=2, tp=2, sequence_parallel=True),
        # 2 samples per data rank: text lengths 5 and 9 -> 9 tokens, padded to 10 for the tp split
        dict(dp_shard=2, tp=2, sequence_parallel=True)],
}


def _worker(rank, world, names, out_dir):
    torch.manual_seed(0)
    for name in names:
        cfg = DIT_PRESETS[name]
        for layout in LAYOUTS[world]:
            meshes = build(ParallelConfig(**layout))
            full = random_params(cfg, seed=3, scale=0.1)
            params = plan.shard(full, plan.plan({k: _spec(cfg)[k] for k in full}, meshes), meshes)
            per_rank = 4 // meshes.data_world
            ids = list(range(meshes.data_rank * per_rank, (meshes.data_rank + 1) * per_rank))
            losses, norms, params = _train(cfg, params, meshes, ids)
            final = plan.full(params)
            if rank == 0:
                with open(f"{out_dir}/{name}-{world}-{sorted(layout.items())}.pkl", "wb") as f:
                    pickle.dump((losses, norms, {k: v.detach() for k, v in final.items()}), f)


def _spec(cfg):
    from hvfunc.dit_spec import dit_spec

    return dit_spec(cfg)


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_one_process(world, tmp):
    names = ["tiny", "tiny-i2v"]
    spawn(_worker, world, names, str(tmp))
    for name in names:
        cfg = DIT_PRESETS[name]
        ref_losses, ref_norms, ref = _train(cfg, random_params(cfg, seed=3, scale=0.1))
        assert min(ref_norms) > OPT.grad_clip  # clipping acts on every step
        for layout in LAYOUTS[world]:
            with open(tmp / f"{name}-{world}-{sorted(layout.items())}.pkl", "rb") as f:
                losses, norms, final = pickle.load(f)
            assert losses == pytest.approx(ref_losses, rel=1e-5), (name, layout)
            assert norms == pytest.approx(ref_norms, rel=1e-5), (name, layout)
            errs = {k: float((v - ref[k].detach()).norm() / ref[k].detach().norm()) for k, v in final.items()}
            worst = max(errs, key=errs.get)
            print(name, layout, "worst leaf", worst, f"{errs[worst]:.2e}")
            assert errs[worst] <= 1e-5, (name, layout, worst, errs[worst])
