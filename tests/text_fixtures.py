"""Tokenizers and tiny random text encoders built in code (no hub): the text tests' world.

- `llama3_tokenizer`: the real Llama-3 BPE (tiktoken ranks shipped in the `llama-models`
  package) as a `tokenizers` tokenizer, plus xtuner's LLaVA additions `<pad>` and `<image>`:
  the official crop_start constants are counts under exactly this tokenizer.
- `tiny_llama3_tokenizer`: a byte-level BPE with few merges trained on the templates, with
  the Llama-3 pre-tokenizer and chat special tokens: its token counts differ from Llama-3's,
  so its templates are measured (templates.fit strict=False).
- `clip_tokenizer`: a small CLIP-like BPE (lowercase, BOS/EOS, pad = EOS).
- tiny random LlamaModel / CLIPTextModel / LlavaForConditionalGeneration (the vision tower
  keeps ViT-L/14-336's geometry: 336 px, patch 14 -> 576 image features) and its
  CLIPImageProcessor.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken

from hvfunc.text.tiny import (  # noqa: F401 - the builders live in the library (demo, extraction)
    CHAT_SPECIAL, LLAMA3_SPLIT, OPENAI_MEAN, OPENAI_STD, clip_config, clip_tokenizer, image_processor, llama_config,
    llava_config, tiny_clip, tiny_llama, tiny_llama3_tokenizer, tiny_llava)
from hvfunc.text.tiny import fast as _fast
from hvfunc.text.tiny import seeded as _seeded
from hvfunc.text.tiny import with_bos as _bos

PROMPTS = ["A cat walks on the grass, realistic style.",
           ("A golden retriever runs along a beach at sunset while waves roll in, the camera tracks it slowly "
            "from the side, warm light, film grain.")]


@functools.cache
def llama3_tokenizer():
    """Meta's Llama-3 tokenizer: 128000 BPE tokens + 256 specials, then <pad> 128256, <image> 128257."""
    pytest.importorskip("tiktoken")
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama-models (ships the Llama-3 tokenizer.model) is not installed")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>"]
    special = named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]
    tok = TikTokenConverter(str(path), pattern=LLAMA3_SPLIT).converted()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special + ["<pad>", "<image>"]])
    assert tok.token_to_id("<|begin_of_text|>") == 128000 and tok.token_to_id("<image>") == 128257
    _bos(tok, "<|begin_of_text|>")
    return _fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>")


def images(n: int, *, seed: int = 3, size: tuple[int, int] = (400, 300)) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_llava(folder: Path, tokenizer, *, size: int = 56):
    """A LLaVA checkpoint folder as transformers saves it: weights, config, tokenizer, preprocessor."""
    llava = tiny_llava(tokenizer, image_size=size)
    llava.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(size).save_pretrained(folder)
    return llava


def write_clip(folder: Path, tokenizer, **kw):
    """A full CLIPModel folder (as openai/clip-vit-large-patch14 is) whose text half is `tiny_clip(**kw)`."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text = tiny_clip(tokenizer, **kw)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=text.config.projection_dim)
    full = _seeded(4, lambda: CLIPModel(CLIPConfig(text_config=text.config.to_dict(),
                                                   vision_config=vision.to_dict(),
                                                   projection_dim=text.config.projection_dim)))
    full.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in text.state_dict().items()})
    full.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return text
