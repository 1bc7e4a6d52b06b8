"""Sampling runs, the work: model loading and lifetimes, rank roles, the per-video loop.

See parallel/sampler.py for the order of work and the rank layout; hvfunc.pipeline holds
the stages and parallel/sample_jobs.py the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from graphs import backends, swap
from graphs.sampling import SampleGraphs, sampling_blocks, static_runner
from hvfunc import ckpt, dit_spec, io, media, params, pipeline, sample
from hvfunc.cache import CacheStats
from hvfunc.config import dit_preset
from hvfunc.data import extract as ex
from hvfunc.vae import Tiling
from hvfunc.vae.ckpt import load_vae
from parallel import checkpoint, runtime
from parallel import sample_jobs as sj
from parallel.sampler import DTYPES, Plan, SampleConfig, plan


@dataclass(frozen=True)
class Ranks:
    """This rank's role: its cp group (one video at a time) and the group's place among groups."""

    group: int
    groups: int
    lead: bool
    """First rank of its cp group: decodes and writes the group's videos."""
    mesh: object | None
    """The 1-D cp DeviceMesh of this rank's group (None without cp)."""


def _ranks(cfg: SampleConfig, device: torch.device) -> Ranks:
    world, rank, cp = dist.get_world_size(), dist.get_rank(), cfg.parallel.cp
    if world % cp:
        raise ValueError(f"world size {world} is not divisible by --parallel.cp {cp}")
    mesh = None
    if cp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))["cp"]
    return Ranks(group=rank // cp, groups=world // cp, lead=rank % cp == 0, mesh=mesh)


def _model_paths(cfg: SampleConfig, i2v: bool) -> tuple[Path, Path, Path]:
    """(vae, llm, clip) folders; random tiny models are written once under <out>/.tiny-models."""
    m = cfg.models
    if not cfg.random_models:
        return m.vae, m.text_encoder, m.text_encoder_2
    root = cfg.out / ".tiny-models" / ("i2v" if i2v else "t2v")
    if runtime.is_main() and not (root / "vae" / "config.json").is_file():
        ex.write_tiny_models(root, "i2v" if i2v else "t2v")
    dist.barrier()
    return root / "vae", root / ("text_encoder_i2v" if i2v else "text_encoder"), root / "text_encoder_2"


def _text_stage(cfg: SampleConfig, p: Plan, jobs: list[sj.Job], llm: Path, clip: Path,
                device: torch.device) -> tuple[dict, float]:
    """{(prompt, image): Conditioning} for `jobs`, encoded on global rank 0 and broadcast; seconds."""
    from hvfunc.text.load import load_encoders

    t0 = time.perf_counter()
    keys = list(dict.fromkeys((j.prompt, j.image) for j in jobs))
    out = [None]
    if dist.get_rank() == 0 and keys:
        # tiny presets take tiny tokenizers: their templates are measured, not checked against Llama-3's
        text = load_encoders(llm, clip, strict=not cfg.tiny, dtype=DTYPES[cfg.text_dtype])
        images = [media.load_image(im) for _, im in keys] if p.i2v else None
        conds = pipeline.encode(text, [k[0] for k in keys], negative=cfg.negative_prompt if p.real_cfg else None,
                                images=images, device=device, batch_size=cfg.text_batch_size)
        out = [{k: pipeline.Conditioning(*(None if c is None else {n: v.cpu() for n, v in c.items()}
                                           for c in (x.cond, x.uncond))) for k, x in zip(keys, conds)}]
        del text, conds  # the encoders leave before the DiT comes
        runtime.free_memory(device)
    dist.broadcast_object_list(out, src=0)
    return out[0] or {}, time.perf_counter() - t0


def _load_dit(cfg: SampleConfig, device: torch.device) -> tuple[dict, str]:
    """Compute-dtype DiT params on `device` (LoRAs merged) and a description of where they came from."""
    params, source = _read_dit(cfg, device)
    if not cfg.lora:
        return params, source
    from hvfunc import lora, lora_formats

    loras = []
    for path, scale in map(lora_formats.parse_spec, cfg.lora):
        lo = lora_formats.read(path)
        lora.check(lo, dit_preset(cfg.model))
        loras.append((lo, scale))
    params, merged = lora.merge_all(params, loras)  # fp32 math, cast back to the compute dtype
    return params, f"{source} + {len(merged)} LoRA modules from {list(cfg.lora)}"


def _read_dit(cfg: SampleConfig, device: torch.device) -> tuple[dict, str]:
    model, dtype = dit_preset(cfg.model), DTYPES[cfg.dtype]
    if cfg.dit is None:  # tiny presets only (plan checked): upstream's init, a smoke test
        spec = dit_spec.dit_spec(model)
        return params.init(spec, generator=torch.Generator().manual_seed(0), dtype=dtype, device=device), \
            "random (upstream init, seed 0)"
    if checkpoint.is_checkpoint(cfg.dit):
        p, preset, step = checkpoint.trained_params(cfg.dit)
        if preset != cfg.model:
            raise ValueError(f"{step} trained model {preset!r}, not {cfg.model!r}: use the {preset} preset")
        return {k: v.to(device, dtype) for k, v in p.items()}, f"training checkpoint {step}"
    return {k: v.to(device) for k, v in ckpt.load_dit(cfg.dit, model, dtype=dtype).items()}, str(cfg.dit)


def _stored_dit(cfg: SampleConfig, device: torch.device) -> tuple[swap.Stored, str, dict]:
    """The DiT stored under --memory.*, its source, and the weights' GB on the device / host.

    Swap or fp8: read on the host, so the device never holds the whole compute-dtype model."""
    dtype = DTYPES[cfg.dtype]
    if not cfg.memory.enabled:
        dit, source = _load_dit(cfg, device)
        stored = swap.Stored(params=dit, dtype=dtype)
    else:
        dit, source = _load_dit(cfg, torch.device("cpu"))
        stored = swap.store(dit, cfg.memory, cfg=dit_preset(cfg.model), device=device, dtype=dtype)
        del dit
    held = {"device": 0, "host": 0}
    for v in stored.params.values():  # swapped leaves are views of the host buffers
        held["device" if v.device.type == device.type else "host"] += v.nbytes
    if stored.swap is not None:
        held["device"] += 2 * stored.swap.slot_bytes
    return stored, source, {k: round(b / 1e9, 3) for k, b in held.items()}


def _graphs(cfg: SampleConfig, device: torch.device) -> SampleGraphs:
    on = cfg.cuda_graph == "on" or (cfg.cuda_graph == "auto" and device.type == "cuda" and cfg.parallel.cp == 1
                                    and not cfg.cache.enabled and not cfg.memory.blocks_to_swap)
    if on and device.type != "cuda":
        raise ValueError(f"--cuda-graph on needs a CUDA device; running on {device}")
    return SampleGraphs(backend=cfg.compile.backend, cuda_graph=on)


def _split(mesh, n_tokens: int, attn) -> sample.TokenSplit:
    """Ulysses over the cp group: contiguous equal token slices in rank order."""
    from parallel import collectives

    n, r, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    per = n_tokens // n

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    return sample.TokenSplit(tokens=(r * per, (r + 1) * per), attn=collectives.ulysses(attn, mesh, num_img=per),
                             gather=gather, reduce=reduce)


def _video(cfg: SampleConfig, p: Plan, job: sj.Job, cond: pipeline.Conditioning, models: dict, ranks: Ranks,
           device: torch.device) -> tuple[torch.Tensor, dict]:
    """Final latents [1, C, T, H, W] fp32 of one job (all ranks of its group) and its step report."""
    model, vparams, vcfg = dit_preset(cfg.model), models["vae"], models["vae_cfg"]
    noise = sample.initial_noise(1, cfg.frames, job.height, job.width, device=device,
                                 generator=torch.Generator().manual_seed(job.seed))
    image_lat = None
    if p.i2v:
        x = media.image_tensor(media.load_image(job.image), job.height, job.width, exact=job.exact_resize)
        image_lat = pipeline.image_latents(vparams, x[None].to(device), cfg=vcfg)
    bar = runtime.progress(cfg.sampling.steps, desc=job.stem[:40], unit="step", enabled=ranks.lead)

    def tick(i: int, x: torch.Tensor) -> None:
        bar.update(1)

    split = None
    if ranks.mesh is not None:
        split = _split(ranks.mesh, noise.shape[2] * (noise.shape[3] // 2) * (noise.shape[4] // 2), models["attn"])
    stats = CacheStats()
    lat = sample.denoise(models["dit"], noise, {k: v.to(device) for k, v in cond.cond.items()},
                         None if cond.uncond is None else {k: v.to(device) for k, v in cond.uncond.items()},
                         cfg=model, sampling=cfg.sampling, image_latents=image_lat, attn=models["attn"],
                         blocks=models["blocks"], runner=models["runner"], callback=tick, cache=cfg.cache,
                         stats=stats, split=split)
    bar.close()
    if not cfg.cache.enabled:
        return lat, {"computed": cfg.sampling.steps, "skipped": 0}
    return lat, {"computed": stats.computed, "skipped": stats.skipped, "pattern": stats.pattern}


def run(cfg: SampleConfig) -> list[Path]:
    """Sample every job of the plan not done yet; returns the mp4s this rank wrote."""
    p = plan(cfg)  # every user error surfaces here, before a process group or a model
    todo, done = sj.pending(cfg.out, p.jobs, p.settings, overwrite=cfg.overwrite)
    device = runtime.init(cfg.device)
    ranks = _ranks(cfg, device)
    mine = todo[ranks.group::ranks.groups]
    runtime.print0(f"{len(p.jobs)} videos planned, {len(done)} already in {cfg.out} (same settings), "
                   f"{len(todo)} to sample on {dist.get_world_size()} rank(s) ({ranks.groups} group(s) of cp "
                   f"{cfg.parallel.cp})")
    if not todo:
        return []
    vae_dir, llm, clip = _model_paths(cfg, p.i2v)
    conds, text_s = _text_stage(cfg, p, todo, llm, clip, device)
    vparams, vcfg = load_vae(vae_dir, dtype=DTYPES[cfg.vae_dtype])
    stored, source, weights_gb = _stored_dit(cfg, device)
    graphs = _graphs(cfg, device)
    models = {"dit": stored.params, "vae": {k: v.to(device) for k, v in vparams.items()}, "vae_cfg": vcfg,
              "attn": backends.attention_backend(cfg.attention), "runner": None,
              "blocks": sampling_blocks(graphs, device=device, stored=stored)}
    random = [n for n, r in (("DiT", cfg.dit is None), ("VAE and text encoders", cfg.random_models)) if r]
    if random:
        runtime.print0(f"note: random weights ({', '.join(random)}): a smoke test, the videos show noise")
    cfg.out.mkdir(parents=True, exist_ok=True)
    report = {"dit_source": source, "weights_gb": weights_gb, "random_weights": random,
              "seconds": {"text_per_prompt": text_s / max(1, len(conds))},
              "ranks": {"world": dist.get_world_size(), "cp": cfg.parallel.cp}}
    models["cuda_graph"] = graphs.cuda_graph
    written = [path for path, _ in sample_videos(cfg, p, mine, conds, models, ranks, device, report)]
    dist.barrier()
    return written


def sample_videos(cfg: SampleConfig, p: Plan, jobs: list[sj.Job], conds: dict, models: dict, ranks: Ranks,
                  device: torch.device, report: dict) -> list[tuple[Path, np.ndarray]]:
    """Sample `jobs` (this rank's group's share, every rank of the group together); the group's lead
    decodes each and writes its mp4, sidecar (`report`: what every sidecar of the run says) and, asked,
    latents. conds: {(prompt, image): Conditioning}; models: dit, vae, vae_cfg, attn, blocks, runner,
    cuda_graph. Returns the lead's (mp4, first frame uint8 [H, W, 3]) per video (others: [])."""
    written = []
    for job in jobs:
        if models.get("cuda_graph"):  # one capture per video: shapes and conditioning are the run's
            models["runner"] = static_runner
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        lat, steps = _video(cfg, p, job, conds[(job.prompt, job.image)], models, ranks, device)
        t1 = time.perf_counter()
        if ranks.lead:
            written.append(_write(cfg, p, job, lat, models, device, {
                **report, "steps": steps, "seconds": {**report.get("seconds", {}), "denoise": t1 - t0}}))
    return written


def _write(cfg: SampleConfig, p: Plan, job: sj.Job, lat: torch.Tensor, models: dict, device: torch.device,
           report: dict) -> tuple[Path, np.ndarray]:
    t0 = time.perf_counter()
    video = pipeline.decode(models["vae"], lat, cfg=models["vae_cfg"], tiling=Tiling() if cfg.vae_tiling else None)
    t1 = time.perf_counter()
    files = sj.paths(cfg.out, job)
    frames = media.to_uint8(video[0])
    media.write_mp4(files["video"], frames, cfg.fps)
    if cfg.save_latents:
        io.save_safetensors({"latents": lat[0].cpu()}, files["latents"])
    report["seconds"] |= {"decode": t1 - t0, "write": time.perf_counter() - t1}
    report["peak_memory_gb"] = runtime.peak_memory_gb(device)
    sj.write_sidecar(cfg.out, job, p.settings, report)
    print(f"wrote {files['video']} ({report['seconds']['denoise']:.1f} s denoise, "
          f"{report['seconds']['decode']:.1f} s decode)", flush=True)
    return files["video"], frames[0]
