"""Global batch with gradient accumulation: micro batches x accumulation == ranks x micro batch ==
one process with the whole batch (losses and parameters), also under tp and cp; bad sizes fail first."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_trainer import _cfg, _final_params, _spawn_train, make_features

from hvfunc.config import DIT_PRESETS
from parallel.mesh import ParallelConfig
from parallel.trainer import _accumulation


def test_accumulation_equals_the_whole_batch(tmp):
    """4 samples per optimizer step, 2 steps, fp32: 1 process x batch 4 (reference), 1 process x micro 1 x
    4 accumulation steps, 2 dp ranks x micro 2, tp 2 x micro 1 x 4 accumulation steps, cp 2 x micro 2 x 2
    accumulation steps (cp ranks share their samples: data-parallel size 1)."""
    feats = make_features(tmp / "feats", n=8)  # 4 samples of each latent shape: one bucket per step
    runs = {"whole": (1, dict(batch_size=4)), "accum": (1, dict(batch_size=1, global_batch_size=4)),
            "dp2": (2, dict(batch_size=2, parallel=ParallelConfig(dp_shard=2))),
            "tp2": (2, dict(batch_size=1, global_batch_size=4, parallel=ParallelConfig(tp=2))),
            "cp2": (2, dict(batch_size=2, global_batch_size=4, parallel=ParallelConfig(cp=2)))}
    losses = {name: _spawn_train(world, [_cfg(feats, tmp / name, steps=2, **kw)], tmp)[0]
              for name, (world, kw) in runs.items()}
    ref = _final_params(tmp / "whole")
    start = _init_params()
    assert any(float((ref[k] - start[k]).norm()) > 1e-4 for k in ref)  # the steps moved the weights
    for name in runs:
        assert losses[name] == pytest.approx(losses["whole"], rel=1e-5), name
        got = _final_params(tmp / name)
        for k in ref:
            assert float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)) <= 1e-5, (name, k)
        recs = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["samples"] for r in recs] == [4, 4], name  # per optimizer step, over all ranks
        # 4 samples of 8 x 8 latents with 2 or 3 frames, patch (1, 2, 2): 4 x 16 x frames video tokens
        assert {r["tokens"] for r in recs} == {4 * 2 * 16, 4 * 3 * 16}, name


def _init_params() -> dict:
    from hvfunc.dit_spec import dit_spec
    from hvfunc.params import init_leaves

    return dict(init_leaves(dit_spec(DIT_PRESETS["tiny"]), generator=torch.Generator().manual_seed(0)))


def test_global_batch_must_divide_into_micro_batches():
    cfg = SimpleNamespace(batch_size=2, global_batch_size=None)
    assert _accumulation(cfg, 4) == 1  # None: micro batch x dp, no accumulation
    assert _accumulation(SimpleNamespace(batch_size=2, global_batch_size=16), 4) == 2
    for g in (6, 0, -8):
        with pytest.raises(ValueError, match=rf"--global-batch-size {g} is not a positive multiple of --batch-size 2 "
                                             r"x data-parallel size 4 = 8"):
            _accumulation(SimpleNamespace(batch_size=2, global_batch_size=g), 4)
