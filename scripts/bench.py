"""One CLI for the project's benchmarks: prints a markdown table, optionally writes JSON.

    python scripts/bench.py dit                          # small CPU config, fp32
    python scripts/bench.py dit --hidden 3072 --heads 24 --device cuda --dtype bf16 ...

Each row compares ours with the reference (diffusers) in the same run on the same
machine; `ratio` = ours / reference time (< 1: ours is faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphs import bench  # noqa: E402
from graphs.bench_dit import DiTBench, bench_dit  # noqa: E402

COLS = ["bench", "impl", "seconds", "ratio", "tokens_per_s", "tflops", "mfu", "peak_mem_gb", "dtype"]
BENCHES = {"dit": (DiTBench, bench_dit)}


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = tyro.extras.subcommand_cli_from_dict({k: c for k, (c, _) in BENCHES.items()}, args=argv)
    run = next(fn for c, fn in BENCHES.values() if isinstance(cfg, c))
    rows = run(cfg)
    print(f"machine: {bench.machine()}")
    print(bench.markdown(rows, COLS))
    if cfg.json:
        bench.save_json(rows, cfg.json, config=vars(cfg))
    return rows


if __name__ == "__main__":
    main()
