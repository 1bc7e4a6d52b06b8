"""Extracted features on disk: one safetensors file per sample, plus an index.

    <root>/samples/<id>.safetensors   latents [C, T, H, W] (VAE posterior sample x scaling factor)
                                      text_states [S, D_text], text_mask [S], text_states_2 [D_clip]
                                      I2V also: cond_latents [C, 1, H, W] (clean first-frame latent)
                                      I2V, optional: text_states_noimg [S, D_text], text_mask_noimg [S]
                                      (same prompt, black reference image: image dropout)
                                      metadata "record": the sample's JSON record (below)
    <root>/index.jsonl                one record per line: id, file, caption, latent_shape, keys (the
                                      tensors in the file), task, source, frames, height, width
                                      (built from the files' metadata)
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
NOIMG_KEYS = ("text_states_noimg", "text_mask_noimg")
"""I2V image dropout: LLaVA states and mask of (same prompt, black image), stand-ins for
text_states / text_mask with the same shapes. CLIP sees no image, so text_states_2 stays."""
NOIMG_FLAG = "scripts/extract.py --task i2v --image-dropout-features True"


def sample_path(root: str | Path, sample_id: str) -> Path:
    return Path(root) / "samples" / f"{sample_id}.safetensors"


def write_sample(root: str | Path, record: dict, tensors: dict[str, Tensor]) -> Path:
    """Write one sample atomically; `record` must hold id, caption and task."""
    missing = [k for k in KEYS[record["task"]] if k not in tensors]
    if missing:
        raise ValueError(f"sample {record['id']}: missing tensors {missing}")
    if any(k in tensors for k in NOIMG_KEYS):
        why = "they are I2V features" if record["task"] != "i2v" else noimg_problem(
            {k: list(v.shape) for k, v in tensors.items()})
        if why:
            raise ValueError(f"sample {record['id']} ({record['task']}): cannot store {list(NOIMG_KEYS)}: {why}")
    path = sample_path(root, record["id"])
    rec = dict(record, file=str(path.relative_to(root)), latent_shape=list(tensors["latents"].shape),
               keys=sorted(tensors))
    io.save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"record": json.dumps(rec)})
    return path


def noimg_problem(shapes: dict[str, list[int]]) -> str | None:
    """Why a sample's tensors (name -> shape) cannot serve image dropout; None when they can."""
    missing = [k for k in NOIMG_KEYS if k not in shapes]
    if missing:
        return f"no {missing}"
    bad = [f"{k} {shapes[k]} vs {ref} {shapes.get(ref)}" for k, ref in zip(NOIMG_KEYS, TEXT_KEYS)
           if shapes[k] != shapes.get(ref)]
    return f"shapes differ: {bad}" if bad else None


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
    comes back in the sample so the trainer draws that sample's noise from it.
    noimg=True (I2V image dropout) also loads NOIMG_KEYS and raises a ValueError unless
    every usable sample has them: dropping the image on only some samples would be silent."""

    def __init__(self, root: str | Path, *, task: str = "t2v", noimg: bool = False,
                 report: SkipReport | None = None) -> None:
        if noimg and task != "i2v":
            raise ValueError(f"black-image features (image dropout) exist for I2V only, not {task}")
        self.root, self.task = Path(root), task
        self.tensor_keys = KEYS[task] + (NOIMG_KEYS if noimg else ())
        self.report = report or SkipReport()
        records = read_index(root)
        self.report.listed = len(records)
        self._noimg_missing: list[str] = []
        self.records = [r for r in records if self._usable(r, noimg)]
        if not self.records:
            raise ValueError(f"no usable {task} sample in {root}:\n{self.report.summary(0)}")
        if self._noimg_missing:
            raise ValueError(f"{len(self._noimg_missing)} of {len(self.records)} samples in {root} have no usable "
                             f"black-image features for image dropout (first: {self._noimg_missing[0]}); write them "
                             f"with {NOIMG_FLAG} (on by default for I2V; a rerun into this folder re-extracts the "
                             f"samples that lack them) or train with image_dropout 0")

    def _usable(self, r: dict, noimg: bool) -> bool:
        path = self.root / r.get("file", "")
        try:
            shapes = io.safetensors_shapes(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a reported skip
            self.report.add(path, "bad_feature", f"{type(e).__name__}: {e}")
            return False
        missing = [k for k in KEYS[self.task] if k not in shapes]
        if missing:
            self.report.add(path, "bad_feature", f"no {missing} (extracted for another task?)")
            return False
        if noimg and (why := noimg_problem(shapes)):
            self._noimg_missing.append(f"{path}: {why}")
        return True

    def __len__(self) -> int:
        return len(self.records)

    def keys(self) -> list[tuple[int, ...]]:
        """Bucket key of every sample: its latent shape."""
        return [tuple(r["latent_shape"]) for r in self.records]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        i, seed = item if isinstance(item, tuple) else (item, item)
        r = self.records[i]
        t = io.load_safetensors(self.root / r["file"])
        return {k: t[k] for k in self.tensor_keys} | {"caption": r.get("caption", ""), "index": i, "seed": seed}


def collate(samples: Sequence[dict]) -> dict:
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch must have one latent shape (use BucketSampler), got {sorted(shapes)}")
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if isinstance(samples[0][k], Tensor)}
    return out | {"caption": [s["caption"] for s in samples], "index": torch.tensor([s["index"] for s in samples]),
                  "seed": [s["seed"] for s in samples]}
