"""The files a user of docs/weights.md has after the downloads, as tiny random models in the
real layouts, for tests/test_docs.py. Nothing is downloaded; every folder is what the real
loaders read:

    ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt   tiny T2V DiT, {"module": official keys}
    ckpts/hunyuan-video-t2v-720p/vae/{pytorch_model.pt,config.json}         tiny VAE
    ckpts/hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt   tiny I2V DiT
    ckpts/hunyuan-video-i2v-720p/vae/                                       tiny VAE
    ckpts/hunyuan-video-i2v-720p/lora/{embrace,hair_growth}_kohaya_weights.safetensors   official LoRAs (r 4)
    ckpts/llava-llama-3-8b-v1_1-transformers/                               tiny LLaVA + the real Llama-3 tokenizer
    ckpts/text_encoder_2/                                                   full CLIPModel folder (tiny text half)
    ref.jpg, prompts.txt, images.txt                                        what a user brings to sampling (and validation)

The LLaVA tokenizer is Meta's Llama-3 BPE (as xtuner's), so the official template constants
are checked, not measured, as for the real weights; its vision tower keeps ViT-L/14-336's
geometry (576 image tokens). `ckpts/text_encoder` and `ckpts/text_encoder_i2v` are not here:
docs/weights.md's commands make them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import random_params
from text_fixtures import llama3_tokenizer, write_clip, write_llava

from hvfunc import ckpt, io, lora, lora_formats, params, vae
from hvfunc.config import DIT_PRESETS, VAE_PRESETS
from hvfunc.text.tiny import clip_tokenizer
from hvfunc.vae.ckpt import save_vae

PROMPTS = ["A red circle moves from left to right.", "A blue square moves up."]


def _dit(folder: Path, preset: str, seed: int) -> None:
    cfg = DIT_PRESETS[preset]
    p = random_params(cfg, seed=seed, scale=0.1)
    io.save_pickle({"module": ckpt.dit_to_official(p, cfg)}, folder / "transformers" / "mp_rank_00_model_states.pt")
    save_vae(params.init(vae.vae_spec(VAE_PRESETS["tiny"]), generator=torch.Generator().manual_seed(0)),
             VAE_PRESETS["tiny"], folder / "vae")


def _lora(path: Path, seed: int) -> None:
    """An official-format LoRA on the tiny I2V DiT with non-zero B (a fresh one would change nothing)."""
    cfg, g = DIT_PRESETS["tiny-i2v"], torch.Generator().manual_seed(seed)
    fresh = lora.init_lora(cfg, lora.LoraConfig(rank=4, alpha=4.0), generator=g)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.05 if k.endswith("lora_B") else v
               for k, v in fresh.tensors.items()}
    lora_formats.write(lora.Lora(tensors, fresh.alpha), path, "official")


def _inputs(ws: Path) -> None:
    from PIL import Image

    img = Image.new("RGB", (96, 64), (20, 20, 20))
    img.paste((220, 30, 30), (10, 20, 30, 44))
    img.save(ws / "ref.jpg")
    (ws / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (ws / "images.txt").write_text("ref.jpg\nref.jpg\n")


def build(ws: Path) -> None:
    """Write every file of the module docstring under the workspace `ws`."""
    c = ws / "ckpts"
    _dit(c / "hunyuan-video-t2v-720p", "tiny", seed=0)
    _dit(c / "hunyuan-video-i2v-720p", "tiny-i2v", seed=1)
    for seed, name in enumerate(("embrace", "hair_growth")):
        _lora(c / "hunyuan-video-i2v-720p" / "lora" / f"{name}_kohaya_weights.safetensors", seed)
    write_llava(c / "llava-llama-3-8b-v1_1-transformers", llama3_tokenizer(), size=336)
    write_clip(c / "text_encoder_2", clip_tokenizer(), width=16)  # tiny DiT: text_states_dim_2 16
    _inputs(ws)
