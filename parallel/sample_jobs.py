"""What a sampling run makes and where it goes: jobs, file names, sidecars, skipping.

A job is one video: (prompt, seed, reference image, size). Files are
`<out>/<NNN>-seed<S>-<prompt slug>.mp4` with a `.json` sidecar beside (and, asked for,
`.latents.safetensors`); NNN numbers the jobs over (prompt, video) in order. A rerun with
the same settings skips a job whose mp4 and sidecar exist; other settings for an existing
file are an error (never silently overwritten) unless --overwrite. Writes are atomic.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from hvfunc import io


@dataclass(frozen=True, kw_only=True)
class Job:
    index: int
    """Position over (prompt, video) pairs: names the files and orders the work."""
    prompt: str
    seed: int
    height: int
    width: int
    image: Path | None = None
    """I2V reference image."""
    exact_resize: bool = False
    """I2V: resize the image straight to the bucket (upstream's rule) instead of cover + centre crop."""

    @property
    def stem(self) -> str:
        return f"{self.index:03d}-seed{self.seed}-{slug(self.prompt)}"


def slug(text: str, limit: int = 48) -> str:
    """Lowercase ASCII words joined by '-', cut at a word boundary (file-name safe)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = ""
    for w in words:
        if len(out) + len(w) + 1 > limit:
            break
        out = f"{out}-{w}" if out else w
    return out or "prompt"


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file (one prompt or image path a line)."""
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    lines = [x for x in lines if x]
    if not lines:
        raise ValueError(f"{what} {path} has no non-empty line")
    return lines


def read_images(path: Path, n: int, what: str) -> list[Path]:
    """One image path a line, one per prompt (n); relative paths are relative to the file's folder."""
    images = [Path(x) if Path(x).is_absolute() else path.parent / x for x in read_lines(path, what)]
    if len(images) != n:
        raise ValueError(f"{what} {path} lists {len(images)} images for {n} prompts: give one per prompt")
    return images


def file_identity(path: Path | None) -> dict | None:
    """Path, bytes and newest mtime of a weights file or folder (what the sidecar records)."""
    if path is None:
        return None
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {"path": str(path.resolve()), "bytes": sum(p.stat().st_size for p in files),
            "mtime": max((p.stat().st_mtime for p in files), default=0.0)}


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("hvfunc", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def paths(out: Path, job: Job) -> dict[str, Path]:
    return {k: out / f"{job.stem}{ext}" for k, ext in
            (("video", ".mp4"), ("sidecar", ".json"), ("latents", ".latents.safetensors"))}


def pending(out: Path, jobs: list[Job], settings: dict, *, overwrite: bool) -> tuple[list[Job], list[Job]]:
    """(jobs to run, jobs already done with these settings). A finished job whose sidecar holds
    other settings raises, naming the file and the first differing settings."""
    todo, done = [], []
    for job in jobs:
        p = paths(out, job)
        if overwrite or not (p["video"].is_file() and p["sidecar"].is_file()):
            todo.append(job)
            continue
        try:
            old = json.loads(p["sidecar"].read_text())["settings"]
        except (json.JSONDecodeError, KeyError, OSError):
            todo.append(job)  # a damaged sidecar: redo the video
            continue
        want = job_settings(job, settings)
        if old != want:
            diff = {k: (old.get(k), want.get(k)) for k in sorted(set(old) | set(want)) if old.get(k) != want.get(k)}
            raise ValueError(f"{p['video']} exists with other settings (old, new): {dict(list(diff.items())[:4])}; "
                             f"pass --overwrite to redo it or choose another --out")
        done.append(job)
    return todo, done


def job_settings(job: Job, settings: dict) -> dict:
    """Everything that decides a video's pixels (JSON values), compared on reruns."""
    return json.loads(json.dumps({**settings, "prompt": job.prompt, "seed": job.seed, "height": job.height,
                                  "width": job.width, "image": str(job.image) if job.image else None,
                                  "exact_resize": job.exact_resize}, default=str))


def write_sidecar(out: Path, job: Job, settings: dict, report: dict) -> Path:
    """The sidecar: the settings (compared on reruns) and what happened (times, steps, memory)."""
    path = paths(out, job)["sidecar"]
    body = {"video": paths(out, job)["video"].name, "settings": job_settings(job, settings), **report,
            "versions": versions()}
    io.write_atomic(path, json.dumps(body, indent=1, default=str).encode())
    return path
