"""Prompt templates of the LLaVA-Llama-3 text encoder, and their token geometry.

The four `PROMPT_TEMPLATE` entries of the official code (HunyuanVideo `hyvideo/constants.py`
for T2V, HunyuanVideo-I2V's for the `-i2v` pair), strings copied character for character.
`crop_start` is the number of tokens (BOS included, `<image>` counted as one) before the
prompt's first token; the encoder drops that many leading hidden states. The constants are
Llama-3 token counts, so `fit` checks them against the tokenizer in use (strict) or measures
them from it (tiny test tokenizers, which split words differently).

Known upstream inconsistency: `dit-llm-encode-i2v` keeps crop_start 36 from the T2V image
template although its prefix gained `<image>\\n` (38 Llama-3 tokens). Upstream never encodes
with it (I2V encoding is video-only there, and here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TEXT_LEN = 256
"""Prompt tokens kept after cropping (the official `--text-len`)."""
CLIP_LEN = 77
"""CLIP-L tokens (the official `--text-len-2`)."""
HIDDEN_STATE_SKIP_LAYER = 2
"""hidden_states[-(2 + 1)]: the output of decoder layer 30 of 32, with no final norm."""

_SYSTEM_IMAGE = ("Describe the image by detailing the color, shape, size, texture, "
                 "quantity, text, spatial relationships of the objects and background:")
_ASPECTS = ("1. The main content and theme of the video."
            "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
            "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
            "4. background environment, light, style and atmosphere."
            "5. camera angles, movements, and transitions used in the video:")
_HEAD = "<|start_header_id|>system<|end_header_id|>\n\n"
_USER = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """One official PROMPT_TEMPLATE entry (the I2V fields are None for text-only templates)."""

    name: str
    """The official key, e.g. "dit-llm-encode-video"."""
    template: str
    """Chat-formatted text with one `{}` where the prompt goes."""
    crop_start: int
    """Tokens before the prompt (BOS included; `<image>` counts as one token)."""
    image_emb_start: int | None = None
    """I2V: index of the `<image>` token, where the image features start after expansion."""
    image_emb_end: int | None = None
    """I2V: image_emb_start + image_emb_len (exclusive end of the image features)."""
    image_emb_len: int | None = None
    """I2V: image features that replace the one `<image>` token (576 for ViT-L/14 at 336 px)."""
    double_return_token_id: int | None = None
    """I2V: id of "\\n\\n", the last token of the assistant header that upstream searches for."""
    image_embed_interleave: int | None = None
    """I2V: keep every n-th image feature (4 for token_replace: 576 -> 144). Upstream derives
    it from --i2v-condition-type (4 token_replace, 2 latent_concat); it lives here so one
    object describes the whole selection."""

    @property
    def i2v(self) -> bool:
        return self.image_emb_len is not None

    @property
    def prefix(self) -> str:
        """The text before the prompt: its token count is crop_start."""
        return self.template.split("{}")[0]

    @property
    def suffix(self) -> str:
        """The text after the prompt (`<|eot_id|>`, then the assistant header for I2V)."""
        return self.template.split("{}")[1]

    def format(self, prompt: str) -> str:
        return self.template.format(prompt)

    def replace(self, **changes) -> PromptTemplate:
        return dataclasses.replace(self, **changes)


_I2V = {"image_emb_start": 5, "image_emb_end": 581, "image_emb_len": 576, "double_return_token_id": 271,
        "image_embed_interleave": 4}

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (
    PromptTemplate(name="dit-llm-encode", crop_start=36,
                   template=f"{_HEAD}{_SYSTEM_IMAGE}<|eot_id|>{_USER}"),
    PromptTemplate(name="dit-llm-encode-video", crop_start=95,
                   template=(f"{_HEAD}Describe the video by detailing the following aspects: {_ASPECTS}"
                             f"<|eot_id|>{_USER}")),
    PromptTemplate(name="dit-llm-encode-i2v", crop_start=36, **_I2V,
                   template=f"{_HEAD}<image>\n{_SYSTEM_IMAGE}<|eot_id|>{_USER}{_ASSISTANT}"),
    # The "\n\n" after the system <|eot_id|> exists only in this template (upstream's text).
    PromptTemplate(name="dit-llm-encode-video-i2v", crop_start=103, **_I2V,
                   template=(f"{_HEAD}<image>\nDescribe the video by detailing the following aspects according "
                             f"to the reference image: {_ASPECTS}<|eot_id|>\n\n{_USER}{_ASSISTANT}")),
)}


def template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def measure(tpl: PromptTemplate, tokenizer, *, image_tokens: int | None = None) -> PromptTemplate:
    """The template's token geometry under `tokenizer` (and `image_tokens` features per image).

    crop_start = tokens of the prefix with BOS; for I2V, image_emb_start = the position of the
    `<image>` token and double_return_token_id = the last token of the suffix ("\\n\\n").
    """
    ids = tokenizer(tpl.prefix)["input_ids"]
    out = tpl.replace(crop_start=len(ids))
    if not tpl.i2v:
        return out
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    where = [i for i, t in enumerate(ids) if t == image_id]
    if len(where) != 1:
        raise ValueError(f"template {tpl.name!r}: the tokenizer must turn '<image>' into one token "
                         f"(id {image_id}); found it at positions {where} of the prefix")
    tail = tokenizer(tpl.suffix, add_special_tokens=False)["input_ids"]
    n = tpl.image_emb_len if image_tokens is None else image_tokens
    return out.replace(image_emb_start=where[0], image_emb_len=n, image_emb_end=where[0] + n,
                       double_return_token_id=tail[-1])


_GEOMETRY = ("crop_start", "image_emb_start", "image_emb_end", "image_emb_len", "double_return_token_id")


def fit(tpl: PromptTemplate, tokenizer, *, image_tokens: int | None = None, strict: bool = True) -> PromptTemplate:
    """The template to encode with: `tpl` itself after checking its constants (strict), or
    the measured geometry (strict=False, for tokenizers other than Llama-3's)."""
    got = measure(tpl, tokenizer, image_tokens=image_tokens)
    if strict:
        bad = [f"{f} {getattr(tpl, f)} (tokenizer gives {getattr(got, f)})" for f in _GEOMETRY
               if getattr(tpl, f) != getattr(got, f)]
        if bad:
            raise ValueError(f"template {tpl.name!r} does not match this tokenizer/model: {', '.join(bad)}. "
                             f"The official constants are Llama-3 token counts; pass strict=False (measure "
                             f"them) only for a tokenizer that is not the LLaVA-Llama-3 one")
    return got
