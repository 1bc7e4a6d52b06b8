"""Text conditioning: LLaVA-Llama-3 (text, or image + text for I2V) and CLIP-L, prompt templates.

The encoders are frozen transformers modules; this package owns the templates, cropping,
masks, batching, dtype and device placement, loading and checkpoint conversion.
"""

from hvfunc.text.encode import TextConditioning, TextEncoders, black_images, encode_prompts, make_encoders
from hvfunc.text.templates import TEMPLATES, PromptTemplate, template

__all__ = ["TEMPLATES", "PromptTemplate", "TextConditioning", "TextEncoders", "black_images", "encode_prompts",
           "make_encoders", "template"]
