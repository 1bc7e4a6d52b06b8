"""Which source frames a clip contributes, and decoding exactly those frames.

Frame rules (MindSpeed-MM's OpensoraplanVideoProcessor, off-by-one fixed):
  1. resample to train_fps: output frame k is source frame start + floor(k * fps / train_fps)
     (rates within 0.1 fps count as equal; slower sources repeat frames);
  2. length = the largest y <= min(resampled, num_frames) with y = stride*k + 1 and a latent
     frame count k + 1 divisible by cp; fewer than min_frames -> the clip is skipped;
  3. a random window of `length` resampled frames (start drawn from a torch.Generator,
     uniform over every position; upstream never picks the last one).
Decoding: decord when it imports, PyAV otherwise (or when asked); both read only the
frames needed and return uint8 [T, H, W, 3] (T frames, H x W pixels, RGB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

FPS_TOLERANCE = 0.1  # source and train rates closer than this are the same rate (upstream's rule)


class ClipError(Exception):
    """A clip that cannot be used; `reason` is a key of hvfunc.data.report.REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def resample(num_frames: int, fps: float, train_fps: float | None, start: int = 0) -> list[int]:
    """Source indices of a clip of `num_frames` frames at `fps`, played at `train_fps`."""
    step = 1.0 if train_fps is None or abs(fps - train_fps) < FPS_TOLERANCE else fps / train_fps
    out = (int(k * step) for k in range(math.ceil(num_frames / step) + 1))
    return [start + i for i in out if i < num_frames]


def valid_length(n: int, *, min_frames: int, temporal_stride: int = 4, cp: int = 1) -> int:
    """Largest y <= n with y = stride*k + 1 and (k + 1) % cp == 0, if y >= min_frames; else 0."""
    if n < 1:
        return 0
    latent = (n - 1) // temporal_stride + 1
    latent -= latent % cp
    y = temporal_stride * (latent - 1) + 1 if latent else 0
    return y if y >= min_frames else 0


def clip_length(num_frames: int, fps: float, *, cfg) -> int:
    """Frames a clip yields under a DataConfig (0: too few, skip it)."""
    n = min(len(resample(num_frames, fps, cfg.train_fps)), cfg.num_frames)
    return valid_length(n, min_frames=cfg.min_frames, temporal_stride=cfg.temporal_stride, cp=cfg.cp)


def select_frames(num_frames: int, fps: float, *, length: int, train_fps: float | None, start_frame: int = 0,
                  generator: torch.Generator) -> list[int]:
    """Source indices of a random window of `length` frames of the resampled clip."""
    idx = resample(num_frames, fps, train_fps, start_frame)
    if not 1 <= length <= len(idx):
        raise ValueError(f"window of {length} frames does not fit {len(idx)} resampled frames")
    off = int(torch.randint(len(idx) - length + 1, (), generator=generator))
    return idx[off:off + length]


def default_backend() -> str:
    """decord when it imports (x86-64 wheels only), else PyAV."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return "pyav"
    return "decord"


def _reader(backend: str):
    """The read function of a backend; a backend that is unknown or not installed is a config error."""
    readers = {"decord": ("decord", _read_decord), "pyav": ("av", _read_pyav)}
    if backend not in readers:
        raise ValueError(f"unknown video backend {backend!r}; choose auto, decord or pyav")
    module, fn = readers[backend]
    try:
        __import__(module)
    except ImportError as e:
        raise ValueError(f"video backend {backend!r} needs {module!r}, which fails to import: {e}") from None
    return fn


def decode(path: str | Path, frames: Sequence[int], *, backend: str = "auto", threads: int = 1) -> torch.Tensor:
    """uint8 [T, H, W, 3] of the given source frames (repeats allowed); raises ClipError."""
    if not frames or min(frames) < 0:
        raise ValueError(f"frame indices must be non-empty and >= 0, got {list(frames)[:8]}")
    backend = default_backend() if backend == "auto" else backend
    read, want = _reader(backend), sorted(set(frames))
    try:
        got = read(str(path), want, threads)
    except ClipError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise RuntimeError, av.error.*, OSError, ...
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise ClipError("decode_error", f"{backend}: {type(e).__name__}: {first_line}") from None
    pos = {f: i for i, f in enumerate(want)}
    return torch.from_numpy(got[[pos[f] for f in frames]])


def _read_decord(path: str, want: list[int], threads: int) -> np.ndarray:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
    if want[-1] >= len(vr):
        raise ClipError("too_few_frames", f"needs source frame {want[-1]}, the file has {len(vr)}")
    return vr.get_batch(want).asnumpy()


def _read_pyav(path: str, want: list[int], threads: int) -> np.ndarray:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ClipError("decode_error", "pyav: the file has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        got = _pyav_collect(container, stream, want, seek=want[0] > 0)
        if got is None:  # seek landed after the first wanted frame or pts are missing: decode from frame 0
            container.seek(0)
            got = _pyav_collect(container, stream, want, seek=False)
    missing = [f for f in want if f not in got]
    if missing:
        raise ClipError("too_few_frames", f"needs source frame {missing[-1]}, decoding ended after {len(got)} "
                        f"of the {len(want)} wanted frames")
    return np.stack([got[f] for f in want])


def _pyav_collect(container, stream, want: list[int], *, seek: bool) -> dict[int, np.ndarray] | None:
    """Decode until the last wanted frame. With seek, frames are numbered by pts at the average
    rate (exact for constant frame rate); without, by decode order from the start (as decord)."""
    rate, tb = stream.average_rate or stream.guessed_rate, stream.time_base
    t0 = stream.start_time or 0
    if seek and not (rate and tb):
        return None
    if seek:
        container.seek(t0 + int(want[0] / rate / tb), stream=stream, backward=True, any_frame=False)
    wanted, got = set(want), {}
    for n, frame in enumerate(container.decode(stream)):
        if seek and frame.pts is None:
            return None
        i = round((frame.pts - t0) * tb * rate) if seek else n
        if seek and not got and i > want[0]:
            return None
        if i in wanted:
            got[i] = frame.to_ndarray(format="rgb24")
        if i >= want[-1]:
            break
    return got
