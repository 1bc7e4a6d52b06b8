"""Checkpoint conversion CLI: one subcommand per model part.

  python scripts/convert.py text-encoder --source llava-llama-3-8b-v1_1-transformers --target ckpts/text_encoder
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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

    out = convert_text_encoder(args.source, args.target, dtype=_DTYPES[args.dtype], overwrite=args.overwrite)
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")
    return out


COMMANDS = {"text-encoder": (TextEncoderArgs, text_encoder)}


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
