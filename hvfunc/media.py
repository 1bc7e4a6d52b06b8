"""Pixels in and out of the pipeline: mp4 writing, reference images, I2V size buckets.

- `write_mp4`: uint8 frames -> H.264 yuv420p mp4 (PyAV; MPEG-4 Part 2 where the PyAV build
  lacks libx264), written atomically. The synthetic dataset and the sampler both use it.
- `to_uint8`: decoded video in [-1, 1] -> uint8 frames, upstream's (x / 2 + 0.5).clamp(0, 1).
- I2V reference images: upstream's aspect buckets (`generate_crop_size_list(base, 32)`,
  nearest h / w ratio) and the two resize rules: exact resize to the bucket (upstream's
  `Resize((h, w))`, bilinear) when the bucket is picked, cover-resize + centre crop when
  the user gives the size.
Shapes: T frames, H x W pixels, C = 3 channels.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hvfunc import io


def write_mp4(path: str | Path, frames_THWC: np.ndarray, fps: float, *, crf: int = 12) -> None:
    """Encode uint8 [T, H, W, 3] (even H, W) as an mp4 (H.264 yuv420p), atomically."""
    import av

    if frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames_THWC.dtype} {frames_THWC.shape}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with io.atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width = frames_THWC.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.gop_size = max(1, round(fps))  # a keyframe a second, as cameras write
            stream.options = {"crf": str(crf)} if codec == "libx264" else {"qscale": "2"}
            for f in frames_THWC:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            out.mux(stream.encode(None))


def to_unit(video: Tensor) -> Tensor:
    """Decoded video (about [-1, 1]) -> [0, 1] fp32, upstream's and diffusers' (x / 2 + 0.5).clamp(0, 1)."""
    return (video.float() / 2 + 0.5).clamp(0, 1)


def to_uint8(video_CTHW: Tensor) -> np.ndarray:
    """One decoded video [3, T, H, W] -> uint8 [T, H, W, 3] (rounded, as diffusers' numpy_to_pil)."""
    return (to_unit(video_CTHW) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def load_image(path: str | Path):
    """An RGB PIL image; ValueError naming the file when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def crop_size_list(base: int, step: int = 32, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Upstream's I2V buckets (h, w): every (a * step, b * step) with a * b <= (base / step)^2 patches
    visited as its generate_crop_size_list walks them, aspect within max_ratio."""
    n = round((base / step) ** 2)
    out, a, b = [], n, 1
    while a > 0:
        if max(a, b) / min(a, b) <= max_ratio:
            out.append((a * step, b * step))
        if (b + 1) * a <= n:
            b += 1
        else:
            a -= 1
    return out


def nearest_bucket(height: int, width: int, *, base: int, step: int = 32) -> tuple[int, int]:
    """The bucket (h, w) whose h / w (rounded to 5 digits, as upstream) is nearest the image's;
    ties go to the first in upstream's order."""
    buckets = crop_size_list(base, step)
    ratios = np.array([round(h / w, 5) for h, w in buckets])
    return buckets[int(np.abs(ratios - height / width).argmin())]


def image_tensor(image, height: int, width: int, *, exact: bool) -> Tensor:
    """PIL RGB image -> [3, height, width] fp32 in [-1, 1].

    exact: resize straight to (height, width) (upstream's bucket path; the bucket's aspect is
    close to the image's). Otherwise scale to cover the size and crop the centre."""
    from PIL import Image

    if exact:
        im = image.resize((width, height), Image.BILINEAR)
    else:
        scale = max(height / image.height, width / image.width)
        w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
        left, top = (w - width) // 2, (h - height) // 2
        im = image.resize((w, h), Image.BILINEAR).crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return x * 2 - 1
