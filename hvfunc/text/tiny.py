"""Tiny random text encoders built in code (no hub): the demo's and the tests' encoders.

- `tiny_llama3_tokenizer`: byte-level BPE with few merges trained on the official
  templates, the Llama-3 split rule and its chat special tokens (plus LLaVA's <pad>,
  <image>); its token counts differ from Llama-3's, so templates are measured
  (templates.fit(strict=False)).
- `clip_tokenizer`: a CLIP-like character tokenizer (lowercase, BOS/EOS, pad = EOS).
- tiny random LlamaModel / CLIPTextModel / LlavaForConditionalGeneration (the vision tower
  keeps ViT-L/14-336's geometry by default: 336 px, patch 14 -> 576 image features).
`write_tiny_encoders` saves them as upstream's folders so the real loaders read them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from hvfunc.text.templates import TEMPLATES

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["A cat walks on the grass, realistic style.",
          ("A golden retriever runs along a beach at sunset while waves roll in, the camera tracks it slowly "
           "from the side, warm light, film grain."),
          "a red green blue yellow white orange purple circle square triangle moves left right up down on a "
          "dark background"]
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def fast(tok: Tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **special)


def with_bos(tok: Tokenizer, bos: str) -> None:
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])


@functools.cache
def tiny_llama3_tokenizer():
    """Byte-level BPE over the templates' own words, Llama-3 split rule and chat specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=CHAT_SPECIAL + ["<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t.template for t in TEMPLATES.values()] * 4 + CORPUS[:2], trainer)
    # Few merges: most words split unlike Llama-3 (crop_start differs), but the chat roles are
    # one token each as in Llama-3, so the assistant header is 4 tokens (diffusers hard-codes 4).
    tok.add_tokens(["system", "user", "assistant"])
    with_bos(tok, "<|begin_of_text|>")
    return fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>")


@functools.cache
def clip_tokenizer():
    """CLIP-like: lowercase, whitespace words, BOS/EOS, pad = EOS; one token per character
    (a BPE without merges, built from a fixed vocabulary so every process gets the same one:
    a trained BPE breaks ties differently from run to run)."""
    s, e = "<|startoftext|>", "<|endoftext|>"
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab = {tok: i for i, tok in enumerate([s, e] + chars + [c + "</w>" for c in chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens([s, e])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{s} $A {e}", special_tokens=[(s, tok.token_to_id(s)), (e, tok.token_to_id(e))])
    return fast(tok, bos_token=s, eos_token=e, pad_token=e)


def seeded(seed: int, build):
    """Build a module with a fixed seed, leaving the global RNG as it was."""
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


def tiny_llama(tokenizer, *, seed: int = 0, layers: int = 4, width: int = 32):
    from transformers import LlamaModel

    return seeded(seed, lambda: LlamaModel(llama_config(tokenizer, layers=layers, width=width)))


def clip_config(tokenizer, width: int = 24):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=width, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_clip(tokenizer, *, seed: int = 1, width: int = 24):
    from transformers import CLIPTextModel

    return seeded(seed, lambda: CLIPTextModel(clip_config(tokenizer, width)))


def llava_config(tokenizer, *, image_size: int = 336, patch: int = 14, layers: int = 3, width: int = 32):
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=16)
    return LlavaConfig(vision_config=vision, text_config=llama_config(tokenizer, layers=layers, width=width),
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       pad_token_id=tokenizer.pad_token_id, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=(image_size // patch) ** 2)


def tiny_llava(tokenizer, *, seed: int = 2, **kw):
    from transformers import LlavaForConditionalGeneration

    return seeded(seed, lambda: LlavaForConditionalGeneration(llava_config(tokenizer, **kw)))


def image_processor(size: int = 336):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=OPENAI_MEAN, image_std=OPENAI_STD)


def write_tiny_encoders(root: str | Path, *, i2v: bool = False, width: int = 32, clip_width: int = 16,
                        image_size: int = 56) -> tuple[Path, Path]:
    """Save a tiny LLM (LlamaModel, or LLaVA for I2V) and CLIP text model with their tokenizers
    as `text_encoder[_i2v]/` and `text_encoder_2/` under root; returns the two folders."""
    root = Path(root)
    tok, ctok = tiny_llama3_tokenizer(), clip_tokenizer()
    llm_dir = root / ("text_encoder_i2v" if i2v else "text_encoder")
    if i2v:
        tiny_llava(tok, image_size=image_size, width=width).save_pretrained(llm_dir)
        image_processor(image_size).save_pretrained(llm_dir)
    else:
        tiny_llama(tok, width=width).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    clip_dir = root / "text_encoder_2"
    tiny_clip(ctok, width=clip_width).save_pretrained(clip_dir)
    ctok.save_pretrained(clip_dir)
    return llm_dir, clip_dir
