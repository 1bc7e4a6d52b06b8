"""LLaVA checkpoint folder -> the T2V text-encoder folder (language model + tokenizer, fp16).

What upstream's `preprocess_text_encoder_tokenizer_utils.py` produces from
xtuner/llava-llama-3-8b-v1_1-transformers (it saves `model.language_model`, a
LlamaForCausalLM, and the tokenizer), done on the weight files instead of through
transformers' model classes: the LLaVA key layout changed between transformers 4.4x
(`language_model.model.*`, `language_model.lm_head.*`) and 5.x (`model.language_model.*`,
`lm_head.*`), and an 8B model need not be built to copy its tensors. Input shards are read
one at a time; the output keeps upstream's names (`model.*`, `lm_head.weight`), so
`AutoModel` / `LlamaModel.from_pretrained` load it in any transformers version.

The target folder appears whole or not at all: everything is written to a temporary
sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from hvfunc import io
from hvfunc.params import ZEROS, ParamSpec, check_tree
from hvfunc.text.load import read_config

# Source key prefix -> output prefix, for both LLaVA layouts; other keys (vision tower,
# projector) are dropped.
_RENAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."), ("lm_head.", "lm_head."))
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "added_tokens.json")


def _rename(key: str) -> str | None:
    for src, dst in _RENAMES:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a transformers folder (index file first, then the usual names)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{folder / index} is not a valid weight index: {e!r}") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / index} lists shards that are missing: {missing}")
            return [folder / n for n in names]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin"):
        if files := sorted(folder.glob(pattern)):
            return files
    raise FileNotFoundError(f"no weights in {folder}: expected *.safetensors or pytorch_model*.bin")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return io.load_safetensors(path)
    sd = io.load_pickle(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return sd


def _expected(text_config) -> dict[str, ParamSpec]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        sd = LlamaForCausalLM(text_config).state_dict()
    if getattr(text_config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: ParamSpec(tuple(v.shape), (None,) * v.dim(), ZEROS) for k, v in sd.items()}


def _write_weights(files: list[Path], tmp: Path, dtype: torch.dtype) -> dict[str, tuple[torch.Size, str]]:
    """Copy the language-model tensors shard by shard; returns key -> (shape, file name)."""
    parts: list[tuple[Path, list[str]]] = []
    seen: dict[str, torch.Size] = {}
    for f in files:
        lm = {}
        for k, v in _read(f).items():
            if (name := _rename(k)) is not None:
                lm[name] = v.to(dtype) if v.is_floating_point() else v
        if lm:
            part = tmp / f"part{len(parts)}.safetensors"
            io.save_safetensors(lm, part, metadata={"format": "pt"})
            parts.append((part, list(lm)))
            seen.update({k: v.shape for k, v in lm.items()})
    n, out = len(parts), {}
    for i, (part, keys) in enumerate(parts):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part.rename(tmp / name)
        out.update({k: (seen[k], name) for k in keys})
    if n > 1:
        size = sum((tmp / name).stat().st_size for name in {v[1] for v in out.values()})
        index = {"metadata": {"total_size": size}, "weight_map": {k: v[1] for k, v in sorted(out.items())}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def convert_text_encoder(source: str | Path, target: str | Path, *, dtype: torch.dtype = torch.float16,
                         overwrite: bool = False) -> Path:
    """Extract the language model (as LlamaForCausalLM, in `dtype`) and the tokenizer of a LLaVA folder."""
    from transformers import AutoTokenizer, LlavaConfig

    source, target = Path(source), Path(target)
    cfg = read_config(source, kinds=("llava",), what="LLaVA checkpoint")
    text_kind = (cfg.get("text_config") or {}).get("model_type", "llama")
    if text_kind != "llama":
        raise ValueError(f"{source / 'config.json'}: text_config.model_type is {text_kind!r}; HunyuanVideo's text "
                         f"encoder is a LLaVA-Llama-3 (llama)")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"target {target} exists and is not empty; pass overwrite=True to replace it")
    text_config = LlavaConfig.from_pretrained(source, local_files_only=True).text_config
    files, tok_files = weight_files(source), tokenizer_files(source)  # fail before writing anything
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        got = _write_weights(files, tmp, dtype)
        check_tree({k: torch.empty(s, device="meta") for k, (s, _) in got.items()}, _expected(text_config),
                   what=f"language-model weights in {source}")
        conf = text_config.to_dict()
        conf.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype=str(dtype)[6:],
                    dtype=str(dtype)[6:])
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
        for f in tok_files:  # byte copies: what upstream's tokenizer.save_pretrained writes, in any version
            shutil.copyfile(f, tmp / f.name)
        AutoTokenizer.from_pretrained(tmp, local_files_only=True)  # the copy must load
        old = target.parent / f".{target.name}.old{os.getpid()}"
        if target.exists():  # an existing target stays whole until the new one is complete
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tokenizer_files(source: Path) -> list[Path]:
    files = [source / n for n in _TOKENIZER_FILES if (source / n).is_file()]
    if not {"tokenizer.json", "tokenizer.model"} & {f.name for f in files}:
        raise FileNotFoundError(f"no tokenizer in {source}: expected tokenizer.json (or tokenizer.model)")
    return files
