"""The training loop: flow matching on extracted features over a (dp, cp, tp) mesh.

One function, `train(cfg)`, used by scripts/train.py and the tests. Per optimizer step: a
global batch from the bucket sampler (one shape on every rank), per-sample sigma / noise / text
and image dropout drawn from the sampler's per-draw seeds (so every layout sees the same numbers),
then per micro batch the sharded loss and its backward, global-norm clipping, AdamW with
fp32 master weights, then the EMA (parallel.ema) when on.

Gradient accumulation (--global-batch-size G): each rank takes its G / dp samples at once and
runs them as G / (micro x dp) micro batches of --batch-size. Each micro batch's loss is divided
by the global element count of the whole step, so the summed gradients are those of one
process with the whole batch. The FSDP reduce-scatter (HSDP all-reduce) stays in the gather's
backward and runs once per micro batch, its sharded fp32 result summed into .grad: exact (a sum
of reduce-scatters is the reduce-scatter of the sum, up to fp32 rounding order) and keeping
FSDP's memory. Deferring it to once per step would need an unsharded fp32 gradient buffer per
rank (the whole trainable model, 51 GB at 13B) or per-block buffers kept across micro batches;
we chose the collective per micro batch and have not measured the alternative. Non-finite losses or gradients skip the step (counted); too many in
a row save a checkpoint and stop with a clear message. Checkpoints every N steps and on
SIGTERM; `metrics.jsonl` gets one record per step. What trains is a mask over leaf names
(parallel.lora_train): every leaf, or LoRA adapters on frozen base weights; checkpoints hold
the trainable leaves and their optimizer state. This module builds the run (checks, weights,
sampler, resume); parallel.train_loop holds the per-step stages.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from graphs import backends, bench
from graphs.blocks import Compile, Recompute, make_blocks
from graphs.precision import Precision, compute_dtypes
from graphs.swap import MemoryConfig
from hvfunc import ckpt, io
from hvfunc.config import dit_preset
from hvfunc.data.buckets import BucketSampler, group
from hvfunc.data.features import FeatureDataset, collate
from hvfunc.dit_spec import dit_spec
from hvfunc.flow import TimestepSampling
from hvfunc.params import init_leaves
from parallel import checkpoint, ema, gather, lora_train, memory_train, optim, plan, runtime, step, tblog, validation
from parallel.ema import EMAConfig
from parallel.lora_train import LoraTrain
from parallel.mesh import ParallelConfig, build
from parallel.tblog import LogConfig
from parallel.train_loop import Fixed, Run, loop as _loop, trained as _trained
from parallel.validation import ValidationConfig


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run: data, model, parallel layout, optimisation, checkpoints."""

    features: Path
    """Folder written by scripts/extract.py (index.jsonl + samples/)."""
    out: Path
    """Run folder: checkpoints/, metrics.jsonl, config.json."""
    model: str = "tiny"
    """DiT preset (hunyuan-video-t2v, hunyuan-video-i2v, tiny, tiny-i2v)."""
    init_from: Path | None = None
    """Weights to start from (official .pt, diffusers folder, hvfunc safetensors); None: upstream's init.
    With LoRA these are the frozen base weights, read again on every resume (checked by content)."""
    lora: LoraTrain = field(default_factory=LoraTrain)
    """LoRA finetuning (--lora.enabled): adapters train on the frozen base (parallel.lora_train)."""
    steps: int = 100
    """Optimizer steps in total (a resumed run continues up to this)."""
    batch_size: int = 1
    """Micro batch: samples per data-parallel rank per forward / backward."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks: batch_size x data-parallel size x accumulation steps.
    None: batch_size x data-parallel size (no accumulation)."""
    seed: int = 0
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Compute dtype, also of the per-block weight all-gather; master weights, optimizer state and
    gradient reduction stay fp32."""
    fp32_leaves: str = ""
    """Regex of leaves computed in fp32 anyway (graphs.precision), e.g. "(_mod|modulation)\\.linear"."""
    guidance: float | None = 1.0
    """Embedded guidance scale fed while training (x1000). Recipes: T2V 1.0; I2V 6.016, i.e.
    upstream's 6.0 after its bf16 rounding (6016). Ignored by models without a guidance
    embedding; None is an error for models with one."""
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    text_dropout: float = 0.0
    """Probability of training a sample on the empty prompt (for classifier-free guidance; I2V: with a
    black reference image). Upstream I2V: --uncond-p 0.1."""
    image_dropout: float = 0.0
    """I2V: probability of training a sample with a black semantic image (upstream --sematic-cond-drop-p,
    0.1 in HunyuanVideo-I2V, 0.0 in MindSpeed-MM): the LLaVA states of (same prompt, black image) stored
    by scripts/extract.py replace the real ones; the clean first-frame latent stays. Text dropout wins."""
    optim: optim.OptimConfig = field(default_factory=optim.OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recompute: Recompute = field(default_factory=Recompute)
    compile: Compile = field(default_factory=Compile)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """LoRA's frozen base: the last N blocks' weights in host memory, fp8 storage (parallel.memory_train)."""
    attention: str = "sdpa"
    """Attention backend: sdpa, flash-varlen, npu."""
    device: str = "auto"
    checkpoint_every: int = 100
    keep_last: int = 2
    """Complete checkpoints kept on disk."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the trainable leaves (--ema.decay; parallel.ema), checkpointed next to them."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Sample videos every N steps into <out>/samples/ (--validation.prompts, --validation.every; parallel.validation)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logs besides metrics.jsonl: --log.tensorboard (parallel.tblog)."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps tolerated before stopping (with a checkpoint)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


def _accumulation(cfg: TrainConfig, dp: int) -> int:
    """Micro batches per optimizer step: global batch / (micro batch x data-parallel size)."""
    if cfg.global_batch_size is None:
        return 1
    per_pass = cfg.batch_size * dp
    if cfg.global_batch_size <= 0 or cfg.global_batch_size % per_pass:
        raise ValueError(f"--global-batch-size {cfg.global_batch_size} is not a positive multiple of --batch-size "
                         f"{cfg.batch_size} x data-parallel size {dp} = {per_pass}: choose a global batch that divides "
                         f"into micro batches of {cfg.batch_size} on each of the {dp} data-parallel ranks")
    return cfg.global_batch_size // per_pass


def _check_dropout(cfg: TrainConfig, task: str) -> dict | None:
    """Dropout settings that cannot work fail before the first step; returns the uncond features."""
    for name, p in (("text_dropout", cfg.text_dropout), ("image_dropout", cfg.image_dropout)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if cfg.image_dropout > 0 and task != "i2v":
        raise ValueError(f"image_dropout={cfg.image_dropout} drops the I2V reference image, but model {cfg.model!r} "
                         f"is text-to-video: use an I2V model or image_dropout 0")
    path = cfg.features / "uncond.safetensors"
    if cfg.text_dropout > 0 and not path.is_file():
        raise ValueError(f"text_dropout={cfg.text_dropout} needs {path} (scripts/extract.py writes it)")
    return io.load_safetensors(path) if path.is_file() else None


def _check_buckets(keys: list[tuple[int, ...]], model, meshes) -> None:
    """Every latent shape must patchify and split over cp: fail before the first step, not at it."""
    cp, bad = step.token_multiple(meshes), set()
    for c, t, h, w in set(keys):
        grid = [n // p for n, p in zip((t, h, w), model.patch_size)]
        if c != model.in_channels or any(n % p for n, p in zip((t, h, w), model.patch_size)) or \
                (grid[0] * grid[1] * grid[2]) % cp:
            bad.add((c, t, h, w))
    if bad:
        raise ValueError(f"latent shapes {sorted(bad)} do not fit the model (in_channels {model.in_channels}, "
                         f"patch {model.patch_size}) or their video tokens do not split over {cp} ranks (cp, x tp with "
                         f"sequence parallelism): re-extract with --cp or change the parallel layout")


def _params(cfg: TrainConfig, model, meshes, device: torch.device, tune: lora_train.Tuning | None = None,
            store: memory_train.FrozenStore | None = None):
    """DTensor leaves, built leaf by leaf: each rank holds one full leaf at a time, then only its
    shard (13B in fp32 is 51 GB: no rank may hold it whole). Official / diffusers files are
    memory-mapped where their format allows (hvfunc.io). Trainable leaves (tune.trains) are fp32
    masters; frozen ones (the base under LoRA) are stored in their compute dtype, without grad, or as
    `store` says (fp8, swapped blocks' local shards in host memory)."""
    tune = tune or lora_train.resolve(cfg.lora, model, cfg.init_from, cfg.seed)
    spec = dit_spec(model)
    if cfg.init_from is not None:
        leaves = ckpt.load_dit(cfg.init_from, model).items()  # raises on a wrong path or mismatched weights
        runtime.print0(f"initialised from {cfg.init_from}")
    else:
        leaves = init_leaves(spec, generator=torch.Generator().manual_seed(cfg.seed))
    frozen = compute_dtypes(spec, Precision(compute=cfg.dtype, fp32_leaves=cfg.fp32_leaves))
    placements = plan.plan(spec | tune.spec, meshes)
    out = {}
    for k, v in itertools.chain(leaves, tune.leaves(cfg.seed)):
        train = tune.trains(k)
        v = v.to(device=device, dtype=torch.float32 if train else frozen[k])
        if store is not None and not train:
            out |= store.shard(k, v, placements[k], meshes)
        else:
            out[k] = plan.shard({k: v}, placements, meshes)[k].requires_grad_(train)
    return out if store is None else store.finish(out, device)


def train(cfg: TrainConfig) -> list[dict]:
    model = dit_preset(cfg.model)
    task = "i2v" if model.i2v_condition_type else "t2v"
    tblog.check(cfg.log)
    uncond = _check_dropout(cfg, task)
    if model.guidance_embed and cfg.guidance is None:
        raise ValueError(f"model {cfg.model!r} has a guidance embedding: --guidance needs a value "
                         "(recipes: T2V 1.0, I2V 6.016)")
    cfg.parallel.check_model(model)  # layout and data checks come before the (long) weight init
    ds = FeatureDataset(cfg.features, task=task, noimg=cfg.image_dropout > 0)
    device = runtime.init(cfg.device)
    meshes = build(cfg.parallel, device_type=device.type)
    _check_buckets(ds.keys(), model, meshes)
    accum = _accumulation(cfg, meshes.data_world)
    tune = lora_train.resolve(cfg.lora, model, cfg.init_from, cfg.seed)
    val = validation.load(cfg, model, tune.adapters)  # encodings, sizes, VAE: before the weights
    last = checkpoint.latest(cfg.out / "checkpoints")
    if last is not None:  # before the (long) weight load
        lora_train.check_resume(json.loads((last / checkpoint.STATE_FILE).read_text()), tune, last)
    store = memory_train.frozen_store(cfg.memory, model, tune, compile=cfg.compile, recompute=cfg.recompute,
                                      split=plan.tp_split(dit_spec(model) | tune.spec), sp=cfg.parallel.sequence_parallel)
    params = _params(cfg, model, meshes, device, tune, store)
    # a rank's share of the global batch, from one bucket (one shape), split into micro batches later
    sampler = BucketSampler(group(ds.keys()), batch_size=cfg.batch_size * accum, rank=meshes.data_rank,
                            world_size=meshes.data_world, seed=cfg.seed)
    run = Run(params=params, opt=optim.make_optimizer(params, cfg.optim), sampler=sampler.state_dict(),
               ema=ema.init(params, cfg.ema))
    if last is not None:
        _resume(last, run, sampler)
    if runtime.is_main():
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
        _truncate_metrics(cfg.out / "metrics.jsonl", run.step)
    fixed = replace(_fixed(cfg, model, meshes, device, tune, uncond, accum, store), validation=val)
    return _loop(fixed, run, _epochs(ds, sampler, cfg.num_workers))


def _resume(last: Path, run: Run, sampler: BucketSampler) -> None:
    """Params, optimizer, EMA and sampler from a checkpoint. An EMA turned on at resume starts from the
    loaded weights (the checkpoint has none); one turned off is left on disk."""
    saved = json.loads((last / checkpoint.STATE_FILE).read_text())
    has_ema = run.ema is not None and bool(saved.get("ema"))
    state = checkpoint.load(last, _trained(run.params), run.opt, run.ema if has_ema else None)
    if run.ema is not None and not has_ema:
        run.ema = {k: v.detach().clone() for k, v in _trained(run.params).items()}
        runtime.print0(f"{last} holds no EMA: it starts from the resumed weights")
    sampler.load_state_dict(state["sampler"])
    run.step, run.sampler = state["step"], state["sampler"]
    runtime.print0(f"resumed from {last} at step {run.step}")


def _fixed(cfg: TrainConfig, model, meshes, device: torch.device, tune: lora_train.Tuning, uncond,
           accum: int, store: memory_train.FrozenStore | None = None) -> Fixed:
    """The compute functions of the step: (host -> device copy of swapped blocks, fp8 upcast,) cast then
    gather per block (fp32 gradient reduction), LoRA's alpha / r folded into the gathered B, recompute and
    compilation around them."""
    policy = Precision(compute=cfg.dtype, fp32_leaves=cfg.fp32_leaves)
    split = plan.tp_split(dit_spec(model) | tune.spec)
    prepare = gather.BlockGather(split, meshes.cfg.sequence_parallel, policy=policy, lora_scale=tune.scale)
    prepare = prepare if store is None else store.prepare(prepare)
    blocks = make_blocks(prepare=prepare, recompute=cfg.recompute, compile=cfg.compile, dtensor_params=True,
                         device=device)
    blocks = blocks if store is None else store.wrap(blocks)
    compute = {"cfg": model, "meshes": meshes, "prepare": prepare, "attn": backends.attention_backend(cfg.attention),
               "blocks": blocks}
    return Fixed(cfg=cfg, model=model, meshes=meshes, device=device, uncond=uncond, compute=compute, accum=accum,
                  guidance=None if not model.guidance_embed else cfg.guidance * 1000,
                  peak_flops=bench.matmul_peak(device, policy.dtype) * dist.get_world_size(),
                  identity={"seed": cfg.seed, "model": cfg.model} | tune.record()
                  | ({"ema": cfg.ema.decay} if cfg.ema.enabled else {}))


def _epochs(ds, sampler: BucketSampler, workers: int):
    """(batch, sampler state after it) forever; the DataLoader may prefetch, the state is exact."""
    while True:
        epoch, pos0 = sampler.epoch, sampler.position
        batches = list(iter(sampler))  # the rest of this epoch; the sampler moves to the next
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers)
        for k, batch in enumerate(loader, 1):
            yield batch, dict(sampler.state_dict(), epoch=epoch, position=pos0 + k)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after the checkpoint we resume from (steps that will be redone)."""
    if path.is_file():
        keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
        io.write_atomic(path, "".join(x + "\n" for x in keep).encode())


