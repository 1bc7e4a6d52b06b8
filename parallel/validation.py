"""Sample videos while training: the config, its start-up checks, and the validation stage.

`--validation.prompts FILE --validation.every N`: after every N-th optimizer step (and no
other), each prompt gets one video with the current weights (the EMA when on; LoRA adapters
merged as `sample.py --lora` merges them), written to `<out>/samples/step-<N>/` by the
sampler's own code (parallel.sample_run.sample_videos: the same noise from the seed, Euler
loop, decode, mp4, sidecar and file names as scripts/sample.py). The prompts were encoded
once by `scripts/extract.py --validation-prompts` (hvfunc.data.validation, `encode` here):
training never loads a text encoder, only the VAE (held on the host between validations).

Ranks: with cp > 1 the ranks of a training cp group sample each video together (Ulysses over
its tokens, as sample.py --parallel.cp); the groups (the dp and tp coordinates) take the
prompts round-robin and each group's first rank decodes and writes. Weights: every rank
gathers the whole DiT in the compute dtype (leaf by leaf, so at most one whole fp32 leaf
besides it), as sample.py holds it; it is freed after the stage. At 13B in bf16 that is
26 GB per device on top of the training shards while validation runs.

Randomness: the noise comes from the validation seed's own generator and the stage runs in
torch.random.fork_rng, so a run's losses do not depend on whether it validates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from graphs import backends
from graphs.sampling import SampleGraphs, sampling_blocks
from hvfunc import lora, media, pipeline
from hvfunc.config import DiTConfig, VAEConfig
from hvfunc.data import validation as vdata
from hvfunc.data.extract import ModelArgs
from hvfunc.lora import LoraConfig
from hvfunc.params import Params
from hvfunc.sample import Sampling
from parallel import lora_train, runtime, sample_run
from parallel import sample_jobs as sj
from parallel import sampler as sp
from parallel.mesh import Meshes

if TYPE_CHECKING:
    from parallel.trainer import TrainConfig


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Sample videos every N optimizer steps (off unless --validation.prompts and --validation.every)."""

    prompts: Path | None = None
    """Validation prompts, one a line; their encodings must be in <features>/validation
    (scripts/extract.py --validation-prompts FILE writes them). None: no validation."""
    images: Path | None = None
    """I2V: one reference image path a line, one per prompt (as sample.py --images-file; the same
    file extract.py --validation-images encoded with)."""
    every: int = 0
    """Sample after every N-th optimizer step (0: never)."""
    vae: Path | None = None
    """VAE folder to decode with (official vae/ or diffusers'); the trainer loads no other model."""
    height: int = 256
    """Video height (multiple of 16)."""
    width: int = 256
    """Video width (multiple of 16)."""
    frames: int = 17
    """Frames (4k+1)."""
    seed: int = 42
    """Noise seed of every prompt's video (as sample.py --seed): the same noise at every step."""
    sampling: Sampling = field(default_factory=lambda: Sampling(steps=30))
    """Sampler settings (--validation.sampling.steps, .shift, .guidance, .cfg-scale; cfg-scale > 1
    needs extract.py --validation-negative-prompt)."""
    fps: int = 24
    """Frame rate written to the mp4."""
    vae_dtype: Literal["fp16", "bf16", "fp32"] | None = None
    """VAE dtype; None: the training's --dtype."""
    vae_tiling: bool = True
    """Tiled VAE decode with upstream's numbers."""
    save_latents: bool = False
    """Also write each video's final latents (<name>.latents.safetensors)."""

    @property
    def enabled(self) -> bool:
        return self.prompts is not None


@dataclass(frozen=True)
class Prompts:
    """The validation prompts and (I2V) their reference images, read from their files."""

    file: Path
    prompts: list[str]
    images_file: Path | None
    images: list[Path] | None

    @classmethod
    def read(cls, file: Path, images_file: Path | None, *, i2v: bool, flags: tuple[str, str]) -> Prompts:
        """flags: the prompt and image flags, named in the errors."""
        prompts = sj.read_lines(file, flags[0])
        if not i2v:
            if images_file is not None:
                raise ValueError(f"{flags[1]} {images_file} given but the model is text-to-video")
            return cls(file, prompts, None, None)
        if images_file is None:
            raise ValueError(f"image-to-video: give {flags[1]} (one reference image per prompt of {file})")
        images = sj.read_images(images_file, len(prompts), flags[1])
        for im in images:
            media.load_image(im)  # readable now, not after the models (or N training steps)
        return cls(file, prompts, images_file, images)


@dataclass(frozen=True)
class Samples:
    """One validation's videos, for loggers (train_loop puts the latest in Run.samples before `_log`):
    on rank 0 every video of the step in prompt order, as (mp4 path, first frame uint8 [H, W, 3]);
    on other ranks no videos."""

    step: int
    videos: list[tuple[Path, np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class Validator:
    """What every validation uses, checked and loaded at start."""

    every: int
    template: sp.SampleConfig
    """The sampler's config of these videos (its out is set per step)."""
    plan: sp.Plan
    conds: dict
    """{(prompt, image): pipeline.Conditioning} as sample_run's text stage makes them."""
    vae: Params
    """Host copy, moved to the device per validation."""
    vae_cfg: VAEConfig
    adapters: LoraConfig | None
    """LoRA runs: the adapters' config (their alpha / r scales the merge)."""
    run_out: Path
    ema: bool


def load(cfg: TrainConfig, model: DiTConfig, adapters: LoraConfig | None) -> Validator | None:
    """The run's Validator, None when validation is off. Every user error (flags,
    files, sizes, encodings missing or made from other prompts) raises here, before training."""
    v = cfg.validation
    if v.prompts is None and v.every == 0:
        return None
    if v.prompts is None or v.every <= 0:
        raise ValueError(f"--validation.prompts FILE and --validation.every N (N >= 1) go together; got prompts "
                         f"{v.prompts}, every {v.every}")
    if getattr(getattr(cfg, "memory", None), "enabled", False):  # parallel.memory_train's fp8 / host-shard base
        raise ValueError("--validation.* with --memory.* is not built yet: validation gathers the DiT from its "
                         "DTensor leaves; drop --memory.* or --validation.*")
    if v.vae is None or not v.vae.exists():
        raise ValueError(f"--validation.vae: give the VAE folder that decodes the validation videos (got {v.vae})")
    pr = Prompts.read(v.prompts, v.images, i2v=model.i2v_condition_type is not None,
                      flags=("--validation.prompts", "--validation.images"))
    prompts, images = pr.prompts, pr.images
    template = sp.SampleConfig(
        model=cfg.model, height=v.height, width=v.width, frames=v.frames, sampling=v.sampling, seed=v.seed,
        fps=v.fps, dtype=cfg.dtype, vae_dtype=v.vae_dtype or cfg.dtype, vae_tiling=v.vae_tiling,
        save_latents=v.save_latents, attention=cfg.attention, device=cfg.device, models=ModelArgs(vae=v.vae),
        parallel=sp.SampleParallel(cp=cfg.parallel.cp), out=cfg.out / "samples")
    sp.check_shape(template, v.height, v.width)
    if model.guidance_embed != (v.sampling.guidance is not None):
        raise ValueError(f"--validation.sampling.guidance {v.sampling.guidance}: model {cfg.model!r} "
                         f"{'has' if model.guidance_embed else 'has no'} guidance embedding (6.0 upstream, or None)")
    index, conds = vdata.read(cfg.features, prompts, images, prompts_file=v.prompts)
    _check_encodings(index, conds, model, v)
    template = dataclasses.replace(template, negative_prompt=index["negative_prompt"] or "")
    jobs = [sj.Job(index=i, prompt=p, seed=v.seed, height=v.height, width=v.width,
                   image=None if images is None else images[i]) for i, p in enumerate(prompts)]
    settings = sp.settings(template) | {
        "random_dit": False, "random_models": False, "text_dtype": index["text_encoders"].get("dtype"),
        "models": {"vae": sj.file_identity(v.vae), "text_encoders": index["text_encoders"]},
        "lora": [] if adapters is None else [{"trained": dataclasses.asdict(adapters)}]}
    from hvfunc.vae.ckpt import load_vae

    vae, vae_cfg = load_vae(v.vae, dtype=sp.DTYPES[template.vae_dtype])
    return Validator(every=v.every, template=template, vae=vae, vae_cfg=vae_cfg, adapters=adapters,
                     plan=sp.Plan(jobs=jobs, settings=settings, i2v=images is not None, real_cfg=v.sampling.real_cfg),
                     conds={(j.prompt, j.image): c for j, c in zip(jobs, conds)}, run_out=cfg.out,
                     ema=cfg.ema.enabled)


def _check_encodings(index: dict, conds: list[pipeline.Conditioning], model: DiTConfig, v: ValidationConfig) -> None:
    if v.sampling.real_cfg and index["negative_prompt"] is None:
        raise ValueError(f"--validation.sampling.cfg-scale {v.sampling.cfg_scale} needs the negative prompt's "
                         f"encodings: run {vdata.EXTRACT_FLAG} {v.prompts} --validation-negative-prompt TEXT")
    got = (conds[0].cond["text_states"].shape[-1], conds[0].cond["text_states_2"].shape[-1])
    if got != (model.text_states_dim, model.text_states_dim_2):
        raise ValueError(f"the validation encodings have text widths {got}, the model takes "
                         f"{(model.text_states_dim, model.text_states_dim_2)}: encode them with this model's encoders")


def due(v: Validator | None, step: int) -> bool:
    return v is not None and step % v.every == 0


@torch.no_grad()
def weights(params: Params, ema: Params | None, adapters: LoraConfig | None, dtype: torch.dtype) -> Params:
    """The DiT to sample with, whole on every rank in `dtype`: the EMA in place of the trained leaves
    when on; LoRA adapters merged into the base (fp32 math, hvfunc.lora.merge_all, as sample.py --lora
    merges an exported adapter file). Gathered leaf by leaf (DTensor.full_tensor: a collective over
    the storage mesh, so every rank calls this)."""
    base, tensors = {}, {}
    for k, p in (dict(params) | (ema or {})).items():
        whole = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if lora.is_adapter(k):
            tensors[k] = whole.float()
        else:
            base[k] = whole.to(dtype)
    if tensors:
        base, _ = lora.merge_all(base, [(lora_train.as_lora(tensors, adapters), 1.0)])
    return base


def _ranks(meshes: Meshes) -> sample_run.Ranks:
    """A training cp group samples one video together; the dp x tp coordinates number the groups."""
    cp = meshes.size("cp")
    group = meshes.data_rank * meshes.size("tp") + meshes.rank("tp")
    return sample_run.Ranks(group=group, groups=dist.get_world_size() // cp, lead=meshes.rank("cp") == 0,
                            mesh=meshes.compute["cp"] if cp > 1 else None)


def sample(v: Validator, params: Params, ema: Params | None, step: int, meshes: Meshes,
           device: torch.device) -> Samples:
    """Every rank: this step's videos into <out>/samples/step-<step>/ (rewritten if there)."""
    cfg = dataclasses.replace(v.template, out=v.run_out / "samples" / f"step-{step:08d}")
    plan = dataclasses.replace(v.plan, settings=v.plan.settings | {
        "dit": {"training_run": str(v.run_out.resolve()), "step": step, "weights": "ema" if v.ema else "params"}})
    ranks = _ranks(meshes)
    rng = {"devices": []} if device.type == "cpu" else {"devices": [device.index or 0], "device_type": device.type}
    with torch.random.fork_rng(**rng):
        dit = {k: x.to(device) for k, x in weights(params, ema, v.adapters, sp.DTYPES[cfg.dtype]).items()}
        models = {"dit": dit, "vae": {k: x.to(device) for k, x in v.vae.items()}, "vae_cfg": v.vae_cfg,
                  "attn": backends.attention_backend(cfg.attention), "runner": None,
                  "blocks": sampling_blocks(SampleGraphs(), device=device)}  # eager
        if ranks.lead:
            cfg.out.mkdir(parents=True, exist_ok=True)
        report = {"dit_source": f"training step {step} ({plan.settings['dit']['weights']})",
                  "ranks": {"world": dist.get_world_size(), "cp": cfg.parallel.cp}}
        mine = plan.jobs[ranks.group::ranks.groups]
        written = sample_run.sample_videos(cfg, plan, mine, v.conds, models, ranks, device, report)
        del models, dit
        if device.type != "cpu":  # the whole DiT copy goes back to the device's pool
            runtime.free_memory(device)
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(written, everyone, dst=0)
    videos = sorted((x for part in everyone or [] for x in part), key=lambda x: x[0].name)
    return Samples(step=step, videos=videos)


def encode(text, features: Path, prompts: Prompts, *, negative: str | None, device: torch.device, encoders: dict,
           batch_size: int = 8) -> Path:
    """scripts/extract.py --validation-prompts: encode the prompts (I2V: with their images) as the
    sampler's text stage does (hvfunc.pipeline.encode) and store them (hvfunc.data.validation)."""
    images = None if prompts.images is None else [media.load_image(p) for p in prompts.images]
    conds = pipeline.encode(text, prompts.prompts, negative=negative, images=images, device=device,
                            batch_size=batch_size)
    return vdata.write(features, prompts.prompts, prompts.images, conds, negative=negative, encoders=encoders,
                       sources={"prompts": prompts.file, "images": prompts.images_file})
