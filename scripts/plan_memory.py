"""Memory planning of the 13B DiT without hardware.

    python scripts/plan_memory.py          # per-rank training state on meshes (docs/memory.md)
    python scripts/plan_memory.py --lora --model hunyuan-video-i2v   # its LoRA table
    python scripts/plan_memory.py fit --device-gb 24 --workload lora-r32 --shape 512x512x33
    python scripts/plan_memory.py fit --table   # docs/memory.md's device x workload x shape grid
    python scripts/plan_memory.py fit --check   # the method against an H100's measured peaks

The layout tables use torch's fake process-group backend: one process pretends to be rank 0
of each mesh. `fit` predicts a step's peak device memory for each memory setting
(parallel.memory_fit: weights and state from the spec, activations measured on fake tensors)
and prints the cheapest setting that fits, the plain one, and the other settings that fit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfunc.config import dit_preset  # noqa: E402
from hvfunc.dit_spec import dit_spec  # noqa: E402
from parallel import planning, runtime  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class PlanArgs:
    """Per-rank training state of the 13B DiT on meshes (the subcommand `fit` answers: which memory
    settings fit one device for a workload and a video shape; `plan_memory.py fit --help`)."""

    model: str = "hunyuan-video-t2v"
    """DiT preset (hvfunc.config)."""
    lora: bool = False
    """LoRA training instead (the official I2V adapters, r 64, on a frozen bf16 base) at 1, 2, 8 ranks."""


@dataclass(frozen=True, kw_only=True)
class FitArgs:
    """Predicted peak device memory of one training step or denoising step, and the cheapest
    memory setting that fits (parallel.memory_fit; margin x 1.10 + 1 GiB)."""

    device_gb: float = 24.0
    """Device memory in GiB (2^30 bytes), e.g. 24, 48, 80, 141 (cards report a little less: an
    80 GB H100 has 79.6 GiB, a 141 GB H200 140.4)."""
    workload: Literal["lora-r32", "lora-r64", "full", "sample"] = "lora-r32"
    """LoRA training (official I2V targets, rank 32 or 64), full finetuning, or sampling."""
    shape: str = "512x512x33"
    """Video HEIGHTxWIDTHxFRAMES in pixels (multiples of 16; frames 4k + 1); batch 1, 256 text tokens."""
    model: str = "hunyuan-video-t2v"
    """DiT preset (hunyuan-video-t2v, hunyuan-video-i2v)."""
    ranks: int = 1
    """Training: FSDP over this many ranks (dp_shard); weights and state are split, activations not."""
    host_gb: float | None = None
    """Pinned host memory available for swapped blocks and offloaded activations (None: no limit)."""
    table: bool = False
    """Print docs/memory.md's grid (24 / 48 / 80 / 141 GiB x workloads x 3 shapes) instead."""
    check: bool = False
    """Print the measuring method's check instead: its predictions of the benchmark rows an H100
    measured (docs/benchmarks.md) next to those peaks."""


def fit(args: FitArgs) -> None:
    from parallel import memory_fit as mf
    from parallel import memory_report

    cfg = dit_preset(args.model)
    if args.table or args.check:
        print(memory_report.table(cfg) if args.table else memory_report.check())
        return
    q = mf.Query(cfg=cfg, workload=args.workload, shape=mf.Shape.parse(args.shape), ranks=args.ranks)
    print(memory_report.report(mf.fit(q, args.device_gb, args.host_gb), args.device_gb))


if __name__ == "__main__":
    if sys.argv[1:2] == ["fit"]:
        fit_args = tyro.cli(FitArgs, args=sys.argv[2:], prog="plan_memory.py fit")
        with runtime.user_errors():
            fit(fit_args)
        raise SystemExit(0)
    args = tyro.cli(PlanArgs)
    with runtime.user_errors():
        spec = dit_spec(dit_preset(args.model))
        if args.lora:
            from hvfunc.lora import LoraConfig, lora_spec

            print(planning.lora_table(planning.lora_rows(spec, lora_spec(dit_preset(args.model), LoraConfig()))))
        else:
            print(planning.table(planning.rows(spec)))
