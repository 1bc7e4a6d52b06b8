"""Feature extraction for one batch of clips: VAE latents and text conditioning.

Per clip: the VAE posterior *sample* x scaling factor (as the seed's extraction does),
drawn with a generator seeded by (seed, clip index) so results do not depend on how clips
are batched or spread over ranks; LLaVA text states + mask with the *same template as
sampling* (the video template); CLIP pooled. I2V adds the clean first-frame latent
(posterior mode of the frame encoded alone, scaled) and gives LLaVA that frame as its image;
with noimg also the LLaVA states of (same prompt, black image of the frame's size), the
conditioning that I2V image dropout trains on (upstream's --sematic-cond-drop-p): it
depends on the prompt, so it is one more LLaVA pass per clip (CLIP ignores images).
Batches are planned per bucket in a fixed order, so any number of ranks writes the same files.
Shapes: B clips, C=3 pixels / 16 latent channels, T frames, H, W.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from hvfunc import io, params, vae
from hvfunc.config import VAE_PRESETS, VAEConfig
from hvfunc.data.buckets import mix_seed
from hvfunc.data.dataset import VideoDataset
from hvfunc.data.features import NOIMG_KEYS, noimg_problem, sample_path
from hvfunc.data.video import ClipError
from hvfunc.params import Params
from hvfunc.text import TextEncoders, black_images, encode_prompts
from hvfunc.vae.ckpt import save_vae


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Where the VAE and text encoders come from (scripts/extract.py and scripts/sample.py: `--models.*`)."""

    preset: Literal["tiny", "none"] = "none"
    """tiny: build tiny random VAE / LLM / CLIP under <out>/models and load them from there (extract.py:
    a --models.* path given replaces that one; sample.py: random ones only when no path is given)."""
    vae: Path | None = None
    """VAE folder (pytorch_model.pt + config.json, or diffusers' vae/)."""
    text_encoder: Path | None = None
    """Converted LLM folder (scripts/convert.py text-encoder), or the full LLaVA folder for I2V."""
    text_encoder_2: Path | None = None
    """CLIP-L text model folder."""


@dataclass(frozen=True, kw_only=True)
class Models:
    vae: Params
    vae_cfg: VAEConfig
    text: TextEncoders
    tiling: vae.Tiling | None = None
    """VAE tiling (upstream: on), bounds memory for large clips."""
    encoder: vae.model.Net = vae.encoder
    """The VAE encoder network: vae.encoder, or a compiled one (graphs.vae.vae_nets)."""


def write_tiny_models(root: str | Path, task: str) -> tuple[Path, Path, Path]:
    """Tiny random VAE, LLM (LLaVA for I2V) and CLIP written as upstream's folders (the demo,
    tests, benchmarks); returns (vae, text_encoder, text_encoder_2) folders."""
    from hvfunc.text.tiny import write_tiny_encoders

    root, cfg = Path(root), VAE_PRESETS["tiny"]
    save_vae(params.init(vae.vae_spec(cfg), generator=torch.Generator().manual_seed(0)), cfg, root / "vae")
    llm, clip = write_tiny_encoders(root, i2v=task == "i2v")
    return root / "vae", llm, clip


def load_models(vae_dir: Path, llm_dir: Path, clip_dir: Path, *, tiny: bool = False,
                tiling: bool = True) -> Models:
    """Models through the real loaders (tiny ones: fp32 encoders, templates measured on their tokenizer)."""
    from hvfunc.text.load import load_encoders
    from hvfunc.vae.ckpt import load_vae

    vae_params, vae_cfg = load_vae(vae_dir)
    text = load_encoders(llm_dir, clip_dir, strict=not tiny, dtype=torch.float32 if tiny else torch.float16)
    return Models(vae=vae_params, vae_cfg=vae_cfg, text=text, tiling=vae.Tiling() if tiling else None)


def plan_batches(ds: VideoDataset, batch_size: int) -> list[list[int]]:
    """Clip indices in global batches: per bucket, in index order, chunks of batch_size."""
    return [idx[i:i + batch_size] for idx in ds.buckets.values() for i in range(0, len(idx), batch_size)]


def clip_id(ds: VideoDataset, i: int) -> str:
    """Feature file name of clip i: its video file's stem (names are unique: duplicates are skipped)."""
    return Path(ds.entries[i].path).stem


def pending(root: str | Path, ds: VideoDataset, batches: list[list[int]], *,
            noimg: bool) -> tuple[list[list[int]], list[str]]:
    """(batches still to extract, ids of existing files redone because they lack the black-image
    features that noimg asks for, or cannot be read). A batch is redone whole: its clips are
    encoded together."""

    def lacks(path: Path) -> bool:
        try:
            return noimg_problem(io.safetensors_shapes(path)) is not None
        except Exception:  # noqa: BLE001 - unreadable: extracting it again is the fix
            return True

    todo, redo = [], []
    for b in batches:
        paths = [sample_path(root, clip_id(ds, i)) for i in b]
        lacking = [p.stem for p in paths if noimg and p.is_file() and lacks(p)]
        if lacking or not all(p.is_file() for p in paths):
            todo.append(b)
            redo += lacking
    return todo, redo


def _to_pil(frame_CHW: Tensor):
    from PIL import Image

    arr = ((frame_CHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def extract(models: Models, ds: VideoDataset, indices: list[int], *, seed: int, task: str,
            device: torch.device, dtype: torch.dtype = torch.float32,
            noimg: bool = False) -> list[tuple[dict, dict[str, Tensor]]]:
    """(record, tensors) for every readable clip of one batch; unreadable ones go to ds.report.
    noimg (I2V only): also the black-image conditioning NOIMG_KEYS."""
    if noimg and task != "i2v":
        raise ValueError(f"black-image features (image dropout) are for I2V only; task is {task!r}")
    loaded = []
    for i in indices:
        try:
            loaded.append((i, ds.load(i, mix_seed(seed, i))))
        except ClipError as e:
            ds.report.add(ds.entries[i].path, e.reason, e.detail, "read")
    if not loaded:
        return []
    video = torch.stack([s["video"] for _, s in loaded]).to(device, dtype)  # [B, 3, T, H, W] in [-1, 1]
    p = {k: v.to(device, dtype) for k, v in models.vae.items()}
    mean, logvar = vae.encode(p, video, cfg=models.vae_cfg, tiling=models.tiling, slicing=True, net=models.encoder)
    lat = []
    for b, (i, _) in enumerate(loaded):
        g = torch.Generator(device="cpu").manual_seed(mix_seed(seed, i))
        lat.append(vae.scale_latents(vae.sample(mean[b:b + 1].float().cpu(), logvar[b:b + 1].float().cpu(),
                                                generator=g), cfg=models.vae_cfg)[0])
    prompts = [s["caption"] for _, s in loaded]
    images = [_to_pil(video[b, :, 0].float().cpu()) for b in range(len(loaded))] if task == "i2v" else None
    n = len(prompts)
    if noimg:  # one encoder call, chunked by n: the real-image chunk is computed exactly as without noimg
        prompts, images = prompts * 2, images + black_images(images)
    text = encode_prompts(models.text, prompts, images=images, device=device, dtype=torch.float32, video=True,
                          batch_size=n)
    cond = None
    if task == "i2v":  # the reference frame alone, posterior mode (as upstream encodes the I2V image)
        m, _ = vae.encode(p, video[:, :, :1], cfg=models.vae_cfg, slicing=True, net=models.encoder)
        cond = vae.scale_latents(m.float().cpu(), cfg=models.vae_cfg)
    out = []
    for b, (i, s) in enumerate(loaded):
        t = {"latents": lat[b], "text_states": text.text_states[b].cpu(), "text_mask": text.text_mask[b].cpu(),
             "text_states_2": text.text_states_2[b].cpu()}
        if cond is not None:
            t["cond_latents"] = cond[b]
        if noimg:
            t |= {NOIMG_KEYS[0]: text.text_states[n + b].cpu(), NOIMG_KEYS[1]: text.text_mask[n + b].cpu()}
        T, H, W = s["bucket"]
        out.append(({"id": clip_id(ds, i), "caption": s["caption"], "task": task, "source": s["path"],
                     "frames": T, "height": H, "width": W}, t))
    return out


@torch.no_grad()
def uncond(models: Models, task: str, device: torch.device, size: tuple[int, int] = (64, 64)) -> dict[str, Tensor]:
    """The empty prompt's conditioning (I2V: with a black reference image), for CFG dropout."""
    images = None
    if task == "i2v":
        from PIL import Image

        images = black_images([Image.new("RGB", (size[1], size[0]))])
    t = encode_prompts(models.text, [""], images=images, device=device, dtype=torch.float32, video=True)
    return {"text_states": t.text_states[0].cpu(), "text_mask": t.text_mask[0].cpu(),
            "text_states_2": t.text_states_2[0].cpu()}
