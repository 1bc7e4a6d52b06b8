"""Safe reading and atomic writing of weight files.

Reading: `.pt`/`.pth`/`.bin` pickles go through `torch.load(weights_only=True)` (never runs
pickled code) and are memory-mapped when the file allows; `.safetensors` through
`safe_open`. Every failure names the file. Writing: safetensors streamed tensor by tensor
to a temp file that is renamed into place, so a kill never leaves a half-written file
and a 25 GB model is never held twice in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e5m2: "F8_E5M2"}


def load_pickle(path: str | Path) -> object:
    """torch.load with weights_only=True and mmap when possible; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # e.g. truncated zip: "PytorchStreamReader failed ..."
            raise ValueError(f"cannot read checkpoint {path} (truncated or not a torch file?): {e}") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError for code in the pickle, EOFError, ...
        raise ValueError(_pickle_error(path, e)) from None
    warnings.warn(f"{path} uses the legacy torch format and cannot be memory-mapped; loading it into memory")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(_pickle_error(path, e)) from None


def _pickle_error(path: Path, e: Exception) -> str:
    if "weights_only" in str(e) or "Unsupported global" in str(e):
        return (f"refusing to load {path}: the pickle references code or objects that are not plain "
                f"tensors/containers, and hvfunc never executes pickled code ({type(e).__name__}: "
                f"{str(e).splitlines()[0]})")
    return f"cannot read checkpoint {path} (truncated or not a torch file?): {type(e).__name__}: {e}"


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def save_pickle(obj: object, path: str | Path) -> None:
    """torch.save atomically. Views are cloned first: torch.save would write their whole base storage."""
    def own(v: object) -> object:
        if isinstance(v, Tensor) and v.untyped_storage().nbytes() != v.numel() * v.element_size():
            return v.clone()
        return {k: own(x) for k, x in v.items()} if isinstance(v, dict) else v

    with atomic_path(path) as tmp:
        torch.save(own(obj), tmp)


def save_safetensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Stream tensors into a safetensors file atomically (temp file + rename)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{k}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix) that is renamed onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
