"""Benchmark: decode time per clip, decord vs PyAV, on synthetic mp4 clips.

Each case opens a clip and decodes one training window (the frames hvfunc.data would
read: resampled to 24 fps, a window of `window` frames starting mid-clip), one decoder
thread each; the median of `repeats` runs is reported. Run: python scripts/bench.py decode
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graphs import bench
from hvfunc.data import synthetic
from hvfunc.data.video import decode, resample

# (height, width, fps, frames): the tiny demo size, 256p, and the 480x848 training size at 30 fps
FORMATS = ((64, 96, 24, 41), (256, 448, 24, 97), (480, 848, 30, 121))


def bench_decode(formats: tuple[tuple[int, int, int, int], ...] = FORMATS, *, window: int = 33, repeats: int = 5,
                 folder: str | Path | None = None) -> list[dict]:
    """Median ms per clip to open and decode a `window`-frame training window, decord vs PyAV."""
    with tempfile.TemporaryDirectory(prefix="hvfunc-bench-data-") as tmp:
        root = Path(folder or tmp)
        data_txt = synthetic.make_dataset(root, num_clips=len(formats), seed=0, formats=formats)
        rows = []
        for (h, w, fps, n), name in zip(formats, (f"clip_{i:04d}.mp4" for i in range(len(formats)))):
            path = data_txt.parent / "ds0" / "videos" / name
            idx = resample(n, fps, 24.0)
            start = max(0, (len(idx) - window) // 2)
            frames = idx[start:start + window]
            ms = {}
            for backend in ("decord", "pyav"):
                decode(path, frames, backend=backend)  # warm the file cache and the library
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    decode(path, frames, backend=backend)
                    times.append((time.perf_counter() - t) * 1e3)
                ms[backend] = statistics.median(times)
            rows.append({"clip": f"{h}x{w} {fps}fps {n}f", "frames": len(frames), "decord_ms": ms["decord"],
                         "pyav_ms": ms["pyav"], "pyav/decord": ms["pyav"] / ms["decord"]})
    return rows


@dataclass(frozen=True, kw_only=True)
class DecodeBench:
    """Video decode per clip, decord vs PyAV (one decoder thread each)."""

    window: int = 33
    """Frames decoded per clip (a training window)."""
    repeats: int = 5
    """Timed runs per case; the median is reported."""
    json: Path | None = None
    """Also write the rows (and the machine) as JSON here."""


def run(b: DecodeBench) -> list[dict]:
    return bench_decode(window=b.window, repeats=b.repeats)


@dataclass(frozen=True, kw_only=True)
class ExtractBench:
    """Feature extraction throughput (clips/s) with the tiny models, one process."""

    clips: int = 16
    """Synthetic clips to extract."""
    batch_size: int = 2
    task: str = "t2v"
    json: Path | None = None
    """Also write the rows (and the machine) as JSON here."""


def run_extract(b: ExtractBench) -> list[dict]:
    """Decode + VAE encode (tiled) + LLM + CLIP per clip, timed over the whole set after a
    warm-up batch; FLOPs (VAE + encoders) and peak memory of the first batch, per clip."""
    from graphs.memory import peak_memory
    from hvfunc.config import data_preset
    from hvfunc.data import extract as ex
    from hvfunc.data.dataset import build_dataset

    with tempfile.TemporaryDirectory(prefix="hvfunc-bench-extract-") as tmp:
        root = Path(tmp)
        data_txt = synthetic.make_dataset(root / "data", num_clips=b.clips, seed=0)
        models = ex.load_models(*ex.write_tiny_models(root, b.task), tiny=True)
        ds = build_dataset(data_txt, data_preset("tiny"))
        batches = ex.plan_batches(ds, b.batch_size)
        dev = torch.device("cpu")
        first = functools.partial(ex.extract, models, ds, batches[0], seed=0, task=b.task, device=dev)
        first()  # warm-up
        flops = bench.count_flops(first) / len(batches[0])
        mem = peak_memory(first, device=dev)[1]
        t = time.perf_counter()
        n = sum(len(ex.extract(models, ds, batch, seed=0, task=b.task, device=dev)) for batch in batches)
        sec = time.perf_counter() - t
    peak = bench.matmul_peak(dev, torch.float32)
    return [{"bench": f"extract {b.task} (tiny models)", "clips": n, "seconds": sec, "clips_per_s": n / sec,
             "gflop_per_clip": flops / 1e9, "mfu": flops * n / sec / peak, "peak_mem_gb_batch": mem / 2**30,
             "device": bench.machine()}]
