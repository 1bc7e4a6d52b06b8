"""LoRA training by param-tree masking: fresh adapters change nothing, only adapters train (no
gradient, no weight-gradient GEMM, no optimizer state, no checkpoint entry for the frozen base),
merged == unmerged, exact resume and loud base mismatch, every layout == one process, export-lora."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import dit_inputs, random_params
from dist import spawn
from reference import rel_err
from test_trainer import _cfg, _raise_from_train, _spawn_train, make_features
from torch.distributed.tensor import Shard
from torch.utils._python_dispatch import TorchDispatchMode

from hvfunc import dit, io, lora, lora_formats
from hvfunc.config import DIT_PRESETS
from parallel import lora_train, plan
from parallel.lora_train import LoraTrain
from parallel.mesh import ParallelConfig

CFG = DIT_PRESETS["tiny-i2v"]
LORA = LoraTrain(enabled=True, rank=4, alpha=8.0)  # scale 2: alpha / r is exercised
SCALE = LORA.alpha / LORA.rank


def _all_linears(cfg):
    """Every linear module of the DiT (plain, fused qkv, linear1 / linear2, embedders, refiner, final)."""
    return lora.LoraConfig(rank=3, alpha=5.0, targets=tuple(lora.official_modules(cfg)))


def test_fresh_adapters_change_nothing_and_merged_equals_unmerged():
    base = random_params(CFG, seed=3)
    kw = dit_inputs(CFG)
    want = dit.forward(base, cfg=CFG, **kw)
    fresh = lora.init_lora(CFG, _all_linears(CFG), generator=torch.Generator().manual_seed(0))
    assert {k.split(".lora_")[0] for k in fresh.tensors} >= {"single_blocks.0.linear1", "single_blocks.0.linear2",
                                                             "single_blocks.0.linear1_qkv", "final_layer.linear"}
    got = dit.forward(lora.scaled(base | fresh.tensors, 5.0 / 3), cfg=CFG, **kw)
    assert torch.equal(got, want)  # B = 0: bit-identical to the base model
    g = torch.Generator().manual_seed(1)
    trained = lora.Lora({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in fresh.tensors.items()}, fresh.alpha)
    unmerged = dit.forward(lora.scaled(base | trained.tensors, 5.0 / 3), cfg=CFG, **kw)
    merged = dit.forward(lora.merge(base, trained), cfg=CFG, **kw)  # official fused W += alpha/r * B @ A
    assert rel_err(unmerged, want) > 1e-2  # the adapters act
    assert rel_err(unmerged, merged) <= 1e-5, rel_err(unmerged, merged)


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(out.shape))
        return out


def test_frozen_base_has_no_weight_gradient_gemm():
    """Backward of the whole model: with the base frozen no matmul produces a base weight's shape
    (36 video + 12 text tokens, batch 1: no activation gradient has one); with it trainable many do."""
    base = random_params(CFG, seed=3)
    adapters = lora.init_lora(CFG, lora.LoraConfig(rank=4), generator=torch.Generator().manual_seed(0)).tensors
    weights = {tuple(v.shape[-2:]) for k, v in base.items() if k.endswith(".weight") and v.dim() >= 2}
    kw = dit_inputs(CFG, B=1, T=3, H=8, W=6, lens=(7,))
    counts = {}
    for frozen in (True, False):
        params = {k: v.clone().requires_grad_(not frozen) for k, v in base.items()}
        params |= {k: v.clone().requires_grad_(True) for k, v in adapters.items()}
        loss = dit.forward(lora.scaled(params, 2.0), cfg=CFG, **kw).square().mean()
        with _MatmulShapes() as mode:
            loss.backward()
        counts[frozen] = sum(s in weights for s in mode.shapes)
        assert all(params[k].grad is None for k in base) == frozen
        assert all(params[k].grad is not None for k in adapters)
    assert counts[True] == 0 and counts[False] >= 40, counts


def test_rank_axis_is_never_sharded():
    """Rank 512 exceeds every dim of the tiny model: the plan would pick it without the rule."""
    spec = lora.lora_spec(DIT_PRESETS["tiny"], lora.LoraConfig(rank=512))
    for fsdp, tp in ((2, 1), (8, 1), (2, 2), (4, 4)):
        meshes = SimpleNamespace(size=lambda a, fsdp=fsdp, tp=tp: {"fsdp": fsdp, "tp": tp}.get(a, 1))
        for k, s in spec.items():
            for p in plan.placements(k, s, meshes):
                assert not (isinstance(p, Shard) and s.axes[p.dim] == "lora"), (k, fsdp, tp)


def test_init_from_file_honours_its_adapters_and_alpha(tmp):
    src = lora.init_lora(CFG, lora.LoraConfig(rank=3, alpha=1.5, targets=("img_attn_qkv", "linear2")))
    g = torch.Generator().manual_seed(2)
    src = lora.Lora({k: torch.randn(v.shape, generator=g).to(torch.bfloat16) for k, v in src.tensors.items()},
                    src.alpha)
    lora_formats.write(src, tmp / "musubi.safetensors", "musubi")
    tune = lora_train.resolve(dataclasses.replace(LORA, init_from=tmp / "musubi.safetensors"), CFG, None, 0)
    assert (tune.adapters.rank, tune.adapters.alpha, tune.scale) == (3, 1.5, 0.5)
    leaves = dict(tune.leaves(0))
    assert leaves.keys() == src.tensors.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, src.tensors[k].float()) for k, v in leaves.items())
    mixed = lora.Lora(src.tensors, dict(src.alpha) | {"double_blocks.0.img_attn_qkv": 3.0})
    lora_formats.write(mixed, tmp / "mixed.safetensors", "official")
    with pytest.raises(ValueError, match=r"mixed.safetensors.*double_blocks.0.img_attn_qkv \(rank 3, alpha 3.0\)"):
        lora_train.resolve(dataclasses.replace(LORA, init_from=tmp / "mixed.safetensors"), CFG, None, 0)


def _spy(rank, world, cfgs, out):
    """train(cfg) for each cfg, recording which leaves have a gradient when the trainer clips (right
    after backward), and at the end: every leaf (whole), its dtype, and the optimizer's state keys."""
    from parallel import optim, trainer

    real_clip, real_loop, runs = optim.clip_, trainer._loop, []

    def clip_(params, max_norm):
        runs[-1]["grads"].append(sorted(k for k, v in params.items() if v.grad is not None))
        if len(runs[-1]["grads"]) == 2:  # step 2's whole gradients (at step 1 B = 0: A's are 0)
            runs[-1]["grad2"] = {k: plan.full({k: v.grad})[k].clone()  # clone: clipping scales in place
                                 for k, v in params.items() if v.grad is not None}
        return real_clip(params, max_norm)

    def loop(fixed, run, batches):
        records = real_loop(fixed, run, batches)
        params, opt = run.params, run.opt
        names = {id(v): k for k, v in params.items()}
        runs[-1] |= {"losses": [r["loss"] for r in records], "final": plan.full({k: v.detach() for k, v in
                                                                                 params.items()}),
                     "state": sorted(names[id(p)] for p, st in opt.state.items() if st),
                     "dtypes": {k: v.dtype for k, v in params.items()}}
        return records

    optim.clip_, trainer._loop = clip_, loop
    for c in cfgs:
        runs.append({"grads": []})
        trainer.train(c)
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(runs, f)


def _spy_runs(world, cfgs, tmp):
    spawn(_spy, world, cfgs, str(tmp / "spy.pkl"))
    with open(tmp / "spy.pkl", "rb") as f:
        return pickle.load(f)


def _lora_cfg(feats, out, base, **kw):
    return _cfg(feats, out, **({"model": "tiny-i2v", "guidance": 6.016, "init_from": base, "lora": LORA, "steps": 3,
                                "checkpoint_every": 3} | kw))


def _base_file(tmp) -> Path:
    io.save_safetensors(random_params(CFG, seed=5), tmp / "base.safetensors")  # live gates: every path trains
    return tmp / "base.safetensors"


def test_only_adapters_train_and_export(tmp):
    """3 steps: gradients, optimizer state and checkpoint entries exist for adapters only; the base is
    bit-identical (and bf16 with --dtype bf16); export-lora (official, comfyui) reads back the trained
    adapters exactly, and merging the export gives the unmerged forward."""
    import torch.distributed.checkpoint as dcp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import convert

    feats, base = make_features(tmp / "feats", task="i2v"), _base_file(tmp)
    run, bf16 = _spy_runs(1, [_lora_cfg(feats, tmp / "a", base), _lora_cfg(feats, tmp / "b", base, dtype="bf16",
                                                                             steps=1)], tmp)
    adapters = sorted(lora.lora_spec(CFG, LORA))
    assert run["grads"] == [adapters] * 3 and run["state"] == adapters
    assert all(math.isfinite(v) for v in run["losses"])
    want = io.load_safetensors(base)
    assert all(torch.equal(run["final"][k], v) for k, v in want.items())  # the base never moved
    assert any(run["final"][k].any() for k in adapters if k.endswith("lora_B"))  # B left zero: trained
    assert {bf16["dtypes"][k] for k in want} == {torch.bfloat16} and {bf16["dtypes"][k] for k in adapters} == {
        torch.float32}
    step = tmp / "a" / "checkpoints" / "step-00000003"
    saved = set(dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    assert saved == {f"params.{k}" for k in adapters} | {f"optim.{k}.{s}" for k in adapters
                                                          for s in ("step", "exp_avg", "exp_avg_sq")}
    trained = lora.Lora({k: run["final"][k] for k in adapters}, {m: LORA.alpha for m in map(lora.module_of, adapters)})
    for fmt in ("official", "comfyui"):
        convert.main(["export-lora", "--checkpoint", str(tmp / "a" / "checkpoints"), "--target",
                      str(tmp / f"{fmt}.safetensors"), "--format", fmt])
        back = lora_formats.read(tmp / f"{fmt}.safetensors")
        assert back.tensors.keys() == trained.tensors.keys() and dict(back.alpha) == dict(trained.alpha), fmt
        assert all(torch.equal(back.tensors[k], v) for k, v in trained.tensors.items()), fmt
    kw = dit_inputs(CFG)
    unmerged = dit.forward(lora.scaled(want | trained.tensors, SCALE), cfg=CFG, **kw)
    merged = dit.forward(lora.merge(want, lora_formats.read(tmp / "official.safetensors")), cfg=CFG, **kw)
    assert rel_err(merged, unmerged) <= 1e-5 and rel_err(unmerged, dit.forward(want, cfg=CFG, **kw)) > 1e-6
    with pytest.raises(SystemExit, match="holds LoRA adapters only .*export-lora"):
        convert.main(["export", "--checkpoint", str(tmp / "a" / "checkpoints"), "--target", str(tmp / "w.pt")])


def test_resume_is_exact_and_other_base_weights_fail(tmp):
    """4 steps == 2 steps, then resumed to 4 (from a moved copy of the base: identity is by content);
    a resume on other base weights raises naming both files."""
    feats, base = make_features(tmp / "feats", task="i2v"), _base_file(tmp)
    moved = tmp / "elsewhere" / "base.safetensors"
    moved.parent.mkdir()
    shutil.copy(base, moved)
    c = {"steps": 4, "checkpoint_every": 2}
    a, _, b2 = _spawn_train(1, [_lora_cfg(feats, tmp / "a", base, **c), _lora_cfg(feats, tmp / "b", base, **(
        c | {"steps": 2})), _lora_cfg(feats, tmp / "b", moved, **c)], tmp)
    assert len(a) == 4 and b2 == a[2:]
    la, _, _ = lora_train.trained_lora(tmp / "a" / "checkpoints")
    lb, _, _ = lora_train.trained_lora(tmp / "b" / "checkpoints")
    assert all(torch.equal(la.tensors[k], lb.tensors[k]) for k in la.tensors)
    data = bytearray(base.read_bytes())  # same size, other values (the last leaf's last bytes)
    data[-64:] = bytes(64)
    (tmp / "other.safetensors").write_bytes(bytes(data))
    msg = (re.escape(f"trained on base weights {moved} ({len(data)} bytes), but this run's base is "
                     f"{tmp / 'other.safetensors'} ({len(data)} bytes): other weights"))
    with pytest.raises(ValueError, match=msg):
        _raise_from_train(_lora_cfg(feats, tmp / "b", tmp / "other.safetensors", steps=5), tmp)
    with pytest.raises(ValueError, match="holds LoRA adapters; this run is full finetuning"):
        _raise_from_train(_lora_cfg(feats, tmp / "b", base, steps=5, lora=LoraTrain()), tmp)


@pytest.mark.slow
def test_i2v_lora_on_dp_cp_tp_sp_equals_one_process(tmp):
    """dp_shard 2 x cp 2 x tp 2 with sequence parallelism (8 ranks), and tp 2 without it (2 ranks),
    against one process on the same global batch (fp32): step 2's gradient of every adapter and the
    losses of 3 steps within 1e-5 (measured <= 5.2e-6), the adapters after them within 1e-4 (measured
    3.5e-5): a B starts at 0, so it is all update, and Adam's early updates are about lr * g / |g| per
    element, which turns the rounding of a near-zero gradient element into an O(lr) difference."""
    feats, base = make_features(tmp / "feats", task="i2v"), _base_file(tmp)
    (ref,) = _spy_runs(1, [_lora_cfg(feats, tmp / "ref", base, batch_size=2)], tmp)
    for world, par, bs in ((8, ParallelConfig(dp_shard=2, cp=2, tp=2, sequence_parallel=True), 1),
                           (2, ParallelConfig(dp_shard=1, tp=2), 2)):
        (run,) = _spy_runs(world, [_lora_cfg(feats, tmp / f"w{world}", base, batch_size=bs, parallel=par)], tmp)
        assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5), (world, run["losses"], ref["losses"])
        for what in ("grad2", "final"):
            errs = {k: float((v - ref[what][k]).norm() / ref[what][k].norm()) for k, v in run[what].items()
                    if k in run["grad2"]}
            worst = max(errs, key=errs.get)
            print(world, what, "worst adapter", worst, f"{errs[worst]:.2e}")
            assert errs[worst] <= (1e-5 if what == "grad2" else 1e-4), (world, what, worst, errs[worst])


def test_lora_memory_table_is_what_the_planner_prints():
    """docs/memory.md's LoRA table: scripts/plan_memory.py --lora's rows; each rank holds its even
    share of the 13B base (12,821,012,544) and of the 326,569,984 adapters (1%)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "plan_memory.py"), "--lora", "--model",
                          "hunyuan-video-i2v"], capture_output=True, text=True, check=True, cwd=root).stdout
    rows = [r for r in out.splitlines() if r.startswith("|")]
    assert len(rows) == 5 and all(r in (root / "docs" / "memory.md").read_text().splitlines() for r in rows)
    for r in rows[2:]:
        cells = r.strip("|").split("|")
        world, base, adapters = (int(cells[i].replace(",", "")) for i in (0, 1, 3))
        assert math.isclose(base * world, 12_821_012_544, rel_tol=1e-2), r
        assert math.isclose(adapters * world, 326_569_984, rel_tol=1e-2), r


def test_lora_presets_follow_their_recipes():
    """hunyuanvideo-official.md section 5 (LoRA): r = alpha = 64, gaussian, the 9 targets, AdamW lr 1e-4,
    betas (0.9, 0.999), eps 1e-8, wd 0, clip 1.0, DeepSpeed WarmupLR from 1e-6 over 500 steps (its log
    shape: lr = min + (max - min) * log(i + 1) / log(500) at iteration i), lognorm t shifted by 7, guidance
    6.0 in bf16 (6.016), bf16. T2V: musubi-tuner's network_dim 32, network_alpha 1, lr 2e-4, shift 7."""
    from test_flow import _train_presets

    from hvfunc.flow import TimestepSampling

    presets = _train_presets()
    i2v, t2v = presets["hunyuan-video-i2v-lora"], presets["hunyuan-video-t2v-lora"]
    lo, o = i2v.lora, i2v.optim
    assert (lo.enabled, lo.rank, lo.alpha, lo.init, lo.init_from) == (True, 64, 64.0, "gaussian", None)
    assert lo.targets == ("linear", "fc1", "fc2", "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj",
                          "linear1", "linear2")
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.grad_clip) == (1e-4, (0.9, 0.999), 1e-8, 0.0, 1.0)
    assert (o.warmup_steps, o.warmup_start_lr, o.schedule) == (500, 1e-6, "constant")
    for i in (0, 1, 7, 250, 499):
        assert math.isclose(o.lr_at(i), 1e-6 + (1e-4 - 1e-6) * math.log(i + 1) / math.log(500), rel_tol=1e-12)
    assert o.lr_at(500) == o.lr_at(10_000) == 1e-4
    assert i2v.timesteps == TimestepSampling(shift=7.0) and i2v.guidance == 6.016 and i2v.dtype == "bf16"
    assert DIT_PRESETS[i2v.model].i2v_condition_type == "token_replace"
    assert (t2v.lora.rank, t2v.lora.alpha, t2v.optim.lr, t2v.timesteps.shift, t2v.guidance) == (32, 1.0, 2e-4, 7.0, 1.0)
    assert t2v.model == "hunyuan-video-t2v" and not any("mod" in t for t in t2v.lora.targets)
    for name in ("tiny-lora", "tiny-i2v-lora"):
        assert presets[name].lora.enabled and presets[name].device == "cpu"
