"""The dataset listing: data.txt -> data.json files -> validated `Entry`s, skips reported.

Format (as MindSpeed-MM's "combine" storage mode, which users already have):
  data.txt   one dataset per line: `<folder>,<data.json>`; blank lines and `#` comments
             ignored; relative paths resolve against the folder that holds data.txt.
  data.json  a list of objects {"path": "videos/x.mp4", "cap": str | [str, ...],
             "num_frames": int, "fps": number, "resolution": {"height": int, "width": int}},
             optional "duration" (seconds; stands in for a missing num_frames) and
             "cut": [start_frame, ...]; every other field is kept in `Entry.meta`.
  clip path  `<folder>/<path>` (an absolute `path` stands alone).
A bad line, file or field skips that line or clip with a reason (hvfunc.data.report);
only a missing data.txt (a wrong configuration) raises.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hvfunc.data.report import SkipReport

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass(frozen=True)
class Entry:
    """One clip of a data.json, validated; `meta` is the original object, extra fields included."""

    path: Path
    caption: str | tuple[str, ...]
    num_frames: int
    fps: float
    height: int
    width: int
    start_frame: int = 0
    source: str = ""
    """`<data.json>#<item index>`: where the entry came from, for the report."""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return self.path.name


def read_data_txt(data_txt: str | Path, report: SkipReport) -> list[tuple[Path, Path]]:
    """The (folder, data.json) pairs of a data.txt; unusable lines are reported and skipped."""
    data_txt = Path(data_txt)
    if not data_txt.is_file():
        raise FileNotFoundError(f"data list not found: {data_txt} (expected lines '<folder>,<data.json>')")
    base, out = data_txt.resolve().parent, []
    for n, line in enumerate(data_txt.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{data_txt}:{n}"
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(parts):
            report.add(where, "bad_list_line", f"{line!r} has {len(parts)} comma-separated fields, expected 2")
            continue
        folder, js = (base / p for p in parts)  # an absolute part replaces base
        missing = [str(p) for p, ok in ((folder, folder.is_dir()), (js, js.is_file())) if not ok]
        if missing:
            report.add(where, "missing_dataset", "not found: " + ", ".join(missing))
            continue
        out.append((folder, js))
    return out


def _number(item: dict, key: str, *, integer: bool) -> float | int:
    """A positive finite number field (ints for counts); raises ValueError naming the key."""
    v = item.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{key}={v!r} is not a positive number")
    if integer and v != int(v):
        raise ValueError(f"{key}={v!r} is not an integer")
    return int(v) if integer else float(v)


def _caption(item: dict) -> str | tuple[str, ...]:
    cap = item.get("cap")
    caps = list(cap) if isinstance(cap, list) else [cap]
    if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise ValueError(f"cap={cap!r} is not a non-empty string or list of strings")
    return caps[0] if isinstance(cap, str) else tuple(caps)


def parse_item(item: object, folder: Path, source: str) -> Entry:
    """Validate one data.json object; ValueError says which field is wrong."""
    if not isinstance(item, dict):
        raise ValueError(f"item is a {type(item).__name__}, not an object")
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"path={path!r} is not a non-empty string")
    caption = _caption(item)
    fps = _number(item, "fps", integer=False)
    if "num_frames" not in item and "duration" in item:
        num_frames = round(fps * _number(item, "duration", integer=False))
    else:
        num_frames = _number(item, "num_frames", integer=True)
    res = item.get("resolution")
    if not isinstance(res, dict):
        raise ValueError(f"resolution={res!r} is not an object with height and width")
    height, width = _number(res, "height", integer=True), _number(res, "width", integer=True)
    cut = item.get("cut", [0])
    if not isinstance(cut, list) or not cut or isinstance(cut[0], bool) or not isinstance(cut[0], int) or cut[0] < 0:
        raise ValueError(f"cut={cut!r} is not a list starting with a start frame >= 0")
    return Entry(path=folder / path, caption=caption, num_frames=num_frames, fps=fps, height=height, width=width,
                 start_frame=cut[0], source=source, meta=dict(item))


def read_data_json(folder: str | Path, data_json: str | Path, report: SkipReport) -> list[Entry]:
    """Validated entries of one data.json; bad items (and an unreadable file) are reported."""
    folder, data_json = Path(folder), Path(data_json)
    try:
        items = json.loads(data_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.add(data_json, "bad_json", f"{type(e).__name__}: {e}")
        return []
    if not isinstance(items, list):
        report.add(data_json, "bad_json", f"top level is a {type(items).__name__}, expected a list")
        return []
    report.listed += len(items)
    out = []
    for i, item in enumerate(items):
        source = f"{data_json}#{i}"
        try:
            out.append(parse_item(item, folder, source))
        except ValueError as e:
            where = item.get("path") if isinstance(item, dict) and isinstance(item.get("path"), str) else None
            report.add(folder / where if where else source, "bad_fields", f"{source}: {e}")
    return out


def check_files(entries: list[Entry], report: SkipReport) -> list[Entry]:
    """Drop entries whose file is missing, empty, not a video, or whose name an earlier entry took."""
    out: list[Entry] = []
    first: dict[str, Entry] = {}
    for e in entries:
        if e.path.suffix.lower() not in VIDEO_EXTENSIONS:
            report.add(e.path, "unsupported_type", f"extension {e.path.suffix!r}; reads {VIDEO_EXTENSIONS}")
        elif not e.path.is_file():
            report.add(e.path, "missing_file", f"listed in {e.source}")
        elif e.path.stat().st_size == 0:
            report.add(e.path, "empty_file", f"listed in {e.source}")
        elif e.name in first:
            report.add(e.path, "duplicate_name", f"{e.name} is already {first[e.name].path} "
                       f"({first[e.name].source}); the first one is kept")
        else:
            first[e.name] = e
            out.append(e)
    return out


def read_manifest(data_txt: str | Path, report: SkipReport | None = None) -> tuple[list[Entry], SkipReport]:
    """Every usable entry of every dataset a data.txt lists, and the report of what was skipped."""
    report = SkipReport() if report is None else report
    entries = [e for folder, js in read_data_txt(data_txt, report) for e in read_data_json(folder, js, report)]
    return check_files(entries, report), report
