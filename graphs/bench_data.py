"""Benchmark: decode time per clip, decord vs PyAV, on synthetic mp4 clips.

Each case opens a clip and decodes one training window (the frames hvfunc.data would
read: resampled to 24 fps, a window of `window` frames starting mid-clip), one decoder
thread each; the median of `repeats` runs is reported. Run: python scripts/bench.py decode
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

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
