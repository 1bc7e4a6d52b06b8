"""The training step's stages over one run state: data -> gradients -> optimizer -> validation -> log
-> checkpoint.

parallel.trainer builds what every step uses (`Fixed`: the config, mesh, compute functions) and
what a checkpoint restores (`Run`: params, optimizer, EMA, sampler state, counters), then calls
`loop`. Each concern is one function here: `_data` (the batch, its per-sample draws and dropout),
`_gradients` (micro batches' forward / backward), `_optimizer` (clip, step, EMA, skipped steps),
`_validation` (sample videos every N steps: parallel.validation), `_log` (metrics.jsonl,
TensorBoard, progress), `_checkpoint` (periodic, final, SIGTERM, too many bad steps).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hvfunc import flops, flow
from hvfunc.config import DiTConfig
from hvfunc.data.features import NOIMG_KEYS, TEXT_KEYS
from parallel import checkpoint, ema, optim, runtime, step, tblog, validation
from parallel.mesh import Meshes

if TYPE_CHECKING:
    from parallel.trainer import TrainConfig


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


def draws(batch: dict, cfg: TrainConfig, device: torch.device) -> tuple:
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


def with_dropout(batch: dict, text: list[bool], image: list[bool], uncond: dict | None) -> tuple[dict, list[int]]:
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


def _global_counts(counts: list[int], meshes, device: torch.device) -> list[int]:
    """Per-rank counts summed over the data-parallel ranks (cp and tp ranks share their samples)."""
    t = torch.tensor(counts, dtype=torch.long, device=device)  # nccl reduces device tensors only
    for axis in ("dp_replicate", "dp_shard"):
        if meshes.size(axis) > 1:
            dist.all_reduce(t, group=meshes.group(axis))
    return t.tolist()


def trained(params: dict) -> dict:
    """The leaves a checkpoint holds: the trainable ones (LoRA: adapters only; the base is frozen)."""
    return {k: v for k, v in params.items() if v.requires_grad}


@dataclass(frozen=True, kw_only=True)
class Fixed:
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
    validation: validation.Validator | None = None
    """Sample videos every N steps (parallel.validation), None when off."""


@dataclass(kw_only=True)
class Run:
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
    samples: validation.Samples | None = None
    """The latest validation's videos (step, and on rank 0 each mp4 path with its first frame): set by
    `_validation` before `_log` of the same step, so a logger there shows them when samples.step == step."""


@dataclass(frozen=True, kw_only=True)
class _Batch:
    """One optimizer step's data on this rank, conditioning dropped, with its draws."""

    batch: dict
    sigma: torch.Tensor
    noise: torch.Tensor
    dropped: list[int]
    """[text-dropped, image-dropped] samples over all data-parallel ranks."""


def loop(fx: Fixed, run: Run, batches) -> list[dict]:
    """data -> gradients -> optimizer -> validation -> logging -> checkpoint, once per optimizer step."""
    cfg, stop = fx.cfg, _Stop()
    metrics = (cfg.out / "metrics.jsonl").open("a") if runtime.is_main() else None
    tb = tblog.open_for(cfg.log, cfg.out, run.step, runtime.is_main())
    bar = runtime.progress(cfg.steps, desc="train", unit="step", enabled=runtime.is_main(), initial=run.step)
    try:
        while run.step < cfg.steps:
            t0 = time.perf_counter()
            data = _data(fx, run, batches)
            value = _gradients(fx, run, data)
            lr, norm = _optimizer(fx, run, value)
            rec = _record(fx, run, data, value, norm, lr, time.perf_counter() - t0)
            _validation(fx, run)
            _log(run, rec, metrics, bar, tb)
            if _checkpoint(fx, run, stop, rec):
                runtime.print0(f"SIGTERM: saved a checkpoint at step {run.step} and stopped")
                break
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if tb:
            tb.close()
    return run.records


def _data(fx: Fixed, run: Run, batches) -> _Batch:
    """The next batch on the device, its per-sample draws (from the samples' seeds) and dropout."""
    batch, run.sampler = next(batches)
    batch = {k: v.to(fx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    sigma, noise, text, image = draws(batch, fx.cfg, fx.device)
    batch, dropped = with_dropout(batch, text, image, fx.uncond)
    if fx.cfg.text_dropout > 0 or fx.cfg.image_dropout > 0:  # else no collective: both counts are 0
        dropped = _global_counts(dropped, fx.meshes, fx.device)
    return _Batch(batch=batch, sigma=sigma, noise=noise, dropped=dropped)


def _gradients(fx: Fixed, run: Run, data: _Batch) -> float:
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


def _optimizer(fx: Fixed, run: Run, value: float) -> tuple[float, float]:
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


def _validation(fx: Fixed, run: Run) -> None:
    """After every --validation.every-th optimizer step: videos with the current weights (EMA if on), no
    training randomness used (parallel.validation). Not timed in the step's record."""
    if validation.due(fx.validation, run.step):
        run.samples = validation.sample(fx.validation, run.params, run.ema, run.step, fx.meshes, fx.device)


def _log(run: Run, rec: dict, metrics, bar, tb: tblog.TensorBoard | None) -> None:
    run.records.append(rec)
    if metrics:
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
    if tb:
        tb.scalars(rec)
        if run.samples is not None and run.samples.step == rec["step"]:  # this step's validation videos
            tb.images(rec["step"], {p.stem: frame for p, frame in run.samples.videos})
    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.1e}")
    bar.update(1)


def _checkpoint(fx: Fixed, run: Run, stop: _Stop, rec: dict) -> bool:
    """Save every checkpoint_every steps, at the end and on SIGTERM (then True: stop); too many bad
    steps in a row save and raise."""
    cfg = fx.cfg

    def save() -> None:
        checkpoint.save(cfg.out / "checkpoints", run.step, trained(run.params), run.opt,
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


def _record(fx: Fixed, run: Run, data: _Batch, value: float, norm: float, lr: float, dt: float) -> dict:
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
