"""scripts/extract.py end to end: bad clips reported (exit 0), 1 rank == 2 ranks, resume is exact."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from dist import spawn
from test_data_dataset import GOOD, INDEX_SKIPS, READ_SKIPS, messy  # noqa: F401 - the messy dataset fixture

from hvfunc import io

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import extract  # noqa: E402


def _run(rank, world, data: str, out: str, task: str) -> None:
    extract.main(extract.ExtractArgs(data=Path(data), out=Path(out), task=task, models=extract.ModelArgs(
        preset="tiny"), device="cpu", batch_size=2))


def _files(out: Path) -> dict[str, dict]:
    return {p.name: io.load_safetensors(p) for p in sorted((out / "samples").glob("*.safetensors"))
            if not p.name.startswith(".")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.keys() == b[n].keys() and all(torch.equal(x[k], b[n][k]) for k in x)
                                        for n, x in a.items())


def test_bad_clips_reported_and_ranks_write_the_same_files(messy, tmp):  # noqa: F811
    spawn(_run, 1, str(messy), str(tmp / "one"), "t2v")
    spawn(_run, 2, str(messy), str(tmp / "two"), "t2v")
    one, two = _files(tmp / "one"), _files(tmp / "two")
    assert sorted(one) == sorted(g.replace(".mp4", ".safetensors") for g in GOOD)
    assert _same(one, two)
    report = json.loads((tmp / "one" / "report.json").read_text())
    expect = dict(INDEX_SKIPS)
    for k, v in READ_SKIPS.items():
        expect[k] = expect.get(k, 0) + v
    assert report["counts"] == expect and report["kept"] == 11
    assert json.loads((tmp / "two" / "report.json").read_text())["counts"] == expect
    index = [json.loads(x) for x in (tmp / "one" / "index.jsonl").read_text().splitlines()]
    assert [r["id"] for r in index] == [g[:-4] for g in sorted(GOOD)]
    assert all(r["latent_shape"][0] == 16 and r["latent_shape"][1] == 5 for r in index)  # 17 frames -> 5
    t = one["clip_0000.safetensors"]
    assert t["text_states"].shape == (256, 32) and t["text_mask"].shape == (256,) and t["text_states_2"].shape == (16,)
    assert (tmp / "one" / "uncond.safetensors").is_file()


def test_interrupted_extraction_resumes_without_redoing(messy, tmp):  # noqa: F811
    out = tmp / "run"
    spawn(_run, 1, str(messy), str(out), "i2v")
    full = _files(out)
    assert all("cond_latents" in t and t["cond_latents"].shape[1] == 1 for t in full.values())
    # as if killed: two clips never written, one temp file half-written, no index
    samples = sorted((out / "samples").glob("clip_*.safetensors"))
    for p in samples[:2]:
        p.unlink()
    (out / "samples" / ".clip_0005.tmp999.safetensors").write_bytes(b"partial")
    (out / "index.jsonl").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in samples[2:]}
    os.sync()
    spawn(_run, 1, str(messy), str(out), "i2v")
    assert {p.name: p.stat().st_mtime_ns for p in samples[2:]} == kept  # finished clips not redone
    assert _same(_files(out), full)
    assert len((out / "index.jsonl").read_text().splitlines()) == len(full)
    assert not list((out / "samples").glob(".*"))  # the stale temp file was cleaned up
