"""One CLI for the project's benchmarks: prints a markdown table, optionally writes JSON.

    python scripts/bench.py dit                          # small CPU config, fp32
    python scripts/bench.py dit --hidden 3072 --heads 24 --device cuda --dtype bf16 ...
    python scripts/bench.py train                        # a training step: ours with full recompute vs
                                                         # diffusers with gradient checkpointing
    python scripts/bench.py sample                       # one sampling step (forward + Euler): eager,
                                                         # compiled blocks, CUDA graph (on CUDA) vs diffusers
    python scripts/bench.py sample --cache-thresholds 0.05 0.1 0.15   # whole runs: step caches vs uncached
    python scripts/bench.py vae [--preset hunyuan-video --frames 9 --height 128 --width 128]
    python scripts/bench.py decode          # decord vs PyAV per clip
    python scripts/bench.py extract         # feature extraction clips/s, tiny models
    python scripts/bench.py pipeline        # end-to-end T2V (text, denoise, decode) vs diffusers' pipeline

Each row compares ours with the reference (diffusers) in the same run on the same
machine; `ratio` = ours / reference time (< 1: ours is faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphs import bench, bench_data, bench_lora, bench_pipeline, bench_sample, bench_vae  # noqa: E402
from graphs.bench_dit import DiTBench, TrainBench, bench_dit  # noqa: E402
from parallel import runtime  # noqa: E402

_DIT_COLS = ["bench", "impl", "seconds", "ratio", "tokens_per_s", "tflops", "mfu", "peak_mem_gb", "dtype"]
COLS = {"dit": _DIT_COLS, "train": _DIT_COLS,
        "sample": ["bench", "impl", "seconds", "ratio", "rel_err", "tokens_per_s", "tflops", "mfu", "peak_mem_gb",
                   "dtype"],
        "pipeline": bench_pipeline.COLS, "lora": bench_lora.COLS}
BENCHES = {"dit": (DiTBench, bench_dit), "train": (TrainBench, bench_dit), "sample": (bench_sample.SampleBench,
                                                                                  bench_sample.run),
           "vae": (bench_vae.VAEBench, bench_vae.run),
           "decode": (bench_data.DecodeBench, bench_data.run),
           "extract": (bench_data.ExtractBench, bench_data.run_extract),
           "pipeline": (bench_pipeline.PipelineBench, bench_pipeline.run),
           "lora": (bench_lora.LoraBench, bench_lora.run)}


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = tyro.extras.subcommand_cli_from_dict({k: c for k, (c, _) in BENCHES.items()}, args=argv)
    name, run = next((k, fn) for k, (c, fn) in BENCHES.items() if type(cfg) is c)  # configs subclass DiTBench
    rows = run(cfg)
    print(f"machine: {bench.machine()}")
    cached = getattr(cfg, "cache_thresholds", ())  # sample --cache-thresholds: whole-run rows
    print(bench.markdown(rows, bench_sample.CACHE_COLS if cached else COLS.get(name)))
    if cfg.json:
        bench.save_json(rows, cfg.json, config=vars(cfg))
    return rows


if __name__ == "__main__":
    with runtime.user_errors():
        main()
