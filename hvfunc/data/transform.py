"""Space: a clip's output height x width, and uint8 frames -> model input in [-1, 1].

Shapes: T frames, H x W pixels, C = 3 RGB channels.
Size rules (per DataConfig):
  fixed    every clip becomes max_height x max_width.
  dynamic  keep the aspect: scale by sqrt(max_area / (h*w)) when larger than max_area
           (sizes truncated as upstream's maxhwresize), then round each side down to a
           multiple of `stride`.
  both     skip a clip whose source h*w < min_area ("too_small") or whose h/w is outside
           the aspect limit ("bad_aspect": dynamic [1/a, a]; fixed a factor a around
           max_height/max_width).
Pixels: centre-crop the largest box with the output aspect, resize it (bilinear,
antialiased), map 0..255 to -1..1 and lay out as [C, T, H, W].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hvfunc.config import DataConfig
from hvfunc.data.video import ClipError


def dynamic_size(height: int, width: int, *, max_area: int, stride: int) -> tuple[int, int]:
    """Aspect-keeping size within max_area, each side rounded down to a multiple of stride."""
    if height * width > max_area:
        s = math.sqrt(max_area / (height * width))
        height, width = int(height * s), int(width * s)
    return height // stride * stride, width // stride * stride


def target_size(height: int, width: int, cfg: DataConfig) -> tuple[int, int]:
    """Output (H, W) of a height x width source; raises ClipError("too_small" | "bad_aspect")."""
    if height * width < cfg.min_source_area:
        raise ClipError("too_small", f"{height}x{width} = {height * width} pixels < min_area {cfg.min_source_area}")
    aspect = height / width
    centre = cfg.max_height / cfg.max_width if cfg.resize == "fixed" else 1.0
    lo, hi = centre / cfg.max_aspect, centre * cfg.max_aspect
    if not lo <= aspect <= hi:
        raise ClipError("bad_aspect", f"h/w = {aspect:.3f} of {height}x{width} is outside [{lo:.3f}, {hi:.3f}]")
    if cfg.resize == "fixed":
        return cfg.max_height, cfg.max_width
    h, w = dynamic_size(height, width, max_area=cfg.max_area, stride=cfg.stride)
    if not h or not w:
        raise ClipError("too_small", f"{height}x{width} leaves {h}x{w} after alignment to stride {cfg.stride}")
    return h, w


def center_crop_box(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the largest centred box of a height x width frame with aspect out_h/out_w."""
    if height * out_w > width * out_h:  # source is taller than the output: crop rows
        h, w = width * out_h // out_w, width
    else:
        h, w = height, height * out_w // out_h
    return (height - h) // 2, (width - w) // 2, h, w


def to_model_input(frames_THWC: Tensor, height: int, width: int) -> Tensor:
    """uint8 [T, H0, W0, 3] -> float32 [3, T, height, width] in [-1, 1] (crop, resize, scale)."""
    if frames_THWC.dtype != torch.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames_THWC.dtype} {tuple(frames_THWC.shape)}")
    top, left, h, w = center_crop_box(frames_THWC.shape[1], frames_THWC.shape[2], height, width)
    x_TCHW = frames_THWC[:, top:top + h, left:left + w].permute(0, 3, 1, 2)
    if (h, w) != (height, width):
        # CPU resizes uint8 directly (4x faster, same result to one grey level); other devices need floats
        x_TCHW = x_TCHW if x_TCHW.device.type == "cpu" else x_TCHW.float()
        x_TCHW = F.interpolate(x_TCHW.contiguous(), size=(height, width), mode="bilinear", align_corners=False,
                               antialias=True)
    return (x_TCHW.float() / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()
