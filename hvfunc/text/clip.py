"""CLIP-L text conditioning: the raw prompt (no template) -> pooled output [B, 768].

As upstream: 77 tokens, padded to max length, truncated, attention mask passed. The pooled
output is the final-normed state at the first EOS token; with CLIP's causal attention it
does not depend on the padding behind it (diffusers passes no mask and gets the same).
It feeds only the DiT's `vector_in`.
"""

from __future__ import annotations

import warnings

from torch import Tensor


def encode_clip(model, tokenizer, prompts: list[str], *, max_length: int) -> Tensor:
    """Prompts -> pooler_output [B, hidden] of a CLIPTextModel (on the model's device)."""
    enc = tokenizer(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    long = [i for i, n in enumerate(tokenizer(prompts)["input_ids"]) if len(n) > max_length]
    if long:
        warnings.warn(f"prompts {long} exceed CLIP's {max_length} tokens and were truncated (as upstream)")
    dev = next(model.parameters()).device
    out = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
    return out.pooler_output
