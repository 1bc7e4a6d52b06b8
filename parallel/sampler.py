"""Sampling runs, the plan: settings, validation and jobs (parallel/sample_run.py runs them).

Order of work, with model lifetimes between the stages (hvfunc.pipeline holds the stages):
1. validate everything (sizes, cp divisibility, prompts, images, weight paths) and plan the
   jobs; finished jobs are skipped before any model loads;
2. text: global rank 0 loads LLaVA + CLIP, encodes every (prompt, image) once and the
   negative prompt when real CFG is on, frees them, and broadcasts the conditioning
   (a few MB) - the 8B LLM is never loaded N times, in host or device memory;
3. DiT (compute dtype) and VAE load on every rank; per job: noise from a CPU generator
   seeded by the job's seed (the same noise on any device), I2V image latents, the Euler
   loop (compiled blocks, CUDA graph or step cache as configured), decode, write.
Ranks: with cp > 1 each group of cp ranks samples one video together (Ulysses over video
tokens, tokens split evenly); the group's first rank decodes and writes (the VAE runs once:
its decode is not split over ranks). Groups split the job list round-robin, so without cp
every rank samples its own videos and every video is written once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from graphs import fp8, swap
from graphs.blocks import Compile
from graphs.swap import MemoryConfig
from hvfunc import media, sample, vae
from hvfunc.cache import StepCache
from hvfunc.config import VAE_PRESETS, dit_preset
from hvfunc.data.extract import ModelArgs
from hvfunc.lora_formats import parse_spec
from parallel import sample_jobs as sj

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class SampleParallel:
    """How the ranks of a torchrun launch share the work."""

    cp: int = 1
    """Context-parallel ranks per video (Ulysses over video tokens); the world splits into groups
    of cp, which take the videos round-robin (cp 1: every rank samples its own videos)."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """A sampling run (presets in scripts/sample.py fill every field with upstream's defaults)."""

    model: str = "tiny"
    """DiT preset: hunyuan-video-t2v, hunyuan-video-i2v, tiny, tiny-i2v."""
    prompt: str | None = None
    """One prompt (or --prompts-file)."""
    prompts_file: Path | None = None
    """A text file, one prompt a line."""
    negative_prompt: str = ""
    """Used only with real CFG (cfg_scale > 1), as upstream."""
    image: Path | None = None
    """I2V: the reference image for every prompt (or --images-file)."""
    images_file: Path | None = None
    """I2V: one image path a line, one per prompt."""
    height: int | None = None
    """Video height (multiple of 16). I2V with None: the image's nearest upstream bucket."""
    width: int | None = None
    """Video width (multiple of 16). I2V with None: the image's nearest upstream bucket."""
    frames: int = 129
    """Frames (4k+1)."""
    sampling: Annotated[sample.Sampling, tyro.conf.OmitArgPrefixes] = field(default_factory=sample.Sampling)
    seed: int = 42
    """Seed of a prompt's first video; its k-th video uses seed + k."""
    num_videos: int = 1
    """Videos per prompt."""
    out: Path = Path("results")
    """Output folder (mp4 + json sidecar per video)."""
    fps: int = 24
    """Frame rate written to the mp4."""
    dit: Path | None = None
    """DiT weights: official .pt, diffusers folder, hvfunc safetensors, or a training run's
    checkpoints/ folder or one step-* checkpoint. None (tiny presets only): random weights."""
    models: ModelArgs = field(default_factory=ModelArgs)
    lora: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """LoRA FILE[:SCALE], repeatable (any format of docs/lora.md; several stack): merged into the DiT
    once at load, in fp32, so steps cost nothing extra."""
    bucket_base: int = 960
    """I2V buckets without --height/--width: upstream's base size (720p 960, 540p 720, 360p 480)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """DiT compute dtype (latents and the Euler update stay fp32)."""
    vae_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """VAE dtype (upstream: fp16)."""
    text_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Text encoder dtype (upstream: fp16)."""
    device: str = "auto"
    attention: str = "sdpa"
    """Attention backend: sdpa, flash-varlen, npu."""
    compile: Compile = field(default_factory=lambda: Compile(dynamic=False))
    """Compiled blocks (static shapes: one compile per resolution)."""
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    """Capture the whole step in a CUDA graph; auto: on CUDA without a step cache or cp."""
    cache: StepCache = field(default_factory=StepCache)
    """Opt-in step cache (changes results; never on by default): --cache.kind teacache|fbcache."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Block swap and fp8 weight storage (fp8 changes results: opt-in)."""
    vae_tiling: bool = True
    """Tiled VAE decode with upstream's numbers (bounded memory at 720p x 129 frames)."""
    parallel: SampleParallel = field(default_factory=lambda: SampleParallel())
    save_latents: bool = False
    """Also write each video's final latents (<name>.latents.safetensors)."""
    overwrite: bool = False
    """Redo videos that exist (default: skip those with the same settings)."""
    text_batch_size: int = 8
    """Prompts per text-encoder call."""

    @property
    def tiny(self) -> bool:
        return self.model.startswith("tiny")

    @property
    def random_models(self) -> bool:
        """Random tiny VAE and text encoders: --models.preset tiny with no --models.* path given."""
        m = self.models
        return m.preset == "tiny" and (m.vae, m.text_encoder, m.text_encoder_2) == (None, None, None)


@dataclass(frozen=True)
class Plan:
    """What the run will do, decided before any model loads."""

    jobs: list[sj.Job]
    settings: dict
    i2v: bool
    real_cfg: bool


def _prompts(cfg: SampleConfig) -> list[str]:
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise ValueError("give exactly one of --prompt and --prompts-file")
    prompts = [cfg.prompt] if cfg.prompt is not None else sj.read_lines(cfg.prompts_file, "--prompts-file")
    if bad := [i for i, p in enumerate(prompts) if not p.strip()]:
        raise ValueError(f"prompt {bad[0]} is empty")
    return prompts


def _images(cfg: SampleConfig, n: int, i2v: bool) -> list[Path | None]:
    if not i2v:
        if cfg.image or cfg.images_file:
            raise ValueError(f"--image/--images-file given but model {cfg.model!r} is text-to-video")
        return [None] * n
    if (cfg.image is None) == (cfg.images_file is None):
        raise ValueError(f"model {cfg.model!r} is image-to-video: give exactly one of --image and --images-file")
    if cfg.image is not None:
        return [cfg.image] * n
    return sj.read_images(cfg.images_file, n, "--images-file")


def _size(cfg: SampleConfig, image: Path | None) -> tuple[int, int, bool]:
    """(height, width, exact resize) of a job."""
    if image is None or (cfg.height is not None and cfg.width is not None):
        if cfg.height is None or cfg.width is None:
            raise ValueError("give both --height and --width")
        return cfg.height, cfg.width, False
    if (cfg.height is None) != (cfg.width is None):
        raise ValueError("give both --height and --width, or neither (I2V: the image's bucket)")
    im = media.load_image(image)  # readable now, not after the models loaded
    h, w = media.nearest_bucket(im.height, im.width, base=cfg.bucket_base)
    return h, w, True


def check_shape(cfg: SampleConfig, h: int, w: int) -> None:
    """A video size and frame count the VAE, the DiT and --parallel.cp take (else ValueError)."""
    model = dit_preset(cfg.model)
    vae.check_video_shape(cfg.frames, h, w, cfg=VAE_PRESETS["hunyuan-video"], size_multiple=16)
    if model.heads_num % cfg.parallel.cp:
        raise ValueError(f"heads_num {model.heads_num} of {cfg.model!r} is not divisible by --parallel.cp "
                         f"{cfg.parallel.cp}")
    tokens = ((cfg.frames - 1) // 4 + 1) * (h // 16) * (w // 16)
    if tokens % cfg.parallel.cp:
        raise ValueError(f"{cfg.frames} frames at {h}x{w} give {tokens} video tokens, not divisible by "
                         f"--parallel.cp {cfg.parallel.cp}: change the size or frames")


def _check_memory(cfg: SampleConfig) -> None:
    m = cfg.memory
    swap.swapped_prefixes(dit_preset(cfg.model), m.blocks_to_swap)  # range check
    if m.blocks_to_swap and cfg.cuda_graph == "on":
        raise ValueError("--cuda-graph on and --memory.blocks-to-swap do not go together: the swap decides its "
                         "copies on the host per block; use --cuda-graph auto or off")
    if m.enabled and cfg.cache.kind == "teacache":
        raise ValueError("--cache.kind teacache reads double block 0's weights outside the blocks, which "
                         "--memory.* stores swapped or in fp8: use --cache.kind fbcache")
    if m.fp8_weights:
        fp8.require()


def _check_weights(cfg: SampleConfig) -> None:
    if cfg.dit is None and not cfg.tiny:
        raise ValueError(f"model {cfg.model!r} needs --dit (official .pt, diffusers folder, safetensors or a run's "
                         "checkpoints/)")
    if cfg.dit is not None and not cfg.dit.exists():
        raise ValueError(f"--dit {cfg.dit} does not exist")
    for path, _ in map(parse_spec, cfg.lora):
        if not path.is_file():
            raise ValueError(f"--lora {path} does not exist")
    given = {k: getattr(cfg.models, k) for k in ("vae", "text_encoder", "text_encoder_2")}
    if not cfg.random_models and None in given.values():
        raise ValueError("give --models.vae, --models.text-encoder and --models.text-encoder-2 (or, with a tiny "
                         "preset, --models.preset tiny for random tiny models)")
    for k, p in given.items():
        if p is not None and not p.exists():
            raise ValueError(f"--models.{k.replace('_', '-')} {p} does not exist")


def settings(cfg: SampleConfig) -> dict:
    """Everything of the run that decides pixels, with the weights' identities (sidecar, reruns)."""
    real_cfg = cfg.sampling.real_cfg
    return {"model": cfg.model, "frames": cfg.frames, "fps": cfg.fps, "sampling": asdict(cfg.sampling),
            "cache": asdict(cfg.cache), "memory": asdict(cfg.memory),
            "negative_prompt": cfg.negative_prompt if real_cfg else None,
            "dtype": cfg.dtype, "vae_dtype": cfg.vae_dtype, "text_dtype": cfg.text_dtype,
            "vae_tiling": cfg.vae_tiling, "dit": sj.file_identity(cfg.dit), "random_dit": cfg.dit is None,
            "lora": [(sj.file_identity(p), scale) for p, scale in map(parse_spec, cfg.lora)],
            "models": {k: sj.file_identity(getattr(cfg.models, k)) for k in ("vae", "text_encoder", "text_encoder_2")},
            "random_models": cfg.random_models}


def plan(cfg: SampleConfig) -> Plan:
    """Validate the whole run and list its jobs; loads no model (images are opened to size them)."""
    model = dit_preset(cfg.model)
    if cfg.num_videos < 1 or cfg.fps < 1 or cfg.parallel.cp < 1:
        raise ValueError(f"--num-videos ({cfg.num_videos}), --fps ({cfg.fps}) and --parallel.cp ({cfg.parallel.cp}) "
                         "must be >= 1")
    i2v = model.i2v_condition_type is not None
    if cfg.cuda_graph == "on" and cfg.cache.enabled:
        raise ValueError(f"--cuda-graph on captures the whole step, but --cache.kind {cfg.cache.kind} decides on "
                         "the host each step: use one of them")
    _check_memory(cfg)
    _check_weights(cfg)
    prompts = _prompts(cfg)
    images = _images(cfg, len(prompts), i2v)
    jobs = []
    for p, (prompt, image) in enumerate(zip(prompts, images)):
        h, w, exact = _size(cfg, image)
        check_shape(cfg, h, w)
        for k in range(cfg.num_videos):
            jobs.append(sj.Job(index=len(jobs), prompt=prompt, seed=cfg.seed + k, height=h, width=w, image=image,
                               exact_resize=exact))
    return Plan(jobs=jobs, settings=settings(cfg), i2v=i2v, real_cfg=cfg.sampling.real_cfg)

