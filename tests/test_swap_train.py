"""Block swap and fp8 storage of LoRA's frozen base in training (parallel/memory_train.py): swapped
training equals resident training bit for bit (losses, step-2 adapter gradients, final adapters; T2V
and I2V, eager and aot_eager, with recompute and eager offload; FSDP and tp (+ sequence parallel) on 2
ranks, with fp8 too; the same 2 ranks check swapped sampling with cp 2, test_swap.cp2_runs); the copies follow the
forward order, then the backward's reverse order, and every fetched or refetched weight holds its
own block's bytes; fp8 keeps the loss within its stated bound of bf16 in half the frozen bytes;
full finetuning and compiled offload are refused. Each group of runs is one spawned process group."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import random_params
from dist import spawn
from test_lora_train import LORA
from test_trainer import _cfg, make_features

from graphs import fp8
from graphs.blocks import Compile
from graphs.recompute import Recompute
from graphs.swap import MemoryConfig
from hvfunc import io
from hvfunc.config import DIT_PRESETS
from parallel.mesh import ParallelConfig

pytestmark = pytest.mark.skipif(fp8.FP8 is None, reason="torch without float8_e4m3fn")

SWAP = MemoryConfig(blocks_to_swap=3)  # tiny: double 1, single 0, single 1 (double 0 stays)
D1, S0, S1 = "double_blocks.1.", "single_blocks.0.", "single_blocks.1."


def _instrument(swap, rec: dict) -> None:
    """Record the copy order; check that every fetched (forward, recompute) or unpacked (backward)
    weight holds the bytes of the block it is handed to."""
    swap.events = rec["events"] = []
    rec["checked"], rec["wrong"] = 0, 0
    fetch, unpack = swap.fetch, swap._unpack

    def check(a, b) -> None:
        rec["checked"] += 1
        rec["wrong"] += not torch.equal(a.float(), b.float())

    def fetched(pre, p):
        out = fetch(pre, p)
        for k, v in out.items():
            check(v, p[k])  # p: the host views
        return out

    def unpacked(x):
        out = unpack(x)
        if out is not x:
            check(out, swap.host[x.pre].view(x.dtype).as_strided(x.shape, x.stride, x.offset))
        return out

    swap.fetch, swap._unpack = fetched, unpacked


def _worker(rank, world, runs, out, extra=None):
    """trainer.train for each (name, cfg); records losses, the last step's whole adapter gradients,
    the final adapters, this rank's stored bytes per frozen leaf and (swapped runs) the copy events.
    extra(rank) -> dict: more checks run in the same process group, merged into what rank 0 returns."""
    from parallel import memory_train, optim, plan, trainer

    real_clip, real_loop, real_finish, got = optim.clip_, trainer._loop, memory_train.FrozenStore.finish, {}

    def clip_(params, max_norm):
        got[name]["grads"] = {k: plan.full({k: v.grad})[k].clone() for k, v in params.items() if v.grad is not None}
        return real_clip(params, max_norm)

    def loop(fixed, run, batches):
        records = real_loop(fixed, run, batches)
        trained = {k: v.detach() for k, v in run.params.items() if v.requires_grad}
        frozen = {k: getattr(v, "to_local", lambda v=v: v)() for k, v in run.params.items() if not v.requires_grad}
        got[name] |= {"losses": [r["loss"] for r in records], "final": plan.full(trained),
                      "bytes": {k: v.nbytes for k, v in frozen.items()}, "dtypes": {k: v.dtype for k, v in frozen.items()}}
        return records

    def finish(self, params, device):
        params = real_finish(self, params, device)
        if self.swap is not None:
            _instrument(self.swap, got[name])
        return params

    optim.clip_, trainer._loop, memory_train.FrozenStore.finish = clip_, loop, finish
    for name, cfg in runs:
        torch._dynamo.reset()
        got[name] = {}
        trainer.train(cfg)
    if extra is not None:
        got |= extra(rank)
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(got, f)


def _spawn(world: int, runs: list, tmp: Path, extra=None) -> dict:
    spawn(_worker, world, runs, str(tmp / "got.pkl"), extra)
    with open(tmp / "got.pkl", "rb") as f:
        return pickle.load(f)


def _setup(tmp: Path, model: str) -> dict:
    """One feature sample (one shape: one compile per block kind) and a random base (live gates)."""
    task = "i2v" if DIT_PRESETS[model].i2v_condition_type else "t2v"
    io.save_safetensors(random_params(DIT_PRESETS[model], seed=5), tmp / f"{model}.safetensors")
    return {"features": make_features(tmp / f"feats-{model}", n=1, task=task), "model": model,
            "init_from": tmp / f"{model}.safetensors", "lora": LORA, "steps": 2, "checkpoint_every": 2}


def _run(tmp: Path, name: str, model: str, **kw):
    base = _setup(tmp, model) | ({"guidance": 6.016} if "i2v" in model else {})
    return name, _cfg(out=tmp / name, **(base | kw))


def _same(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"]
    assert a["grads"].keys() == b["grads"].keys() and all(torch.equal(v, b["grads"][k]) for k, v in a["grads"].items())
    assert a["final"].keys() == b["final"].keys() and all(torch.equal(v, b["final"][k]) for k, v in a["final"].items())


FWD1 = [("copy", D1), ("copy", S0), ("run", D1), ("copy", S1), ("run", S0), ("run", S1)]  # first step's forward
FWD2 = [("run", D1), ("copy", S1), ("run", S0), ("run", S1)]  # later forwards: double 1 is still in its slot
# backward: the last block is still in its slot and the one before it in the other; each block then
# starts the previous one's copy. Without recompute the backward unpacks saved slot views (refetch
# on unpack); with recompute the recompute forward fetches.
UNPACK = [("unpack", S1), ("copy", D1), ("unpack", S0), ("unpack", D1)]
REFETCH = [("run", S1), ("copy", D1), ("run", S0), ("run", D1)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("swap_train")
    rc = Recompute(double_full=1, selective=True)  # double 0 full, the others selective
    off = Recompute(selective=True, offload=True)  # eager: attention outputs through host memory
    aot = Compile(backend="aot_eager", dynamic=False)
    runs = [_run(tmp, "t2v", "tiny"), _run(tmp, "t2v-swap", "tiny", memory=SWAP),
            _run(tmp, "i2v-rc", "tiny-i2v", recompute=rc),
            _run(tmp, "i2v-rc-swap", "tiny-i2v", recompute=rc, memory=SWAP),
            _run(tmp, "t2v-off", "tiny", recompute=off), _run(tmp, "t2v-off-swap", "tiny", recompute=off, memory=SWAP),
            _run(tmp, "t2v-aot-rc", "tiny", recompute=rc, compile=aot),
            _run(tmp, "t2v-aot-rc-swap", "tiny", recompute=rc, compile=aot, memory=SWAP),
            _run(tmp, "i2v-bf16", "tiny-i2v", dtype="bf16"),
            _run(tmp, "i2v-fp8", "tiny-i2v", dtype="bf16", memory=MemoryConfig(fp8_weights=True)),
            _run(tmp, "i2v-fp8-swap", "tiny-i2v", dtype="bf16", memory=MemoryConfig(fp8_weights=True, blocks_to_swap=3))]
    return _spawn(1, runs, tmp)


@pytest.mark.parametrize("plain,swapped", [("t2v", "t2v-swap"), ("i2v-rc", "i2v-rc-swap"), ("t2v-off", "t2v-off-swap"),
                                           ("t2v-aot-rc", "t2v-aot-rc-swap"), ("i2v-fp8", "i2v-fp8-swap")])
def test_swapped_lora_training_equals_resident_bit_for_bit(single, plain, swapped):
    _same(single[plain], single[swapped])
    assert any(v.any() for k, v in single[plain]["final"].items() if k.endswith("lora_B"))  # the adapters trained


@pytest.mark.parametrize("name,backward", [("t2v-swap", UNPACK), ("i2v-rc-swap", REFETCH), ("t2v-off-swap", REFETCH),
                                           ("t2v-aot-rc-swap", UNPACK), ("i2v-fp8-swap", UNPACK)])
def test_copies_follow_the_forward_then_the_backward_and_blocks_see_their_own_weights(single, name, backward):
    rec = single[name]
    assert rec["events"] == FWD1 + backward + FWD2 + backward, rec["events"]
    assert rec["checked"] > 0 and rec["wrong"] == 0


def test_fp8_frozen_base_in_half_the_bytes_and_the_loss_within_its_bound(single):
    bf16, f8 = single["i2v-bf16"], single["i2v-fp8"]
    lin = [k for k, dt in f8["dtypes"].items() if dt == fp8.FP8]
    assert lin and all(bf16["dtypes"][k] == torch.bfloat16 for k in lin)
    assert all(k.startswith(fp8.BLOCKS) for k in lin) and all(f8["dtypes"][k + fp8.SCALE] == torch.float32 for k in lin)
    assert sum(f8["bytes"][k] for k in lin) * 2 == sum(bf16["bytes"][k] for k in lin)
    assert all(f8["bytes"][k] == v for k, v in bf16["bytes"].items() if k not in lin)  # norms, biases, embedders
    # bound (docs/memory.md): every weight moves by at most 2^-4 of itself (+ the subnormal floor), so
    # the loss may move by about that much relative; the first step's loss (adapters still inert)
    rel = [abs(a - b) / abs(b) for a, b in zip(f8["losses"], bf16["losses"])]
    print(f"fp8 vs bf16 frozen base: loss rel diff per step {rel}")
    assert 0 < rel[0] <= 2.0**-4


def test_two_rank_swapped_training_equals_resident_and_cp2_sampling_too(tmp):
    """dp_shard 2: every frozen leaf a shard, its host copy the local shard, gathered after the copy.
    bf16 with full recompute (the recompute fetches again, in the backward's order); fp8 without
    recompute, where autograd keeps the gathered (fresh) weights, so the backward refetches nothing.
    tp 2: the swapped host copy is the tp shard (column / row split), the block's tp collectives run on
    the fetched views; with recompute (refetch) and, with sequence parallel, fp8 (the scale replicated
    where the weight splits its input dim) without recompute. The same group then samples with cp 2
    (test_swap.cp2_runs): swap and fp8 + swap give cp 2 resident's and cp 2 fp8's latents bit for bit."""
    from test_swap import cp2_runs

    fsdp = {"parallel": ParallelConfig(dp_shard=2), "global_batch_size": None}
    tp, tp_sp = ({"parallel": ParallelConfig(dp_shard=1, tp=2, sequence_parallel=sp)} for sp in (False, True))
    rc = {"recompute": Recompute(double_full=2, single_full=2)}
    f8, f8_swap = MemoryConfig(fp8_weights=True), MemoryConfig(fp8_weights=True, blocks_to_swap=3)
    runs = [_run(tmp, "fsdp", "tiny-i2v", **rc, **fsdp), _run(tmp, "fsdp-swap", "tiny-i2v", memory=SWAP, **rc, **fsdp),
            _run(tmp, "fsdp-fp8", "tiny-i2v", memory=f8, **fsdp), _run(tmp, "fsdp-fp8-swap", "tiny-i2v", memory=f8_swap, **fsdp),
            _run(tmp, "tp", "tiny", **rc, **tp), _run(tmp, "tp-swap", "tiny", memory=SWAP, **rc, **tp),
            _run(tmp, "tp-sp-fp8", "tiny", memory=f8, **tp_sp), _run(tmp, "tp-sp-fp8-swap", "tiny", memory=f8_swap, **tp_sp)]
    got = _spawn(2, runs, tmp, cp2_runs)
    for plain in ("fsdp", "fsdp-fp8", "tp", "tp-sp-fp8"):
        _same(got[plain], got[plain + "-swap"])
    assert got["fsdp-swap"]["events"] == got["tp-swap"]["events"] == FWD1 + REFETCH + FWD2 + REFETCH
    # fp8: autograd keeps the upcast (fresh) weights, so no refetch: step 2 starts from an empty-looking ring
    assert got["fsdp-fp8-swap"]["events"] == got["tp-sp-fp8-swap"]["events"] == FWD1 + FWD1
    swapped = ("fsdp-swap", "fsdp-fp8-swap", "tp-swap", "tp-sp-fp8-swap")
    assert all(got[k]["checked"] > 0 and got[k]["wrong"] == 0 for k in swapped)
    assert any(v.any() for k, v in got["tp"]["final"].items() if k.endswith("lora_B"))  # the adapters trained
    assert torch.equal(got["cp2-swap"], got["cp2-resident"]) and torch.equal(got["cp2-fp8-swap"], got["cp2-fp8"])
    assert not torch.equal(got["cp2-fp8"], got["cp2-resident"])  # fp8 did store the weights in fp8


@pytest.mark.parametrize("kw,message", [
    ({"lora": False}, "full finetuning (no --lora.enabled) freezes none"),
    ({"compile": Compile(backend="aot_eager"), "recompute": Recompute(selective=True, offload=True)},
     "--recompute.offload is not built"),
    ({"mem": MemoryConfig(blocks_to_swap=5)}, "--memory.blocks-to-swap 5 is outside 0..4"),
])
def test_memory_settings_that_cannot_work_are_refused(kw, message):
    import re

    from parallel import lora_train, memory_train

    model = DIT_PRESETS["tiny"]
    tune = lora_train.resolve(LORA, model, None, 0) if kw.pop("lora", True) else lora_train.Tuning(None)
    args = {"mem": SWAP, "compile": Compile(), "recompute": Recompute()} | kw
    with pytest.raises(ValueError, match=re.escape(message)):
        memory_train.frozen_store(args.pop("mem"), model, tune, split=frozenset(), sp=False, **args)
    assert memory_train.frozen_store(MemoryConfig(), model, tune, split=frozenset(), sp=False, compile=Compile(),
                                     recompute=Recompute()) is None



@pytest.mark.parametrize("preset,code", [("tiny-lora", 0), ("tiny", 2)])
def test_memory_flags_through_train_py(tmp, preset, code):
    """tiny-lora trains a step with both flags (config.json records them); full finetuning is refused
    with one error line."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    feats = make_features(tmp / "feats", n=1)
    r = subprocess.run([sys.executable, "scripts/train.py", preset, "--features", str(feats), "--out", str(tmp / "o"),
                        "--steps", "1", "--memory.blocks-to-swap", "2", "--memory.fp8-weights"], check=False,
                       cwd=root,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == code, r.stderr[-2000:]
    if code:
        assert r.stderr.strip().splitlines()[-1].startswith("error: --memory.blocks-to-swap 2 --memory.fp8-weights "
                                                            "stores frozen weights, and full finetuning")
    else:
        assert json.loads((tmp / "o" / "config.json").read_text())["memory"] == {"blocks_to_swap": 2, "fp8_weights": True}
