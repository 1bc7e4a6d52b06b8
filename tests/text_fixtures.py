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
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from hvfunc.text import TEMPLATES

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
PROMPTS = ["A cat walks on the grass, realistic style.",
           ("A golden retriever runs along a beach at sunset while waves roll in, the camera tracks it slowly "
            "from the side, warm light, film grain.")]
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _fast(tok: Tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **special)


def _bos(tok: Tokenizer, bos: str) -> None:
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])


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


@functools.cache
def tiny_llama3_tokenizer():
    """Byte-level BPE over the templates' own words, Llama-3 split rule and chat specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=CHAT_SPECIAL + ["<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t.template for t in TEMPLATES.values()] * 4 + PROMPTS, trainer)
    # Few merges: most words split unlike Llama-3 (crop_start differs), but the chat roles are
    # one token each as in Llama-3, so the assistant header is 4 tokens (diffusers hard-codes 4).
    tok.add_tokens(["system", "user", "assistant"])
    _bos(tok, "<|begin_of_text|>")
    return _fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>")


@functools.cache
def clip_tokenizer():
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(PROMPTS + ["a an the of in on and with"], trainer)
    s, e = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{s} $A {e}", special_tokens=[(s, tok.token_to_id(s)), (e, tok.token_to_id(e))])
    return _fast(tok, bos_token=s, eos_token=e, pad_token=e)


def _seeded(seed: int, build):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def llama_config(tokenizer, *, layers: int = 4, width: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, rope_theta=500000.0, pad_token_id=tokenizer.pad_token_id,
                       # sharp attention: at 0.02 it is near uniform, and padding rows would not
                       # depend on their position ids (the pad embedding row starts at zero)
                       initializer_range=0.3,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def tiny_llama(tokenizer, *, seed: int = 0, layers: int = 4):
    from transformers import LlamaModel

    return _seeded(seed, lambda: LlamaModel(llama_config(tokenizer, layers=layers)))


def clip_config(tokenizer, width: int = 24):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=width, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_clip(tokenizer, *, seed: int = 1):
    from transformers import CLIPTextModel

    return _seeded(seed, lambda: CLIPTextModel(clip_config(tokenizer)))


def llava_config(tokenizer, *, image_size: int = 336, patch: int = 14, layers: int = 3):
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=16)
    return LlavaConfig(vision_config=vision, text_config=llama_config(tokenizer, layers=layers),
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       pad_token_id=tokenizer.pad_token_id, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=(image_size // patch) ** 2)


def tiny_llava(tokenizer, *, seed: int = 2, **kw):
    from transformers import LlavaForConditionalGeneration

    return _seeded(seed, lambda: LlavaForConditionalGeneration(llava_config(tokenizer, **kw)))


def image_processor(size: int = 336):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=OPENAI_MEAN, image_std=OPENAI_STD)


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


def write_clip(folder: Path, tokenizer):
    """A full CLIPModel folder (as openai/clip-vit-large-patch14 is) whose text half is `tiny_clip`."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text = tiny_clip(tokenizer)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=text.config.projection_dim)
    full = _seeded(4, lambda: CLIPModel(CLIPConfig(text_config=text.config.to_dict(),
                                                   vision_config=vision.to_dict(),
                                                   projection_dim=text.config.projection_dim)))
    full.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in text.state_dict().items()})
    full.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return text
