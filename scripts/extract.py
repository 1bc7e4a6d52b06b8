"""Extract training features from raw videos: VAE latents + text conditioning, per clip.

    torchrun --nproc-per-node 2 scripts/extract.py --data data.txt --out runs/feats --models.preset tiny
    torchrun --nproc-per-node 8 scripts/extract.py --data data.txt --out /data/feats \\
        --models.vae ckpts/hunyuan-video-t2v-720p/vae --models.text-encoder ckpts/text_encoder \\
        --models.text-encoder-2 ckpts/text_encoder_2 --data-preset hunyuan-video-t2v

Each rank takes a disjoint share of the global batches (planned per bucket, in a fixed
order), writes one safetensors per clip atomically and skips clips already written, so
a rerun resumes. Bad clips are skipped and reported (report.json); rank 0 then builds
index.jsonl and uncond.safetensors. Any number of ranks writes the same files.

I2V also stores per clip the LLaVA states of (same prompt, black image): the features that
training with --image-dropout needs (--image-dropout-features False leaves them out). They
cost one extra LLaVA forward per clip (8B LLM plus vision tower; the VAE work is unchanged)
and S x D x 4 bytes per clip on disk (S x D = 396 x 4096 for the real model: 6.5 MB).
A rerun that asks for them re-extracts the existing clips that lack them.

--validation-prompts FILE (I2V: --validation-images FILE) also encodes those prompts, as
sample.py's text stage does, into <out>/validation/ for train.py --validation.prompts FILE
(sample videos while training; parallel.validation): the trainer loads no text encoder.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfunc import io  # noqa: E402
from hvfunc.config import data_preset  # noqa: E402
from hvfunc.data import extract as ex  # noqa: E402
from hvfunc.data.extract import ModelArgs  # noqa: E402
from hvfunc.data.dataset import build_dataset  # noqa: E402
from hvfunc.data.features import NOIMG_FLAG, NOIMG_KEYS, build_index, write_sample  # noqa: E402
from hvfunc.data.report import SkipReport  # noqa: E402
from graphs.blocks import Compile  # noqa: E402
from graphs.vae import vae_nets  # noqa: E402
from parallel import runtime, validation  # noqa: E402
from parallel.sample_jobs import file_identity  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class ExtractArgs:
    data: Path
    """data.txt listing `<folder>,<data.json>` lines."""
    out: Path
    """Feature folder (samples/, index.jsonl, uncond.safetensors, report.json)."""
    models: ModelArgs = field(default_factory=ModelArgs)
    task: Literal["t2v", "i2v"] = "t2v"
    data_preset: str = "tiny"
    """Frame and resolution rules (hvfunc.config.DATA_PRESETS)."""
    cp: int = 1
    """Make latent frame counts divisible by this context-parallel degree."""
    batch_size: int = 2
    seed: int = 0
    """Seeds temporal crops and the VAE posterior samples."""
    tiling: bool = True
    """VAE tiling with upstream's numbers (bounds memory on large clips)."""
    device: str = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """VAE compute dtype (features are stored fp32)."""
    compile: Literal["none", "auto", "inductor", "aot_eager"] = "none"
    """Compile the VAE encoder (static shapes: one graph per distinct tile shape; graphs.vae).
    For GPUs: on CPU compiled convolutions are slower than eager (no direct oneDNN call)."""
    validation_prompts: Path | None = None
    """Also encode these prompts (one a line) into <out>/validation/ for sample videos while training
    (train.py --validation.prompts FILE; hvfunc.data.validation), as sample.py's text stage does."""
    validation_images: Path | None = None
    """--task i2v: the validation prompts' reference images, one path a line (as sample.py --images-file)."""
    validation_negative_prompt: str | None = None
    """Also encode this negative prompt (I2V: with a black image) per validation prompt, for
    train.py --validation.sampling.cfg-scale > 1; None: none."""
    image_dropout_features: bool | None = None
    """Also store, per clip, the LLaVA conditioning of (same prompt, black image) that training with
    --image-dropout needs: one extra LLaVA pass per clip. None: on for I2V, off for T2V (T2V has none)."""

    @property
    def noimg(self) -> bool:
        if self.image_dropout_features and self.task != "i2v":
            raise ValueError(f"--image-dropout-features needs --task i2v (task is {self.task}: T2V has no image)")
        return self.task == "i2v" if self.image_dropout_features is None else self.image_dropout_features


FLAGS = ("--validation-prompts", "--validation-images")


def model_paths(a: ExtractArgs) -> ModelArgs:
    """The VAE and text encoder folders (tiny: rank 0 writes them under <out>/models first)."""
    m = a.models
    if m.preset == "tiny":  # rank 0 writes them; every rank loads them from disk; a given path wins
        root = a.out / "models"
        if runtime.is_main():
            ex.write_tiny_models(root, a.task)
        dist.barrier()
        llm = root / ("text_encoder_i2v" if a.task == "i2v" else "text_encoder")
        m = ModelArgs(vae=m.vae or root / "vae", text_encoder=m.text_encoder or llm,
                      text_encoder_2=m.text_encoder_2 or root / "text_encoder_2")
    if None in (m.vae, m.text_encoder, m.text_encoder_2):
        raise ValueError("give --models.preset tiny or all of --models.vae, --models.text-encoder, "
                         "--models.text-encoder-2")
    return m


def load(a: ExtractArgs) -> tuple[ex.Models, ModelArgs]:
    m = model_paths(a)
    return ex.load_models(m.vae, m.text_encoder, m.text_encoder_2, tiny=a.models.preset == "tiny",
                          tiling=a.tiling), m


def main(a: ExtractArgs) -> None:
    noimg = a.noimg  # a bad combination fails before any work
    if a.validation_prompts is not None:
        validation.Prompts.read(a.validation_prompts, a.validation_images, i2v=a.task == "i2v", flags=FLAGS)
    device = runtime.init(a.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:  # temp files of a killed run: their clips are redone below
        for tmp in (a.out / "samples").glob(".*.tmp*"):
            tmp.unlink()
    dist.barrier()
    ds = build_dataset(a.data, data_preset(a.data_preset).replace(cp=a.cp), seed=a.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    models, paths = load(a)
    models = replace(models, vae={k: v.to(device, dtype) for k, v in models.vae.items()},  # once, not per batch
                     encoder=vae_nets(Compile(backend=a.compile), device=device)[0])
    batches = ex.plan_batches(ds, a.batch_size)[rank::world]
    todo, redo = ex.pending(a.out, ds, batches, noimg=noimg)
    done = sum(len(b) for b in batches) - sum(len(b) for b in todo)
    runtime.print0(f"{len(ds)} clips in {len(ds.buckets)} buckets; rank 0 has {len(todo)} batches to do, "
                   f"{done} clips already extracted")
    if redo:
        print(f"rank {rank}: re-extracting {len(redo)} clips whose files lack {list(NOIMG_KEYS)} or cannot be read "
              f"(e.g. {redo[0]}); --image-dropout-features False keeps them as they are", flush=True)
    bar = runtime.progress(sum(len(b) for b in todo), enabled=rank == 0, unit="clip", desc="extract")
    start = time.perf_counter()
    for b in todo:
        for record, tensors in ex.extract(models, ds, b, seed=a.seed, task=a.task, device=device, dtype=dtype,
                                          noimg=noimg):
            write_sample(a.out, record, tensors)
        bar.update(len(b))
        bar.set_postfix(clips_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
    bar.close()
    ds.report.write(a.out / f".report.rank{rank}.json", len(ds))
    dist.barrier()
    if rank == 0:
        _finish(a, ds, models, device, world)
        if a.validation_prompts is not None:
            _validation(a, models, paths, device)
    dist.barrier()


def _validation(a: ExtractArgs, models: ex.Models, paths: ModelArgs, device: torch.device) -> None:
    """Rank 0: the validation prompts' conditioning, with the encoders' identities, into <out>/validation."""
    prompts = validation.Prompts.read(a.validation_prompts, a.validation_images, i2v=a.task == "i2v", flags=FLAGS)
    encoders = {k: file_identity(getattr(paths, k)) for k in ("text_encoder", "text_encoder_2")}
    encoders["dtype"] = str(next(models.text.llm.parameters()).dtype).removeprefix("torch.")
    where = validation.encode(models.text, a.out, prompts, negative=a.validation_negative_prompt, device=device,
                              encoders=encoders)
    print(f"{len(prompts.prompts)} validation prompts of {a.validation_prompts} encoded into {where.parent}")


def _finish(a: ExtractArgs, ds, models: ex.Models, device: torch.device, world: int) -> None:
    report = SkipReport()
    for r in range(world):
        part = json.loads((a.out / f".report.rank{r}.json").read_text())
        report.listed = part["listed"]
        report.extend(part["skips"])
        (a.out / f".report.rank{r}.json").unlink()
    report.write(a.out / "report.json", len(ds))
    io.save_safetensors(ex.uncond(models, a.task, device), a.out / "uncond.safetensors")
    records = build_index(a.out)
    print(report.summary(len(ds)))
    print(f"{len(records)} samples in {a.out / 'index.jsonl'}")
    if a.task == "i2v":
        k = sum(set(NOIMG_KEYS) <= set(r.get("keys", ())) for r in records)
        print(f"black-image features for --image-dropout: {k} of {len(records)} samples"
              + ("" if k in (0, len(records)) else f"; training with --image-dropout refuses this folder until "
                 f"{NOIMG_FLAG} has filled in the rest"))


if __name__ == "__main__":
    args = tyro.cli(ExtractArgs)
    with runtime.user_errors():
        main(args)
