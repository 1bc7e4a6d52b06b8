"""Validation prompts encoded next to the features, for sample videos while training.

    <features>/validation/index.json               prompts (the lines of the prompt file), images
                                                   (I2V: paths and sha256 of their bytes), the
                                                   negative prompt (None: no uncond), the files
                                                   they came from, the text encoders' identities
    <features>/validation/conditioning.safetensors per prompt i: `<i>.cond.<key>` and, with a
                                                   negative prompt, `<i>.uncond.<key>` for key in
                                                   text_states [1, S, D], text_mask [1, S],
                                                   text_states_2 [1, P]: the tensors the sampler's
                                                   text stage makes (hvfunc.pipeline.encode), fp32
scripts/extract.py --validation-prompts writes them with the extraction's encoders; the
trainer reads them (it never loads a text encoder) and checks they were made from the prompt
(and image) files it is given. Both files are written atomically, the index last.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from hvfunc import io
from hvfunc.pipeline import Conditioning
from hvfunc.sample import COND_KEYS

EXTRACT_FLAG = "scripts/extract.py --validation-prompts"


def folder(features: str | Path) -> Path:
    return Path(features) / "validation"


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write(features: str | Path, prompts: Sequence[str], images: Sequence[Path] | None, conds: Sequence[Conditioning],
          *, negative: str | None, sources: dict, encoders: dict) -> Path:
    """Store the conditioning of each prompt (and its image); returns the index path."""
    root = folder(features)
    tensors = {}
    for i, c in enumerate(conds):
        for part, d in (("cond", c.cond), ("uncond", c.uncond)):
            tensors |= {f"{i}.{part}.{k}": d[k].detach().cpu().contiguous() for k in COND_KEYS} if d else {}
    io.save_safetensors(tensors, root / "conditioning.safetensors")
    index = {"prompts": list(prompts), "images": None if images is None else [str(p) for p in images],
             "image_sha256": None if images is None else [sha256(p) for p in images], "negative_prompt": negative,
             "sources": {k: None if v is None else str(v) for k, v in sources.items()}, "text_encoders": encoders}
    io.write_atomic(root / "index.json", json.dumps(index, indent=1).encode())
    return root / "index.json"


def read(features: str | Path, prompts: Sequence[str], images: Sequence[Path] | None, *,
         prompts_file: Path) -> tuple[dict, list[Conditioning]]:
    """(index, conditioning per prompt) of the encodings made from exactly these prompts (and images,
    compared by content); a ValueError naming the prompt file and the extract flag otherwise."""
    root, redo = folder(features), f"run {EXTRACT_FLAG} {prompts_file} (with the --data / --out of these features"
    redo += "; I2V also --validation-images)" if images is not None else ")"
    if not (root / "index.json").is_file():
        raise ValueError(f"--validation.prompts {prompts_file}: {root} holds no encoded validation prompts: {redo}")
    index = json.loads((root / "index.json").read_text())
    why = _differs(index, list(prompts), images)
    if why:
        raise ValueError(f"--validation.prompts {prompts_file}: the encodings in {root} were made from "
                         f"{index['sources'].get('prompts')} ({why}): {redo} to encode these")
    t = io.load_safetensors(root / "conditioning.safetensors")

    def part(i: int, name: str) -> dict | None:
        return {k: t[f"{i}.{name}.{k}"] for k in COND_KEYS} if f"{i}.{name}.text_states" in t else None

    return index, [Conditioning(part(i, "cond"), part(i, "uncond")) for i in range(len(prompts))]


def _differs(index: dict, prompts: list[str], images: Sequence[Path] | None) -> str | None:
    """Why the index was not made from these prompts and images; None when it was."""
    old = index["prompts"]
    if old != prompts:
        if len(old) != len(prompts):
            return f"{len(old)} prompts, this file has {len(prompts)}"
        i = next(i for i, (a, b) in enumerate(zip(old, prompts)) if a != b)
        return f"prompt {i} was {old[i]!r}, here {prompts[i]!r}"
    if (index["images"] is None) != (images is None):
        return "with reference images, here without" if images is None else "without reference images, here with"
    if images is not None:
        for i, (p, h) in enumerate(zip(images, index["image_sha256"])):
            if sha256(p) != h:
                return f"image {i} was {index['images'][i]}, here {p} with other content"
    return None
