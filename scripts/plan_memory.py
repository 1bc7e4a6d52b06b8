"""Per-rank training memory of the full 13B DiT on meshes of any size, without hardware.

    python scripts/plan_memory.py          # prints the table in docs/memory.md

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


if __name__ == "__main__":
    args = tyro.cli(PlanArgs)
    with runtime.user_errors():
        print(planning.table(planning.rows(dit_spec(dit_preset(args.model)))))
