"""Checkpoint conversion CLI: one subcommand per model part.

    python scripts/convert.py dit --source mp_rank_00_model_states.pt --target dit.safetensors
    python scripts/convert.py dit --source dit.safetensors --target out.pt --to official
    python scripts/convert.py dit --source hunyuanvideo/transformer --target dit.safetensors
    python scripts/convert.py dit --source dit.safetensors --target transformer/ --to diffusers

    python scripts/convert.py text-encoder --source llava-llama-3-8b-v1_1-transformers --target ckpts/text_encoder

DiT: the source format is detected from its keys; every conversion is exact (reshapes,
splits, concatenations). Text encoder: upstream's extraction of the LLaVA language model
and tokenizer (fp16). Outputs are written atomically.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hvfunc import ckpt, io  # noqa: E402
from hvfunc.config import DIT_PRESETS, dit_preset  # noqa: E402

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class DitArgs:
    """Convert DiT (transformer) weights."""

    source: Path
    """Official .pt (`module`/`ema` wrapper or bare), a safetensors file, or a folder of them
    (official `*_model_states.pt`, diffusers `transformer/` shards)."""
    target: Path
    """Output: a .safetensors file (hvfunc / official) or .pt (official), a folder for diffusers."""
    to: Literal["hvfunc", "official", "diffusers"] = "hvfunc"
    """Layout to write."""
    preset: Annotated[str, tyro.conf.arg(help=f"Architecture of the weights: {', '.join(DIT_PRESETS)}.")] = (
        "hunyuan-video-t2v")
    source_format: Literal["auto", "official", "diffusers", "hvfunc"] = "auto"
    """Layout of the source (detected from its keys by default)."""
    key: str = "module"
    """Key that wraps the weights in official .pt files ("module" or "ema")."""
    dtype: Literal["keep", "fp32", "bf16", "fp16"] = "keep"
    """Cast the weights on the way (the official checkpoint is bf16)."""


def convert_dit(a: DitArgs) -> Path:
    cfg = dit_preset(a.preset)
    params = ckpt.load_dit(a.source, cfg, source=a.source_format, key=a.key, dtype=DTYPES[a.dtype])
    meta = {"format": a.to, "preset": a.preset, "source": str(a.source)}
    if a.to == "hvfunc":
        io.save_safetensors(params, a.target, metadata=meta)
    elif a.to == "official":
        sd = ckpt.dit_to_official(params, cfg)
        if a.target.suffix == ".pt":
            io.save_pickle({"module": sd}, a.target)
        else:
            io.save_safetensors(sd, a.target, metadata=meta)
    else:
        if a.target.suffix:
            raise ValueError(f"--to diffusers writes a folder; got the file name {a.target}")
        a.target.mkdir(parents=True, exist_ok=True)
        io.save_safetensors(ckpt.dit_to_diffusers(params, cfg), a.target / "diffusion_pytorch_model.safetensors",
                            metadata={"format": "pt"})
        tmp = a.target / ".config.json.tmp"
        tmp.write_text(json.dumps(ckpt.diffusers_config(cfg), indent=2))
        os.replace(tmp, a.target / "config.json")
    print(f"wrote {a.target} ({a.to}, {len(params)} hvfunc leaves, preset {a.preset})")
    return a.target


@dataclass(frozen=True, kw_only=True)
class TextEncoderArgs:
    """Extract the language model and tokenizer of a LLaVA-Llama-3 folder (upstream's ckpts/text_encoder)."""

    source: Path
    """The llava-llama-3-8b-v1_1-transformers folder (config.json, weights, tokenizer)."""
    target: Path
    """Output folder; written to a temporary sibling and renamed into place when complete."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Weight dtype of the output (upstream: fp16)."""
    overwrite: bool = False
    """Replace a non-empty target folder."""


def text_encoder(args: TextEncoderArgs) -> Path:
    from hvfunc.text.convert import convert_text_encoder

    out = convert_text_encoder(args.source, args.target, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")
    return out


COMMANDS = {"dit": (DitArgs, convert_dit), "text-encoder": (TextEncoderArgs, text_encoder)}


def main(argv: list[str] | None = None) -> Path:
    args = tyro.extras.subcommand_cli_from_dict({k: cls for k, (cls, _) in COMMANDS.items()}, args=argv,
                                                description=__doc__)
    run = next(fn for cls, fn in COMMANDS.values() if isinstance(args, cls))
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # bad user input: the message, not a traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
