"""The raw-video dataset: manifest + buckets + frame selection + decoding + transform.

`build_dataset(data_txt, cfg)` reads every data.json, skips (and reports) what cannot be
used, and plans each clip's bucket (frames, height, width). `dataset[i]` or
`dataset[(i, draw_seed)]` (what BucketSampler yields) decodes one clip:
  video    float32 [C, T, H, W] in [-1, 1] (C = 3 RGB, T frames, H x W pixels)
  caption  str (one of the list, drawn with the same generator, when `cap` is a list)
  meta     the data.json object (extra fields kept); path, index, bucket, frames (source indices)
  skipped  Skip records of clips that failed to decode before this one was used.
A clip that fails at read time (corrupt file, fewer frames or another size than data.json
says) is reported and replaced by the next clip of the same bucket, so a batch keeps its
size and shape (a bucket whose every clip fails hands its batches to the next bucket); only a
dataset whose every clip fails raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from hvfunc.config import DataConfig
from hvfunc.data.buckets import Key, assign_buckets, group, mix_seed
from hvfunc.data.manifest import Entry, read_manifest
from hvfunc.data.report import Skip, SkipReport
from hvfunc.data.transform import to_model_input
from hvfunc.data.video import ClipError, decode, select_frames


class VideoDataset(torch.utils.data.Dataset):
    """Map-style dataset over planned entries; `report` holds everything skipped so far."""

    def __init__(self, entries: Sequence[Entry], keys: Sequence[Key], cfg: DataConfig, *, seed: int = 0,
                 report: SkipReport | None = None) -> None:
        if len(entries) != len(keys):
            raise ValueError(f"{len(entries)} entries but {len(keys)} bucket keys")
        self.entries, self.keys, self.cfg, self.seed = list(entries), [tuple(k) for k in keys], cfg, seed
        self.buckets = group(self.keys)
        self._slot = {i: n for idx in self.buckets.values() for n, i in enumerate(idx)}
        self.report = SkipReport() if report is None else report
        self._bad: set[int] = set()  # clips this process already found unreadable

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        i, draw = (item, mix_seed(self.seed, item)) if isinstance(item, int) else item
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} clips")
        skipped: list[Skip] = []
        for j in self._candidates(i):
            if j in self._bad:
                continue
            try:
                sample = self.load(j, draw)
            except ClipError as e:
                self._bad.add(j)
                skipped.append(Skip(str(self.entries[j].path), e.reason, e.detail, "read"))
                self.report.extend(skipped[-1:])
                continue
            return sample | {"skipped": skipped}
        raise RuntimeError(f"no clip of the dataset can be read:\n{self.report.summary(len(self))}")

    def _candidates(self, i: int) -> Iterator[int]:
        """Clip i, then the rest of its bucket, then the other buckets in key order. Every clip of a
        batch shares a bucket, so if that whole bucket is unreadable they all move to the same next one."""
        keys = list(self.buckets)
        k, n = keys.index(self.keys[i]), self._slot[i]
        for key in keys[k:] + keys[:k]:
            b = self.buckets[key]
            yield from b[n % len(b):] + b[:n % len(b)]

    def load(self, i: int, draw_seed: int) -> dict:
        """Decode and transform clip i; raises ClipError for bad data."""
        e, (T, H, W) = self.entries[i], self.keys[i]
        g = torch.Generator().manual_seed(draw_seed)
        frames = select_frames(e.num_frames, e.fps, length=T, train_fps=self.cfg.train_fps,
                               start_frame=e.start_frame, generator=g)
        pixels_THWC = decode(e.path, frames, backend=self.cfg.backend)
        if tuple(pixels_THWC.shape[1:3]) != (e.height, e.width):
            raise ClipError("metadata_mismatch", f"decoded {pixels_THWC.shape[1]}x{pixels_THWC.shape[2]}, "
                            f"data.json says {e.height}x{e.width} ({e.source})")
        caption = e.caption
        if not isinstance(caption, str):
            caption = caption[int(torch.randint(len(caption), (), generator=g))]
        return {"video": to_model_input(pixels_THWC, H, W), "caption": caption, "meta": e.meta, "path": str(e.path),
                "index": i, "bucket": (T, H, W), "frames": frames}

    def summary(self) -> str:
        """The skip report and the bucket table, for the end of a run."""
        rows = [f"  bucket {t:>3} frames x {h:>4} x {w:<4} {len(v):>6} clips" for (t, h, w), v in self.buckets.items()]
        return self.report.summary(len(self)) + "\n" + "\n".join(rows)


def build_dataset(data_txt: str | Path, cfg: DataConfig, *, seed: int = 0) -> VideoDataset:
    """Read data.txt and every data.json it lists, skip and report bad clips, plan buckets.
    An empty result raises ValueError with the report."""
    entries, report = read_manifest(data_txt)
    kept, keys = assign_buckets(entries, cfg, report)
    if not kept:
        raise ValueError(f"no usable clip in {data_txt}:\n{report.summary(0)}")
    return VideoDataset(kept, keys, cfg, seed=seed, report=report)


def collate(samples: Sequence[dict]) -> dict:
    """Stack one bucket's samples: video [B, C, T, H, W]; lists for the rest; skips concatenated."""
    shapes = {tuple(s["video"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch must have one shape (use BucketSampler), got {sorted(shapes)}")
    return {"video": torch.stack([s["video"] for s in samples]), "caption": [s["caption"] for s in samples],
            "meta": [s["meta"] for s in samples], "path": [s["path"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples]), "bucket": samples[0]["bucket"],
            "frames": [s["frames"] for s in samples], "skipped": [k for s in samples for k in s["skipped"]]}
