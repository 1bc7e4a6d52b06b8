"""Per-rank training memory of the full 13B DiT on meshes of any size, without hardware.

    python scripts/plan_memory.py          # prints the table in docs/memory.md
    python scripts/plan_memory.py --lora --model hunyuan-video-i2v   # its LoRA table

Uses torch's fake process-group backend: one process pretends to be rank 0 of each mesh.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfunc.config import dit_preset  # noqa: E402
from hvfunc.dit_spec import dit_spec  # noqa: E402
from parallel import planning, runtime  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class PlanArgs:
    model: str = "hunyuan-video-t2v"
    """DiT preset (hvfunc.config)."""
    lora: bool = False
    """LoRA training instead (the official I2V adapters, r 64, on a frozen bf16 base) at 1, 2, 8 ranks."""


if __name__ == "__main__":
    args = tyro.cli(PlanArgs)
    with runtime.user_errors():
        spec = dit_spec(dit_preset(args.model))
        if args.lora:
            from hvfunc.lora import LoraConfig, lora_spec

            print(planning.lora_table(planning.lora_rows(spec, lora_spec(dit_preset(args.model), LoraConfig()))))
        else:
            print(planning.table(planning.rows(spec)))
