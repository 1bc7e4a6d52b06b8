"""LLaVA-Llama-3 conditioning: tokenize with a template, run the frozen LLM, select states.

Shapes: B prompts, L = text_len + crop_start template+prompt tokens, E image features per
image (576), D LLM width (4096), S output tokens.

T2V (`LlamaModel`): right-padded tokens -> hidden_states[-(skip+1)] (no final norm) ->
drop the crop_start template tokens -> states [B, text_len, D], mask [B, text_len].

I2V (`LlavaForConditionalGeneration`): the one `<image>` token expands to E image
features, so every position after it moves by E-1. Kept, as upstream: the image features
[::interleave] (144), then the text from the prompt on with the assistant header removed
except its final "\\n\\n" (text_len - 4 = 252 with Llama-3). Mask = ones for the image.
Padding-position ids follow transformers 4.39's legacy merge that upstream ran (cumsum of
the mask minus 1, padding = 1); only masked positions depend on them.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor

from hvfunc.text.templates import PromptTemplate


def tokenize(tokenizer, prompts: list[str], tpl: PromptTemplate, *, text_len: int) -> tuple[Tensor, Tensor]:
    """Templated prompts -> input ids and mask [B, text_len + crop_start], right-padded."""
    if tokenizer.padding_side != "right":
        raise ValueError(f"the LLM tokenizer pads on the {tokenizer.padding_side!r}; the encoder needs right padding")
    enc = tokenizer([tpl.format(p) for p in prompts], max_length=text_len + tpl.crop_start, padding="max_length",
                    truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def tail_positions(ids: Tensor, mask: Tensor, tail: list[int], prompts: list[str]) -> Tensor:
    """Per row: index of the template tail's last token, or L where the tokenizer cut the row [B].

    Warns when prompts were truncated (upstream truncates silently).
    """
    B, L = ids.shape
    n, t = mask.sum(1), torch.tensor(tail)
    out = []
    for b in range(B):
        k = int(n[b])
        if k >= len(t) and torch.equal(ids[b, k - len(t):k], t):
            out.append(k - 1)
        elif k == L:
            out.append(L)
        else:
            raise ValueError(f"prompt {b} ({prompts[b][:60]!r}): its tokens do not end with the template tail "
                             f"{tail}; the tokenizer does not match the template")
    pos = torch.tensor(out)
    if cut := int((pos == L).sum()):
        warnings.warn(f"{cut} of {B} prompts exceed {L} template+prompt tokens and were truncated (as upstream)")
    return pos


def hidden_states(model, ids: Tensor, mask: Tensor, *, skip: int, **inputs) -> Tensor:
    """hidden_states[-(skip+1)] of a transformers model [B, L, D] (skip=0 is the last, normed one)."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):  # LM heads: skip [B, L, 128k] logits (5.x / 4.4x name)
        if name in params:
            inputs[name] = 1
            break
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **inputs)
    return out.hidden_states[-(skip + 1)]


def _device(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def encode_llm(model, tokenizer, prompts: list[str], *, tpl: PromptTemplate, skip: int,
               text_len: int) -> tuple[Tensor, Tensor]:
    """T2V: states [B, text_len, D] and mask [B, text_len] from a LlamaModel."""
    ids, mask = tokenize(tokenizer, prompts, tpl, text_len=text_len)
    tail_positions(ids, mask, tokenizer(tpl.suffix, add_special_tokens=False)["input_ids"], prompts)  # warns
    dev, _ = _device(model)
    h = hidden_states(model, ids.to(dev), mask.to(dev), skip=skip)
    return h[:, tpl.crop_start:], mask[:, tpl.crop_start:].to(dev)


def expand_image_token(ids: Tensor, mask: Tensor, *, at: int, n: int, image_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Replace the `<image>` token at column `at` by n copies: ids, mask, position ids [B, L+n-1]."""
    if not bool((ids[:, at] == image_id).all()) or not bool(((ids == image_id).sum(1) == 1).all()):
        raise ValueError(f"every templated prompt must hold exactly one <image> token (id {image_id}), at "
                         f"position {at}; got counts {(ids == image_id).sum(1).tolist()} (does a prompt "
                         f"contain the text '<image>'?)")
    B = ids.shape[0]
    ids = torch.cat([ids[:, :at], ids.new_full((B, n), image_id), ids[:, at + 1:]], dim=1)
    mask = torch.cat([mask[:, :at], mask.new_ones(B, n), mask[:, at + 1:]], dim=1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def select_i2v(h_BXD: Tensor, mask_BL: Tensor, last: Tensor, *, tpl: PromptTemplate,
               drop: int) -> tuple[Tensor, Tensor]:
    """I2V selection from expanded states [B, L+E-1, D] -> [B, E/interleave + L-crop_start-drop, D].

    `last` [B] is the column of the final "\\n\\n" (tail_positions). Text keeps token columns
    [crop_start, last-drop) and [last, L) of the unexpanded sequence: the `drop` assistant
    header tokens before it are removed. Rows the tokenizer cut (last = L) lose their last
    `drop` tokens instead. Upstream hard-codes drop = 4 (= Llama-3's header length).
    """
    B, L = mask_BL.shape
    E, s = tpl.image_emb_len, tpl.image_emb_start
    img = h_BXD[:, s:s + E:tpl.image_embed_interleave]
    j = torch.arange(tpl.crop_start, L - drop, device=mask_BL.device)[None]   # [1, S_txt]
    cols = j + drop * (j >= last.to(j.device)[:, None] - drop)                  # [B, S_txt]
    txt = h_BXD.gather(1, (cols + E - 1)[..., None].to(h_BXD.device).expand(-1, -1, h_BXD.shape[-1]))
    txt_mask = mask_BL.gather(1, cols)
    states = torch.cat([img, txt], dim=1)
    return states, torch.cat([txt_mask.new_ones(B, img.shape[1]), txt_mask], dim=1)


def encode_llava(model, tokenizer, processor, prompts: list[str], images: list, *, tpl: PromptTemplate,
                 skip: int, text_len: int) -> tuple[Tensor, Tensor]:
    """I2V: states [B, E/interleave + text_len - 4, D] and mask from a LlavaForConditionalGeneration."""
    if not tpl.i2v:
        raise ValueError(f"template {tpl.name!r} has no image fields; I2V needs an -i2v template")
    if len(images) != len(prompts):
        raise ValueError(f"I2V needs one image per prompt: got {len(images)} images for {len(prompts)} prompts")
    ids, mask = tokenize(tokenizer, prompts, tpl, text_len=text_len)
    tail = tokenizer(tpl.suffix, add_special_tokens=False)["input_ids"]
    last = tail_positions(ids, mask, tail, prompts)
    ids_x, mask_x, pos = expand_image_token(ids, mask, at=tpl.image_emb_start, n=tpl.image_emb_len,
                                            image_id=model.config.image_token_index)
    dev, dtype = _device(model)
    pixels = processor(images, return_tensors="pt")["pixel_values"].to(dev, dtype)
    h = hidden_states(model, ids_x.to(dev), mask_x.to(dev), skip=skip, pixel_values=pixels, position_ids=pos.to(dev))
    return select_i2v(h, mask.to(dev), last, tpl=tpl, drop=len(tail) - 1)
