"""Block swap on CUDA: the copies run on the side stream while blocks compute, and the peak
device memory drops by the swapped blocks' bytes less the 2-slot ring; same output bits.
Sampling (graphs.swap.store) and LoRA training (train(), parallel/memory_train.py)."""

import pytest
import torch
from conftest import dit_inputs, random_params
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from graphs.blocks import make_blocks
from graphs.memory import peak_memory
from graphs.swap import MemoryConfig, block_prefixes, store
from hvfunc import dit
from hvfunc.config import DIT_PRESETS
from parallel.trainer import TrainConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CFG = DIT_PRESETS["tiny"].replace(hidden_size=1024, heads_num=8, rope_dim_list=(16, 56, 56),
                                  mm_double_blocks_depth=2, mm_single_blocks_depth=8)
N_SWAP = 8  # the single blocks (31 MB each in bf16)


def _intervals(prof) -> tuple[list, list]:
    """(host -> device copies, compute kernels) as (start, end) us on the device timeline."""
    copies, kernels = [], []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        if "Memcpy HtoD" in e.name:
            copies.append(span)
        elif not e.name.startswith(("Memcpy", "Memset")):
            kernels.append(span)
    return copies, kernels


def _overlap(copies: list, kernels: list) -> float:
    """Copy time (us) during which some kernel runs (kernels merged into disjoint spans first)."""
    merged = []
    for s, e in sorted(kernels):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return sum(max(0, min(e, me) - max(s, ms)) for s, e in copies for ms, me in merged)


def test_swap_overlaps_copies_with_compute_and_frees_the_swapped_bytes():
    params = random_params(CFG, scale=0.02, dtype=torch.bfloat16)
    inp = {k: v.cuda() if isinstance(v, torch.Tensor) else v
           for k, v in dit_inputs(CFG, B=1, lens=(12,), T=8, H=64, W=64).items()}
    swapped = block_prefixes(CFG)[-N_SWAP:]
    swapped_bytes = sum(v.nbytes for k, v in params.items() if k.startswith(tuple(swapped)))

    def resident():
        p = {k: v.cuda() for k, v in params.items()}
        return dit.forward(p, **inp, cfg=CFG, blocks=make_blocks())

    def swapping():
        st = store(params, MemoryConfig(blocks_to_swap=N_SWAP), cfg=CFG, device="cuda", dtype=torch.bfloat16)
        assert all(b.is_pinned() for b in st.swap.host.values())
        return dit.forward(st.params, **inp, cfg=CFG, blocks=st.swap.wrap(make_blocks())), st

    with torch.no_grad():
        want, peak_res = peak_memory(resident, device="cuda")
        (got, st), peak_swap = peak_memory(swapping, device="cuda")
        assert torch.equal(got, want)
        ring = 2 * st.swap.slot_bytes
        dit.forward(st.params, **inp, cfg=CFG, blocks=st.swap.wrap(make_blocks()))  # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            dit.forward(st.params, **inp, cfg=CFG, blocks=st.swap.wrap(make_blocks()))
            torch.cuda.synchronize()
    copies, kernels = _intervals(prof)
    copy_us, kernel_us, both_us = sum(e - s for s, e in copies), sum(e - s for s, e in kernels), _overlap(copies, kernels)
    print(f"peak: resident {peak_res / 2**20:.0f} MiB, swap {peak_swap / 2**20:.0f} MiB, swapped blocks "
          f"{swapped_bytes / 2**20:.0f} MiB, ring {ring / 2**20:.0f} MiB; copies {len(copies)} {copy_us:.0f} us, "
          f"kernels {kernel_us:.0f} us, copy time under compute {both_us:.0f} us")
    assert peak_res - peak_swap >= swapped_bytes - ring - 0.05 * swapped_bytes
    assert len(copies) >= N_SWAP
    assert both_us >= 0.2 * min(copy_us, kernel_us)


def _train(tmp, feats, name: str, mem: MemoryConfig) -> dict:
    """Two LoRA steps of CFG (bf16 frozen base, math attention: a deterministic backward) through
    trainer.train on this process's CUDA device; the loop's peak allocated bytes, losses, final
    adapters, the host (swapped) frozen bytes, the ring and (swapped) the profile of the loop."""
    from test_lora_train import LORA
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from parallel import memory_train, plan, trainer

    got = {"ring": 0, "host": 0}
    real_loop, real_finish = trainer._loop, memory_train.FrozenStore.finish

    def finish(self, params, device):
        params = real_finish(self, params, device)
        if self.swap is not None:  # host: the swapped blocks' frozen bytes (leaves 256-byte aligned)
            got.update(ring=2 * self.swap.slot_bytes, host=sum(b.nbytes for b in self.swap.host.values()))
        return params

    def loop(fixed, run, batches):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            records = real_loop(fixed, run, batches)
            torch.cuda.synchronize()
        got.update({"peak": torch.cuda.max_memory_allocated(), "prof": prof, "losses": [r["loss"] for r in records],
                    "final": plan.full({k: v.detach() for k, v in run.params.items() if v.requires_grad})})
        return records

    cfg = TrainConfig(features=feats, out=tmp / name, model="gpu-wide", steps=2, batch_size=1, dtype="bf16",
                      device="cuda", checkpoint_every=100, lora=LORA, memory=mem)
    with pytest.MonkeyPatch.context() as m, sdpa_kernel(SDPBackend.MATH):
        m.setattr(trainer, "_loop", loop)
        m.setattr(memory_train.FrozenStore, "finish", finish)
        trainer.train(cfg)
    return got


def test_training_swap_overlaps_copies_and_frees_the_swapped_frozen_bytes(tmp, monkeypatch):
    """A LoRA step with the 8 single blocks' frozen weights swapped: same losses and adapters bit for
    bit; the loop's peak drops by the swapped frozen bytes less the 2-slot ring, within 5% of the
    swapped bytes (both runs allocate the same activations, adapters and AdamW state in the same order;
    the caching allocator rounds blocks and splits segments differently around the weights that moved);
    some host -> device copy time runs under compute kernels."""
    import torch.distributed as dist
    from test_trainer import make_features

    monkeypatch.setitem(DIT_PRESETS, "gpu-wide", CFG)
    feats = make_features(tmp / "feats", n=1)
    try:
        res = _train(tmp, feats, "resident", MemoryConfig())
        swp = _train(tmp, feats, "swap", MemoryConfig(blocks_to_swap=N_SWAP))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert res["host"] == 0 and swp["host"] > 0
    assert swp["losses"] == res["losses"]
    assert swp["final"].keys() == res["final"].keys()
    assert all(torch.equal(v, res["final"][k]) for k, v in swp["final"].items())
    copies, kernels = _intervals(swp["prof"])
    copy_us, kernel_us, both_us = sum(e - s for s, e in copies), sum(e - s for s, e in kernels), _overlap(copies, kernels)
    drop, want = res["peak"] - swp["peak"], swp["host"] - swp["ring"]
    print(f"training peak: resident {res['peak'] / 2**20:.0f} MiB, swap {swp['peak'] / 2**20:.0f} MiB, swapped frozen "
          f"{swp['host'] / 2**20:.0f} MiB, ring {swp['ring'] / 2**20:.0f} MiB; copies {len(copies)} {copy_us:.0f} us, "
          f"kernels {kernel_us:.0f} us, copy time under compute {both_us:.0f} us")
    assert abs(drop - want) <= 0.05 * swp["host"], (drop, want)
    assert len(copies) >= 2 * N_SWAP  # each step's forward copies every swapped block (the backward may refetch)
    assert both_us >= 0.2 * min(copy_us, kernel_us)
