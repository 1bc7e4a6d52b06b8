"""A synthetic raw-video dataset in the exact data.txt / data.json / videos/ format.

Each clip shows one or two coloured shapes (circle, square, triangle) crossing a dark
background in a straight line; its caption says which colour, which shape and which
direction ("A red circle moves from left to right ..."). Clips cycle through a few
sizes, frame rates and lengths so that fps resampling, dynamic resolution and several
buckets are exercised. Real mp4 files (H.264 via PyAV, MPEG-4 Part 2 where the PyAV
build lacks libx264). Deterministic from a seed (a torch.Generator draws every choice).
Shapes: T frames, H x W pixels, RGB uint8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hvfunc import io
from hvfunc.media import write_mp4

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 100, 245), "yellow": (240, 220, 40),
           "magenta": (220, 50, 220), "cyan": (40, 220, 230), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}
# (height, width, fps, frames): 24 fps as trained, 30 and 60 resampled down, 12 resampled up, portrait and landscape
FORMATS = ((64, 96, 24, 41), (96, 64, 30, 52), (64, 64, 12, 21), (80, 128, 24, 33), (48, 80, 60, 102))
BACKGROUND = (24, 24, 32)


@dataclass(frozen=True)
class Mover:
    shape: str
    colour: str
    direction: str
    radius: int
    """Half the shape's extent in pixels."""
    lane: float
    """Position across the motion, as a fraction of the frame (0.5: through the centre)."""


@dataclass(frozen=True)
class ClipSpec:
    height: int
    width: int
    fps: int
    num_frames: int
    movers: tuple[Mover, ...]


def _pick(seq, gen: torch.Generator):
    return seq[int(torch.randint(len(seq), (), generator=gen))]


def random_clip(gen: torch.Generator, fmt: tuple[int, int, int, int], movers: int | None = None,
                size: float = 0.125) -> ClipSpec:
    """`movers` (None: one or two at random) movers with distinct colours on a clip of the given format,
    each of radius `size` x the frame's shorter side (at least 4 px)."""
    h, w, fps, n = fmt
    drawn = 1 + int(torch.randint(2, (), generator=gen))  # drawn either way: the same stream for every choice
    count = movers or drawn
    colours = [list(COLOURS)[i] for i in torch.randperm(len(COLOURS), generator=gen)[:count]]
    movers = tuple(Mover(shape=_pick(SHAPES, gen), colour=c, direction=_pick(list(DIRECTIONS), gen),
                         radius=max(4, int(min(h, w) * size)), lane=0.25 + 0.5 * float(torch.rand((), generator=gen)))
                   for c in colours)
    return ClipSpec(height=h, width=w, fps=fps, num_frames=n, movers=movers)


def caption(spec: ClipSpec) -> str:
    parts = [f"a {m.colour} {m.shape} moves from {m.direction}" for m in spec.movers]
    return (" and ".join(parts) + " across a dark background.").capitalize()


def _sweep(t: np.ndarray, extent: int, r: int, forward: bool) -> np.ndarray:
    """Centres that carry a shape of radius r from touching one edge to touching the other (always in view)."""
    s = r + t * (extent - 2 * r)
    return s if forward else extent - s


def render(spec: ClipSpec) -> np.ndarray:
    """uint8 [T, H, W, 3]: each mover crosses the frame from edge to edge over the clip."""
    T, H, W = spec.num_frames, spec.height, spec.width
    frames = np.empty((T, H, W, 3), np.uint8)
    frames[:] = BACKGROUND
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    t = np.linspace(0.0, 1.0, T, dtype=np.float32)[:, None, None]  # [T, 1, 1]
    for m in spec.movers:
        dx, dy = DIRECTIONS[m.direction]
        r = m.radius
        cx = _sweep(t, W, r, dx > 0) if dx else np.full_like(t, m.lane * W)
        cy = _sweep(t, H, r, dy > 0) if dy else np.full_like(t, m.lane * H)
        ox, oy = x[None] - cx, y[None] - cy  # [T, H, W] offsets from the centre
        if m.shape == "circle":
            mask = ox**2 + oy**2 <= r * r
        elif m.shape == "square":
            mask = (np.abs(ox) <= r) & (np.abs(oy) <= r)
        else:  # triangle, apex up: half-width grows from 0 at the top to r at the base
            mask = (oy >= -r) & (oy <= r) & (np.abs(ox) <= (oy + r) / 2)
        frames[mask] = COLOURS[m.colour]
    return frames


def write_folder(folder: str | Path, specs: list[ClipSpec], names: list[str]) -> Path:
    """Write clips to `folder/videos/` and their data.json; returns the data.json path."""
    folder = Path(folder)
    items = []
    for spec, name in zip(specs, names):
        write_mp4(folder / "videos" / name, render(spec), spec.fps)
        items.append({"path": f"videos/{name}", "cap": caption(spec), "num_frames": spec.num_frames,
                      "fps": spec.fps, "resolution": {"height": spec.height, "width": spec.width},
                      "shapes": [{"shape": m.shape, "colour": m.colour, "direction": m.direction}
                                 for m in spec.movers]})
    io.write_atomic(folder / "data.json", json.dumps(items, indent=1).encode())
    return folder / "data.json"


def make_dataset(root: str | Path, *, num_clips: int = 10, num_folders: int = 1, seed: int = 0,
                 formats: tuple[tuple[int, int, int, int], ...] = FORMATS, movers: int | None = None,
                 size: float = 0.125) -> Path:
    """Write `num_folders` dataset folders under root (clips split between them, names unique)
    and root/data.txt listing them; returns the data.txt path. movers: shapes per clip (None: 1 or 2);
    size: a shape's radius as a fraction of the frame's shorter side."""
    if not 1 <= num_folders <= num_clips:
        raise ValueError(f"need 1 <= num_folders ({num_folders}) <= num_clips ({num_clips})")
    root, gen = Path(root).resolve(), torch.Generator().manual_seed(seed)
    specs = [random_clip(gen, formats[i % len(formats)], movers, size) for i in range(num_clips)]
    lines = []
    for k in range(num_folders):
        ids = list(range(k, num_clips, num_folders))
        js = write_folder(root / f"ds{k}", [specs[i] for i in ids], [f"clip_{i:04d}.mp4" for i in ids])
        lines.append(f"{root / f'ds{k}'},{js}")
    io.write_atomic(root / "data.txt", ("\n".join(lines) + "\n").encode())
    return root / "data.txt"


def track(frames: np.ndarray, threshold: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the shapes are in uint8 frames [T, H, W, 3]: per frame the centroid (x, y) in pixels
    [T, 2], the mean colour [T, 3] and the count [T] of the pixels farther than `threshold` (largest
    of the three channel differences, 0-255) from BACKGROUND; NaN rows where no pixel is."""
    far = (np.abs(frames.astype(np.int16) - np.array(BACKGROUND, np.int16)).max(-1) > threshold)  # [T, H, W]
    y, x = np.mgrid[0:far.shape[1], 0:far.shape[2]]
    n = far.sum((1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.stack([(far * x).sum((1, 2)) / n, (far * y).sum((1, 2)) / n], -1)
        colour = (frames * far[..., None]).sum((1, 2)) / n[:, None]
    return centre, colour, n


def shape_error(video: np.ndarray, clip: np.ndarray) -> dict[str, float]:
    """How far a video [T, H, W, 3] is from a synthetic clip of the same shape (uint8 frames):
    position_px, the mean over frames of the distance between their shapes' centroids (a frame
    where one of the two shows no shape, or the video's "shape" covers over 4x the clip's pixels, as
    noise does, counts as the frame's diagonal); colour, the mean absolute difference of their
    shapes' mean colours (0-255; such a frame counts 255); psnr in dB."""
    if video.shape != clip.shape:
        raise ValueError(f"video {video.shape} and clip {clip.shape} differ in shape")
    (p, c, n), (q, d, m) = track(video), track(clip)
    diag, lost = float(np.hypot(*clip.shape[1:3])), n > 4 * m
    dist = np.where(lost, diag, np.nan_to_num(np.hypot(*(p - q).T), nan=diag))
    colour = np.where(lost, 255.0, np.nan_to_num(np.abs(c - d).mean(-1), nan=255.0))
    mse = float(((video.astype(np.float64) - clip) ** 2).mean())
    return {"position_px": float(dist.mean()), "colour": float(colour.mean()),
            "psnr": float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))}
