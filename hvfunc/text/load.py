"""Load the frozen text encoders and tokenizers from local folders, with precise errors.

Folders as upstream lays them out under `ckpts/`: `text_encoder` (the LLaVA language model
and tokenizer made by `convert_text_encoder`), `text_encoder_i2v` (the full
llava-llama-3-8b-v1_1-transformers folder: model, tokenizer, preprocessor_config.json) and
`text_encoder_2` (openai/clip-vit-large-patch14: a CLIPModel or CLIPTextModel folder). A
diffusers folder works too: pass its `tokenizer/` and `tokenizer_2/` separately.

Nothing is downloaded (local_files_only), nothing pickled is executed (transformers loads
safetensors, and .bin with weights_only), and a checkpoint with missing weights is an error
(transformers would initialise them randomly and only warn).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hvfunc.text.encode import TextEncoders, make_encoders


def read_config(folder: str | Path, *, kinds: tuple[str, ...], what: str) -> dict:
    """config.json of a model folder, checked to be one of `kinds` (model_type)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no config.json in {folder}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in kinds:
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{what}: {path} has model_type {got!r}, expected one of {list(kinds)}")
    return cfg


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_model(cls, folder: Path, *, dtype: torch.dtype, what: str):
    """cls.from_pretrained(folder) in `dtype`; every weight must come from the files."""
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                          **dtype_kwarg(dtype))
    except Exception as e:  # noqa: BLE001 - OSError, SafetensorError (truncated file), size mismatches, ...
        raise ValueError(f"{what}: cannot load {cls.__name__} from {folder}: {type(e).__name__}: {e}") from None
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        shown = {k: sorted(map(str, v))[:10] for k, v in bad.items()}
        raise ValueError(f"{what}: the checkpoint in {folder} does not fit its config.json: {shown}")
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path, *, what: str):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(f"{what} tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, padding_side="right")
    except Exception as e:  # noqa: BLE001 - OSError, JSON errors, a tokenizer.json from another library, ...
        raise ValueError(f"{what}: cannot load a tokenizer from {folder}: {type(e).__name__}: {e}") from None


def load_encoders(llm: str | Path, clip: str | Path, *, tokenizer: str | Path | None = None,
                  clip_tokenizer: str | Path | None = None, dtype: torch.dtype = torch.float16,
                  strict: bool = True, **options) -> TextEncoders:
    """Encoders on the CPU in `dtype` (upstream: fp16); encode_prompts moves them to the device.

    llm: a converted Llama folder (T2V) or a full LLaVA folder (I2V). Tokenizers default to
    the model folders. strict/options: see make_encoders.
    """
    from transformers import CLIPImageProcessor, CLIPTextModel, LlamaModel, LlavaForConditionalGeneration

    llm, clip = Path(llm), Path(clip)
    kind = read_config(llm, kinds=("llama", "llava"), what="LLM text encoder")["model_type"]
    read_config(clip, kinds=("clip", "clip_text_model"), what="CLIP text encoder")
    tok_dir = Path(tokenizer) if tokenizer else llm
    cls = LlavaForConditionalGeneration if kind == "llava" else LlamaModel
    processor = None
    if kind == "llava":
        if not (tok_dir / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"I2V text encoder: no preprocessor_config.json (CLIPImageProcessor) in {tok_dir}")
        processor = CLIPImageProcessor.from_pretrained(tok_dir, local_files_only=True)
    return make_encoders(load_model(cls, llm, dtype=dtype, what="LLM text encoder"),
                         load_tokenizer(tok_dir, what="LLM text encoder"),
                         load_model(CLIPTextModel, clip, dtype=dtype, what="CLIP text encoder"),
                         load_tokenizer(Path(clip_tokenizer) if clip_tokenizer else clip, what="CLIP text encoder"),
                         image_processor=processor, strict=strict, **options)
