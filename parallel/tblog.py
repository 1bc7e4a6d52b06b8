"""TensorBoard logging of training (--log.tensorboard): metrics.jsonl's records as scalars, images.

The main rank writes `<out>/tensorboard/` with torch's SummaryWriter (the optional `tensorboard`
package): every numeric field of a step's record (loss, lr, grad_norm, seconds, samples, tokens,
throughput, mfu, peak_mem_gb, skipped_steps, text_dropped, image_dropped) becomes the scalar of
that name at the record's step, and `images` logs HWC uint8 frames (validation videos' first
frames) under `samples/<name>`. A resumed run redoes the steps after its checkpoint: the writer
opens with purge_step = that step + 1, so TensorBoard drops the earlier run's events from there
on (as metrics.jsonl is truncated). Scalars are stored as float32 (TensorBoard's scalar format).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MISSING = "--log.tensorboard needs the tensorboard package: pip install tensorboard"


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """Where training logs go besides metrics.jsonl and the progress bar."""

    tensorboard: bool = False
    """Also write metrics.jsonl's records (and validation videos' first frames) as TensorBoard events to
    <out>/tensorboard/ (main rank; needs `pip install tensorboard`): `tensorboard --logdir <out>`."""


def check(cfg: LogConfig) -> None:
    """Fail at start (ValueError: a user error) when TensorBoard is asked for but not installed."""
    if cfg.tensorboard:
        _writer_class()


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package
        raise ValueError(MISSING) from None
    return SummaryWriter


class TensorBoard:
    """One run's event writer; every call is flushed (a killed run keeps what it logged)."""

    def __init__(self, folder: Path, step: int = 0):
        """step: optimizer steps already done (resume); later events of an earlier run are purged."""
        self._w = _writer_class()(str(folder), purge_step=step + 1 if step else None)

    def scalars(self, rec: dict) -> None:
        """Every numeric field of a metrics.jsonl record but its step, at that step (NaN kept)."""
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._w.add_scalar(k, float(v), rec["step"])
        self._w.flush()

    def images(self, step: int, frames: dict[str, np.ndarray]) -> None:
        """name -> [H, W, 3] uint8 frame, logged as the image samples/<name> at `step`."""
        for name, a in frames.items():
            a = np.asarray(a)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"image {name!r}: expected [H, W, 3] uint8, got {a.dtype} {list(a.shape)}")
            self._w.add_image(f"samples/{name}", a, step, dataformats="HWC")
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def open_for(cfg: LogConfig, out: Path, step: int, main: bool) -> TensorBoard | None:
    """The run's writer on the main rank when --log.tensorboard, else None."""
    return TensorBoard(out / "tensorboard", step) if cfg.tensorboard and main else None

