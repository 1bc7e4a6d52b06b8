"""The training loop: flow matching on extracted features over a (dp, cp, tp) mesh.

One function, `train(cfg)`, used by scripts/train.py and the tests. Per step: a global
batch from the bucket sampler (one shape on every rank), per-sample sigma / noise / text
and image dropout drawn from the sampler's per-draw seeds (so every layout sees the same numbers),
the sharded loss, backward (FSDP reduce-scatter inside), global-norm clipping, AdamW with
fp32 master weights. Non-finite losses or gradients skip the step (counted); too many in
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
from tqdm import tqdm

from graphs import backends, bench
from graphs.blocks import Compile, Recompute, make_blocks
from graphs.precision import Precision, compute_dtypes
from hvfunc import ckpt, flops, flow, io
from hvfunc.config import dit_preset
from hvfunc.data.buckets import BucketSampler, group
from hvfunc.data.features import NOIMG_KEYS, TEXT_KEYS, FeatureDataset, collate
from hvfunc.dit_spec import dit_spec
from hvfunc.flow import TimestepSampling
from hvfunc.params import init_leaves
from parallel import checkpoint, gather, lora_train, optim, plan, runtime, step
from parallel.lora_train import LoraTrain
from parallel.mesh import ParallelConfig, build


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
    """Samples per data-parallel rank per step."""
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
    tune = lora_train.resolve(cfg.lora, model, cfg.init_from, cfg.seed)
    ckdir, start = cfg.out / "checkpoints", 0
    if (last := checkpoint.latest(ckdir)) is not None:  # before the (long) weight load
        lora_train.check_resume(json.loads((last / checkpoint.STATE_FILE).read_text()), tune, last)
    params = _params(cfg, model, meshes, device, tune)
    sampler = BucketSampler(group(ds.keys()), batch_size=cfg.batch_size, rank=meshes.data_rank,
                            world_size=meshes.data_world, seed=cfg.seed)
    opt = optim.make_optimizer(params, cfg.optim)
    if last is not None:
        state = checkpoint.load(last, _trained(params), opt)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]
        runtime.print0(f"resumed from {last} at step {start}")
    if runtime.is_main():
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
        _truncate_metrics(cfg.out / "metrics.jsonl", start)
    policy = Precision(compute=cfg.dtype, fp32_leaves=cfg.fp32_leaves)
    sp = meshes.cfg.sequence_parallel
    split = plan.tp_split(dit_spec(model) | tune.spec)
    # cast, then gather (fp32 gradient reduction); LoRA's alpha / r folded into the gathered B
    prepare = gather.BlockGather(split, sp, policy=policy, lora_scale=tune.scale)
    blocks = make_blocks(prepare=prepare, recompute=cfg.recompute, compile=cfg.compile, dtensor_params=True,
                         device=device)
    attn = backends.attention_backend(cfg.attention)
    guidance = None if not model.guidance_embed else cfg.guidance * 1000
    return _loop(cfg, meshes, model, params, opt, ds, sampler, uncond, blocks, attn, guidance, prepare, policy.dtype,
                 device, start, tune.record())


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


def _loop(cfg, meshes, model, params, opt, ds, sampler, uncond, blocks, attn, guidance, prepare, dtype, device, start,
          record):
    batches, stop = _epochs(ds, sampler, cfg.num_workers), _Stop()
    peak_flops = bench.matmul_peak(device, dtype) * dist.get_world_size()
    metrics = (cfg.out / "metrics.jsonl").open("a") if runtime.is_main() else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not runtime.is_main(), desc="train", unit="step")
    records, bad, skipped, state = [], 0, 0, sampler.state_dict()
    for s in range(start, cfg.steps):
        t0 = time.perf_counter()
        batch, state = next(batches)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        sigma, noise, text, image = _draws(batch, cfg, device)
        batch, dropped = _with_dropout(batch, text, image, uncond)
        if cfg.text_dropout > 0 or cfg.image_dropout > 0:  # else no collective: both counts are 0
            dropped = _global_counts(dropped, meshes, device)
        B = batch["latents"].shape[0]
        g = None if guidance is None else torch.full((B,), guidance, device=device)
        loss = step.loss(params, batch, sigma, noise, cfg=model, meshes=meshes, guidance=g, prepare=prepare,
                         attn=attn, blocks=blocks)
        value = step.global_mean(loss, meshes)
        lr = cfg.optim.lr_at(s)
        optim.set_lr(opt, lr)
        norm = float("nan")
        if math.isfinite(value):
            loss.backward()
            norm = optim.clip_(params, cfg.optim.grad_clip)
        ok = math.isfinite(value) and math.isfinite(norm)
        if ok:
            opt.step()
        bad, skipped = (0, skipped) if ok else (bad + 1, skipped + 1)
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rec = _record(s, value, norm, lr, dt, batch, model, meshes, peak_flops, device, skipped)
        rec |= {"text_dropped": dropped[0], "image_dropped": dropped[1]}
        records.append(rec)
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}")
        trainer_state = {"sampler": state, "seed": cfg.seed, "model": cfg.model} | record
        if bad > cfg.max_bad_steps:
            checkpoint.save(cfg.out / "checkpoints", s + 1, _trained(params), opt, trainer_state, cfg.keep_last)
            raise RuntimeError(f"{bad} consecutive steps had a non-finite loss or gradient (last loss {value}, "
                               f"grad norm {norm}); stopped and saved a checkpoint in {cfg.out / 'checkpoints'}. "
                               f"Lower the learning rate or check the data.")
        stopping = stop.agreed(device)
        if (s + 1) % cfg.checkpoint_every == 0 or s + 1 == cfg.steps or stopping:
            checkpoint.save(cfg.out / "checkpoints", s + 1, _trained(params), opt, trainer_state, cfg.keep_last)
        if stopping:
            runtime.print0(f"SIGTERM: saved a checkpoint at step {s + 1} and stopped")
            break
    bar.close()
    if metrics:
        metrics.close()
    return records


def _record(s, value, norm, lr, dt, batch, model, meshes, peak_flops, device, skipped) -> dict:
    B_global = batch["latents"].shape[0] * meshes.data_world
    T, H, W = (n // p for n, p in zip(batch["latents"].shape[2:], model.patch_size))
    video, text = T * H * W, float(batch["text_mask"].float().sum(1).mean())
    f = 3 * flops.forward_flops(model, batch=B_global, video_tokens=video, text_tokens=int(text))
    return {"step": s + 1, "loss": value, "grad_norm": norm, "lr": lr, "seconds": dt,
            "tokens_per_s": B_global * video / dt, "samples_per_s": B_global / dt, "mfu": f / dt / peak_flops,
            "peak_mem_gb": runtime.peak_memory_gb(device), "skipped_steps": skipped}
