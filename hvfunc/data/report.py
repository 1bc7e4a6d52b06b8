"""The skip report: every clip or dataset line that was dropped, with its reason.

Bad data never stops a run and is never silent. Each skip is a record (path, reason,
detail, stage) where stage is "index" (found while reading data.txt / data.json and
planning buckets) or "read" (found while decoding, inside a DataLoader worker). Records
travel back from workers inside batches (`batch["skipped"]`) and are merged here; a
record is kept once per (path, reason), so a clip that fails every epoch counts once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from hvfunc import io

# Every reason a clip or a data.txt line can be skipped, with what it means.
REASONS: dict[str, str] = {
    "bad_list_line": "data.txt line is not '<folder>,<data.json>'",
    "missing_dataset": "data.txt names a folder or data.json that does not exist",
    "bad_json": "data.json is not valid JSON or not a list of objects",
    "bad_fields": "a required field is missing or has the wrong type or value",
    "unsupported_type": "file extension is not a video this loader reads",
    "missing_file": "video file does not exist",
    "empty_file": "video file has zero bytes",
    "duplicate_name": "file name already used by an earlier clip (features are keyed by name)",
    "too_few_frames": "fewer frames than min_frames after fps resampling and 4k+1 rounding",
    "too_small": "source height*width below min_area (or nothing left after stride alignment)",
    "bad_aspect": "aspect ratio outside the configured limit",
    "decode_error": "the decoder cannot open or read the file (corrupt or not a video)",
    "metadata_mismatch": "decoded height/width differ from the data.json resolution",
    "bad_feature": "extracted feature file missing, unreadable, or not holding the expected tensors",
}


@dataclass(frozen=True)
class Skip:
    path: str
    """The clip's path, or `data.txt:<line>` / the data.json for dataset-level skips."""
    reason: str
    """A key of REASONS."""
    detail: str
    """What exactly was wrong (field, value, decoder message)."""
    stage: str = "index"
    """"index" (manifest and bucket planning) or "read" (decode time)."""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}; known: {sorted(REASONS)}")


class SkipReport:
    """Skips counted by reason; `listed` is the number of clips the data.json files named."""

    def __init__(self) -> None:
        self._skips: dict[tuple[str, str], Skip] = {}
        self.listed = 0

    def add(self, path: str | Path, reason: str, detail: str, stage: str = "index") -> None:
        skip = Skip(str(path), reason, detail, stage)
        self._skips.setdefault((skip.path, skip.reason), skip)

    def extend(self, skips: Iterable[Skip | dict]) -> None:
        """Merge records, e.g. `batch["skipped"]` from DataLoader workers."""
        for s in skips:
            s = s if isinstance(s, Skip) else Skip(**s)
            self._skips.setdefault((s.path, s.reason), s)

    @property
    def skips(self) -> list[Skip]:
        return list(self._skips.values())

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self._skips.values()))

    def __len__(self) -> int:
        return len(self._skips)

    def summary(self, kept: int | None = None, *, show: int = 20) -> str:
        """A table of counts by reason and the first `show` skipped entries."""
        head = f"data: {self.listed} clips listed"
        head += f", {kept} kept" if kept is not None else ""
        lines = [f"{head}, {len(self)} skipped"]
        for reason, n in sorted(self.counts().items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<18} {n:>6}  {REASONS[reason]}")
        for s in self.skips[:show]:
            lines.append(f"  - [{s.stage}] {s.path}: {s.reason} ({s.detail})")
        if len(self) > show:
            lines.append(f"  ... and {len(self) - show} more (see the JSON report)")
        return "\n".join(lines)

    def to_dict(self, kept: int | None = None) -> dict:
        return {"listed": self.listed, "kept": kept, "skipped": len(self), "counts": self.counts(),
                "skips": [asdict(s) for s in self.skips]}

    def write(self, path: str | Path, kept: int | None = None) -> None:
        """The whole report as JSON, written atomically."""
        io.write_atomic(path, json.dumps(self.to_dict(kept), indent=1).encode())
