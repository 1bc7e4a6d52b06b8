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
the trainable leaves and their optimizer state.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from graphs import backends, bench
from graphs.blocks import Compile, Recompute, make_blocks
from graphs.precision import Precision, compute_dtypes
from hvfunc import ckpt, flops, flow, io
from hvfunc.config import DiTConfig, dit_preset
from hvfunc.data.buckets import BucketSampler, group
from hvfunc.data.features import NOIMG_KEYS, TEXT_KEYS, FeatureDataset, collate
from hvfunc.dit_spec import dit_spec
from hvfunc.flow import TimestepSampling
from hvfunc.params import init_leaves
from parallel import checkpoint, ema, gather, lora_train, optim, plan, runtime, step
from parallel.ema import EMAConfig
from parallel.lora_train import LoraTrain
from parallel.mesh import Meshes, ParallelConfig, build


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
    attention: str = "sdpa"
    """Attention backend: sdpa, flash-varlen, npu."""
    device: str = "auto"
    checkpoint_every: int = 100
    keep_last: int = 2
    """Complete checkpoints kept on disk."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the trainable leaves (--ema.decay; parallel.ema), checkpointed next to them."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps tolerated before stopping (with a checkpoint)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


class _Stop:
    """SIGTERM sets the flag; every rank agrees (all-reduce) before acting on it."""

    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_: object) -> None:
        self.flag = True

    def agreed(self, device: torch.device) -> bool:
        t = torch.tensor(float(self.flag), device=device)  # nccl reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)


def _draws(batch: dict, cfg: TrainConfig, device: torch.device) -> tuple:
    """sigma [B], noise, text- and image-dropout masks [B], all from the samples' draw seeds.
    A new draw goes after the others: earlier ones (and past runs) keep their numbers."""
    sig, noise, text, image = [], [], [], []
    for s in batch["seed"]:
        g = torch.Generator().manual_seed(int(s))
        sig.append(flow.sample_sigmas(1, cfg.timesteps, generator=g))
        noise.append(torch.randn(tuple(batch["latents"].shape[1:]), generator=g))
        text.append(bool(torch.rand((), generator=g) < cfg.text_dropout))
        image.append(bool(torch.rand((), generator=g) < cfg.image_dropout))
    return torch.cat(sig).to(device), torch.stack(noise).to(device), text, image


def _with_dropout(batch: dict, text: list[bool], image: list[bool], uncond: dict | None) -> tuple[dict, list[int]]:
    """(batch with dropped conditioning, [text-dropped, image-dropped] counts). A text-dropped sample
    gets `uncond` (empty prompt; I2V: + black image); an image-dropped one its NOIMG_KEYS states."""
    image = [i and not t for t, i in zip(text, image)]  # text dropout wins
    out = {k: v for k, v in batch.items() if k not in NOIMG_KEYS}
    if any(text) or any(image):
        out |= {k: batch[k].clone() for k in TEXT_KEYS}
    for b, (t, i) in enumerate(zip(text, image)):
        if t:
            for k in TEXT_KEYS:
                out[k][b] = uncond[k].to(out[k])
        elif i:  # same prompt, black image; CLIP never sees the image, so text_states_2 stays
            for k, src in zip(TEXT_KEYS, NOIMG_KEYS):
                out[k][b] = batch[src][b]
    return out, [sum(text), sum(image)]


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


def _global_counts(counts: list[int], meshes, device: torch.device) -> list[int]:
    """Per-rank counts summed over the data-parallel ranks (cp and tp ranks share their samples)."""
    t = torch.tensor(counts, dtype=torch.long, device=device)  # nccl reduces device tensors only
    for axis in ("dp_replicate", "dp_shard"):
        if meshes.size(axis) > 1:
            dist.all_reduce(t, group=meshes.group(axis))
    return t.tolist()


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


def _params(cfg: TrainConfig, model, meshes, device: torch.device, tune: lora_train.Tuning | None = None):
    """DTensor leaves, built leaf by leaf: each rank holds one full leaf at a time, then only its
    shard (13B in fp32 is 51 GB: no rank may hold it whole). Official / diffusers files are
    memory-mapped where their format allows (hvfunc.io). Trainable leaves (tune.trains) are fp32
    masters; frozen ones (the base under LoRA) are stored in their compute dtype, without grad."""
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
        out[k] = plan.shard({k: v}, placements, meshes)[k].requires_grad_(train)
    return out


def train(cfg: TrainConfig) -> list[dict]:
    model = dit_preset(cfg.model)
    task = "i2v" if model.i2v_condition_type else "t2v"
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
    last = checkpoint.latest(cfg.out / "checkpoints")
    if last is not None:  # before the (long) weight load
        lora_train.check_resume(json.loads((last / checkpoint.STATE_FILE).read_text()), tune, last)
    params = _params(cfg, model, meshes, device, tune)
    # a rank's share of the global batch, from one bucket (one shape), split into micro batches later
    sampler = BucketSampler(group(ds.keys()), batch_size=cfg.batch_size * accum, rank=meshes.data_rank,
                            world_size=meshes.data_world, seed=cfg.seed)
    run = _Run(params=params, opt=optim.make_optimizer(params, cfg.optim), sampler=sampler.state_dict(),
               ema=ema.init(params, cfg.ema))
    if last is not None:
        _resume(last, run, sampler)
    if runtime.is_main():
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
        _truncate_metrics(cfg.out / "metrics.jsonl", run.step)
    fixed = _fixed(cfg, model, meshes, device, tune, uncond, accum)
    return _loop(fixed, run, _epochs(ds, sampler, cfg.num_workers))


def _resume(last: Path, run: _Run, sampler: BucketSampler) -> None:
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
           accum: int) -> _Fixed:
    """The compute functions of the step: cast then gather per block (fp32 gradient reduction), LoRA's
    alpha / r folded into the gathered B, recompute and compilation around them."""
    policy = Precision(compute=cfg.dtype, fp32_leaves=cfg.fp32_leaves)
    split = plan.tp_split(dit_spec(model) | tune.spec)
    prepare = gather.BlockGather(split, meshes.cfg.sequence_parallel, policy=policy, lora_scale=tune.scale)
    blocks = make_blocks(prepare=prepare, recompute=cfg.recompute, compile=cfg.compile, dtensor_params=True,
                         device=device)
    compute = {"cfg": model, "meshes": meshes, "prepare": prepare, "attn": backends.attention_backend(cfg.attention),
               "blocks": blocks}
    return _Fixed(cfg=cfg, model=model, meshes=meshes, device=device, uncond=uncond, compute=compute, accum=accum,
                  guidance=None if not model.guidance_embed else cfg.guidance * 1000,
                  peak_flops=bench.matmul_peak(device, policy.dtype) * dist.get_world_size(),
                  identity={"seed": cfg.seed, "model": cfg.model} | tune.record()
                  | ({"ema": cfg.ema.decay} if cfg.ema.enabled else {}))


def _trained(params: dict) -> dict:
    """The leaves a checkpoint holds: the trainable ones (LoRA: adapters only; the base is frozen)."""
    return {k: v for k, v in params.items() if v.requires_grad}


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


@dataclass(frozen=True, kw_only=True)
class _Fixed:
    """What every step uses and no step changes."""

    cfg: TrainConfig
    model: DiTConfig
    meshes: Meshes
    device: torch.device
    uncond: dict | None
    """Empty-prompt features for text dropout (None without uncond.safetensors)."""
    compute: dict
    """step.loss's keyword arguments: model config, meshes, prepare, attention, blocks."""
    accum: int
    """Micro batches per optimizer step (gradient accumulation)."""
    guidance: float | None
    """Embedded guidance x1000, None for models without a guidance embedding."""
    peak_flops: float
    """Dense matmul peak of the whole world (for MFU)."""
    identity: dict
    """trainer.json's run entries next to the sampler state (seed, model; LoRA: adapters, base)."""


@dataclass(kw_only=True)
class _Run:
    """What the loop carries from step to step (all a checkpoint restores, plus counters)."""

    params: dict
    opt: torch.optim.Optimizer
    sampler: dict
    """The sampler's state after the last batch taken (what a checkpoint stores)."""
    ema: dict | None = None
    """EMA of the trainable leaves (parallel.ema), None when off."""
    step: int = 0
    """Optimizer steps done."""
    bad: int = 0
    """Consecutive skipped (non-finite) steps."""
    skipped: int = 0
    records: list[dict] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class _Batch:
    """One optimizer step's data on this rank, conditioning dropped, with its draws."""

    batch: dict
    sigma: torch.Tensor
    noise: torch.Tensor
    dropped: list[int]
    """[text-dropped, image-dropped] samples over all data-parallel ranks."""


def _loop(fx: _Fixed, run: _Run, batches) -> list[dict]:
    """data -> gradients -> optimizer -> logging -> checkpoint, once per optimizer step."""
    cfg, stop = fx.cfg, _Stop()
    metrics = (cfg.out / "metrics.jsonl").open("a") if runtime.is_main() else None
    bar = runtime.progress(cfg.steps, desc="train", unit="step", enabled=runtime.is_main(), initial=run.step)
    try:
        while run.step < cfg.steps:
            t0 = time.perf_counter()
            data = _data(fx, run, batches)
            value = _gradients(fx, run, data)
            lr, norm = _optimizer(fx, run, value)
            rec = _record(fx, run, data, value, norm, lr, time.perf_counter() - t0)
            _log(run, rec, metrics, bar)
            if _checkpoint(fx, run, stop, rec):
                runtime.print0(f"SIGTERM: saved a checkpoint at step {run.step} and stopped")
                break
    finally:
        bar.close()
        if metrics:
            metrics.close()
    return run.records


def _data(fx: _Fixed, run: _Run, batches) -> _Batch:
    """The next batch on the device, its per-sample draws (from the samples' seeds) and dropout."""
    batch, run.sampler = next(batches)
    batch = {k: v.to(fx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    sigma, noise, text, image = _draws(batch, fx.cfg, fx.device)
    batch, dropped = _with_dropout(batch, text, image, fx.uncond)
    if fx.cfg.text_dropout > 0 or fx.cfg.image_dropout > 0:  # else no collective: both counts are 0
        dropped = _global_counts(dropped, fx.meshes, fx.device)
    return _Batch(batch=batch, sigma=sigma, noise=noise, dropped=dropped)


def _gradients(fx: _Fixed, run: _Run, data: _Batch) -> float:
    """Forward and backward of each micro batch (FSDP reduce-scatter inside, gradients summed into the
    sharded fp32 .grad); the step's global mean loss. Every micro batch of a step has the same shape
    (one bucket), so dividing its loss (local sum / its global element count) by the number of micro
    batches divides by the element count of the whole step: the sum is the whole batch's mean loss.
    A non-finite loss ends the step without its backward (every rank sees the same value)."""
    total, mb = 0.0, fx.cfg.batch_size
    for i in range(0, data.batch["latents"].shape[0], mb):
        part = {k: v[i:i + mb] for k, v in data.batch.items()}
        B = part["latents"].shape[0]
        g = None if fx.guidance is None else torch.full((B,), fx.guidance, device=fx.device)
        loss = step.loss(run.params, part, data.sigma[i:i + mb], data.noise[i:i + mb], guidance=g, **fx.compute)
        loss = loss / fx.accum if fx.accum > 1 else loss
        value = step.global_mean(loss, fx.meshes)
        total += value
        if not math.isfinite(value):
            break
        loss.backward()
    return total


def _optimizer(fx: _Fixed, run: _Run, value: float) -> tuple[float, float]:
    """(lr, grad norm): clip and step when loss and gradients are finite, else count a skipped step."""
    lr = fx.cfg.optim.lr_at(run.step)
    optim.set_lr(run.opt, lr)
    norm = optim.clip_(run.params, fx.cfg.optim.grad_clip) if math.isfinite(value) else float("nan")
    ok = math.isfinite(value) and math.isfinite(norm)
    if ok:
        run.opt.step()
        if run.ema is not None:
            ema.update_(run.ema, run.params, fx.cfg.ema.decay)
    run.bad, run.skipped = (0, run.skipped) if ok else (run.bad + 1, run.skipped + 1)
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    return lr, norm


def _log(run: _Run, rec: dict, metrics, bar) -> None:
    run.records.append(rec)
    if metrics:
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.1e}")
    bar.update(1)


def _checkpoint(fx: _Fixed, run: _Run, stop: _Stop, rec: dict) -> bool:
    """Save every checkpoint_every steps, at the end and on SIGTERM (then True: stop); too many bad
    steps in a row save and raise."""
    cfg = fx.cfg

    def save() -> None:
        checkpoint.save(cfg.out / "checkpoints", run.step, _trained(run.params), run.opt,
                        {"sampler": run.sampler} | fx.identity, cfg.keep_last, ema=run.ema)

    if run.bad > cfg.max_bad_steps:
        save()
        raise RuntimeError(f"{run.bad} consecutive steps had a non-finite loss or gradient (last loss {rec['loss']}, "
                           f"grad norm {rec['grad_norm']}); stopped and saved a checkpoint in "
                           f"{cfg.out / 'checkpoints'}. Lower the learning rate or check the data.")
    stopping = stop.agreed(fx.device)
    if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps or stopping:
        save()
    return stopping


def _record(fx: _Fixed, run: _Run, data: _Batch, value: float, norm: float, lr: float, dt: float) -> dict:
    """metrics.jsonl's record of the step just taken."""
    batch, model = data.batch, fx.model
    B_global = batch["latents"].shape[0] * fx.meshes.data_world  # every micro batch of the step
    T, H, W = (n // p for n, p in zip(batch["latents"].shape[2:], model.patch_size))
    video, text = T * H * W, float(batch["text_mask"].float().sum(1).mean())
    f = 3 * flops.forward_flops(model, batch=B_global, video_tokens=video, text_tokens=int(text))
    return {"step": run.step, "loss": value, "grad_norm": norm, "lr": lr, "seconds": dt, "samples": B_global,
            "tokens": B_global * video,
            "tokens_per_s": B_global * video / dt, "samples_per_s": B_global / dt, "mfu": f / dt / fx.peak_flops,
            "peak_mem_gb": runtime.peak_memory_gb(fx.device), "skipped_steps": run.skipped,
            "text_dropped": data.dropped[0], "image_dropped": data.dropped[1]}
