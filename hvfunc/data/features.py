"""Extracted features on disk: one safetensors file per sample, plus an index.

    <root>/samples/<id>.safetensors   latents [C, T, H, W] (VAE posterior sample x scaling factor)
                                      text_states [S, D_text], text_mask [S], text_states_2 [D_clip]
                                      I2V also: cond_latents [C, 1, H, W] (clean first-frame latent)
                                      metadata "record": the sample's JSON record (below)
    <root>/index.jsonl                one record per line: id, file, caption, latent_shape, task,
                                      source, frames, height, width (built from the files' metadata)
    <root>/uncond.safetensors         the empty prompt's text conditioning (for CFG dropout)
Files are written atomically, so a sample file that exists is complete; the index is
rebuilt from the files, so an interrupted extraction resumes by skipping existing ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hvfunc import io
from hvfunc.data.report import SkipReport

TEXT_KEYS = ("text_states", "text_mask", "text_states_2")
KEYS = {"t2v": ("latents", *TEXT_KEYS), "i2v": ("latents", *TEXT_KEYS, "cond_latents")}


def sample_path(root: str | Path, sample_id: str) -> Path:
    return Path(root) / "samples" / f"{sample_id}.safetensors"


def write_sample(root: str | Path, record: dict, tensors: dict[str, Tensor]) -> Path:
    """Write one sample atomically; `record` must hold id, caption and task."""
    missing = [k for k in KEYS[record["task"]] if k not in tensors]
    if missing:
        raise ValueError(f"sample {record['id']}: missing tensors {missing}")
    path = sample_path(root, record["id"])
    rec = dict(record, file=str(path.relative_to(root)), latent_shape=list(tensors["latents"].shape))
    io.save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"record": json.dumps(rec)})
    return path


def build_index(root: str | Path) -> list[dict]:
    """Scan the sample files (headers only) and write index.jsonl atomically, sorted by id."""
    root = Path(root)
    records = []
    for f in sorted((root / "samples").glob("*.safetensors")):
        if f.name.startswith("."):  # a temp file of an interrupted write
            continue
        try:
            records.append(json.loads(io.safetensors_metadata(f)["record"]))
        except Exception as e:  # noqa: BLE001 - a damaged file is reported by FeatureDataset
            print(f"warning: {f} has no readable record ({type(e).__name__}: {e}); left out of the index")
    records.sort(key=lambda r: r["id"])
    io.write_atomic(root / "index.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def read_index(root: str | Path) -> list[dict]:
    path = Path(root) / "index.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no feature index {path}: run scripts/extract.py first")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
    return out


class FeatureDataset(torch.utils.data.Dataset):
    """Samples of a feature folder for one task; unreadable files are skipped and reported.

    Items are indices or (index, draw_seed) pairs as BucketSampler yields them; the seed
    comes back in the sample so the trainer draws that sample's noise from it."""

    def __init__(self, root: str | Path, *, task: str = "t2v", report: SkipReport | None = None) -> None:
        self.root, self.task = Path(root), task
        self.report = report or SkipReport()
        records = read_index(root)
        self.report.listed = len(records)
        self.records = [r for r in records if self._usable(r)]
        if not self.records:
            raise ValueError(f"no usable {task} sample in {root}:\n{self.report.summary(0)}")

    def _usable(self, r: dict) -> bool:
        path = self.root / r.get("file", "")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                missing = [k for k in KEYS[self.task] if k not in f.keys()]
        except Exception as e:  # noqa: BLE001 - any unreadable file is a reported skip
            self.report.add(path, "bad_feature", f"{type(e).__name__}: {e}")
            return False
        if missing:
            self.report.add(path, "bad_feature", f"no {missing} (extracted for another task?)")
        return not missing

    def __len__(self) -> int:
        return len(self.records)

    def keys(self) -> list[tuple[int, ...]]:
        """Bucket key of every sample: its latent shape."""
        return [tuple(r["latent_shape"]) for r in self.records]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        i, seed = item if isinstance(item, tuple) else (item, item)
        r = self.records[i]
        t = io.load_safetensors(self.root / r["file"])
        return {k: t[k] for k in KEYS[self.task]} | {"caption": r.get("caption", ""), "index": i, "seed": seed}


def collate(samples: Sequence[dict]) -> dict:
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch must have one latent shape (use BucketSampler), got {sorted(shapes)}")
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if isinstance(samples[0][k], Tensor)}
    return out | {"caption": [s["caption"] for s in samples], "index": torch.tensor([s["index"] for s in samples]),
                  "seed": [s["seed"] for s in samples]}
