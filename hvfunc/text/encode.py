"""The text-conditioning entry point: prompts (+ reference images) -> DiT text inputs.

Shapes: B prompts, S text tokens (256 T2V; 144 image + 252 text I2V), D LLM width (4096),
P pooled CLIP width (768).

The encoders are frozen transformers modules kept where they were loaded (CPU, fp16 by
default); `encode_prompts` moves each one to `device` only while it encodes and back
afterwards, so the 8B LLM and the DiT never have to share accelerator memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hvfunc.text import clip as clip_mod
from hvfunc.text import llm as llm_mod
from hvfunc.text import templates as T


@dataclass(frozen=True, kw_only=True)
class TextEncoders:
    """The frozen encoders, their tokenizers and the fitted templates (build with make_encoders)."""

    llm: Any
    """transformers LlamaModel (T2V) or LlavaForConditionalGeneration (I2V)."""
    tokenizer: Any
    """The LLaVA-Llama-3 tokenizer (right padding)."""
    clip: Any
    """transformers CLIPTextModel (CLIP-L)."""
    clip_tokenizer: Any
    video_template: T.PromptTemplate
    """Used for videos (upstream: video_length > 1) and always for I2V."""
    image_template: T.PromptTemplate | None
    """Used for single images in T2V; None for I2V (upstream encodes I2V as video only)."""
    image_processor: Any = None
    """CLIPImageProcessor of the LLaVA vision tower (I2V only)."""
    skip: int = T.HIDDEN_STATE_SKIP_LAYER
    """Take hidden_states[-(skip + 1)]."""
    text_len: int = T.TEXT_LEN
    clip_len: int = T.CLIP_LEN

    @property
    def i2v(self) -> bool:
        return self.video_template.i2v


@dataclass(frozen=True)
class TextConditioning:
    """The DiT's text inputs."""

    text_states: Tensor
    """[B, S, D] LLM states (right-padded; padding rows are masked out by text_mask)."""
    text_mask: Tensor
    """[B, S] int64, ones then zeros."""
    text_states_2: Tensor
    """[B, P] pooled CLIP-L output (feeds vector_in)."""


def image_tokens(llava_config) -> int:
    """Image features per image of a LLaVA config: (image_size / patch)^2 (+1 if the CLS is kept)."""
    v = llava_config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (llava_config.vision_feature_select_strategy == "full")


def make_encoders(llm, tokenizer, clip, clip_tokenizer, *, image_processor=None, strict: bool = True,
                  **options) -> TextEncoders:
    """Freeze the modules and fit the official templates to the tokenizer (see templates.fit).

    I2V is chosen by the LLM itself (a LLaVA model, which then needs `image_processor`).
    strict=False measures crop_start etc. from the tokenizer instead of checking the
    official Llama-3 constants (tiny test tokenizers). `options`: skip, text_len, clip_len.
    """
    i2v = getattr(llm.config, "model_type", None) == "llava"
    if i2v and image_processor is None:
        raise ValueError("a LLaVA text encoder (I2V) needs its CLIPImageProcessor (image_processor=...)")
    for m in (llm, clip):
        m.eval().requires_grad_(False)
    if i2v:
        n = image_tokens(llm.config)
        video = T.fit(T.template("dit-llm-encode-video-i2v"), tokenizer, image_tokens=n, strict=strict)
        image = None
    else:
        video = T.fit(T.template("dit-llm-encode-video"), tokenizer, strict=strict)
        image = T.fit(T.template("dit-llm-encode"), tokenizer, strict=strict)
    return TextEncoders(llm=llm, tokenizer=tokenizer, clip=clip, clip_tokenizer=clip_tokenizer,
                        video_template=video, image_template=image, image_processor=image_processor, **options)


@contextmanager
def on_device(module, device: torch.device | str, *, offload: bool = True) -> Iterator[None]:
    """Run the body with `module` on `device`; move it back to where it was afterwards (offload)."""
    home, target = next(module.parameters()).device, torch.device(device)
    if home.type == target.type and target.index in (None, home.index):
        yield
        return
    module.to(target)
    try:
        yield
    finally:
        if offload:
            module.to(home)


def _chunks(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def encode_prompts(encoders: TextEncoders, prompts: str | Sequence[str], *, images: Sequence | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, video: bool = True,
                   batch_size: int | None = None, offload: bool = True) -> TextConditioning:
    """Prompts (and, for I2V, one reference image each) -> TextConditioning on `device`.

    video: the video template (upstream: video_length > 1) or the image one (T2V only).
    images: PIL images (or what the CLIPImageProcessor takes); for the unconditional
    I2V branch pass `black_images(images)` with the negative prompts.
    batch_size: prompts per encoder call (None: all at once). dtype: of the returned states.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    if encoders.i2v:
        if images is None or len(images) != len(prompts):
            raise ValueError(f"I2V encoders need one reference image per prompt: got "
                             f"{None if images is None else len(images)} images for {len(prompts)} prompts")
        if not video:
            raise ValueError("I2V conditioning uses the video template only (as upstream); pass video=True")
    elif images is not None:
        raise ValueError("images were given but the text encoder is not a LLaVA (I2V) model")
    tpl = encoders.video_template if video else encoders.image_template
    states, masks, pooled = [], [], []
    with torch.no_grad():
        with on_device(encoders.llm, device, offload=offload):
            for sl in _chunks(len(prompts), batch_size):
                if encoders.i2v:
                    h, m = llm_mod.encode_llava(encoders.llm, encoders.tokenizer, encoders.image_processor,
                                                prompts[sl], list(images[sl]), tpl=tpl, skip=encoders.skip,
                                                text_len=encoders.text_len)
                else:
                    h, m = llm_mod.encode_llm(encoders.llm, encoders.tokenizer, prompts[sl], tpl=tpl,
                                              skip=encoders.skip, text_len=encoders.text_len)
                states.append(h.to(device, dtype))
                masks.append(m.to(device, torch.long))
        with on_device(encoders.clip, device, offload=offload):
            for sl in _chunks(len(prompts), batch_size):
                p = clip_mod.encode_clip(encoders.clip, encoders.clip_tokenizer, prompts[sl],
                                         max_length=encoders.clip_len)
                pooled.append(p.to(device, dtype))
    return TextConditioning(torch.cat(states), torch.cat(masks), torch.cat(pooled))


def black_images(images: Sequence) -> list:
    """The unconditional I2V reference: a black image of each image's size (PIL or array-like)."""
    from PIL import Image

    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(Image.new("RGB", im.size, (0, 0, 0)))
        elif hasattr(im, "shape"):  # tensor / ndarray: zeros in any value range are black
            out.append(im * 0)
        else:
            raise ValueError(f"cannot make a black image like a {type(im).__name__}; pass PIL images or arrays")
    return out
