"""scripts/extract.py end to end: bad clips reported (exit 0), 1 rank == 2 ranks, resume is exact."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from dist import spawn
from test_data_dataset import GOOD, INDEX_SKIPS, READ_SKIPS, messy  # noqa: F401 - the messy dataset fixture

from hvfunc import io
from hvfunc.data import extract as ex
from hvfunc.data.features import KEYS, NOIMG_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import extract  # noqa: E402


def _run(rank, world, data: str, out: str, task: str, **kw) -> None:
    extract.main(extract.ExtractArgs(data=Path(data), out=Path(out), task=task, models=extract.ModelArgs(
        preset="tiny"), device="cpu", batch_size=2, **kw))


def _files(out: Path) -> dict[str, dict]:
    return {p.name: io.load_safetensors(p) for p in sorted((out / "samples").glob("*.safetensors"))
            if not p.name.startswith(".")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.keys() == b[n].keys() and all(torch.equal(x[k], b[n][k]) for k in x)
                                        for n, x in a.items())


def test_bad_clips_reported_and_ranks_write_the_same_files(messy, tmp):  # noqa: F811
    spawn(_run, 1, str(messy), str(tmp / "one"), "t2v")
    spawn(functools.partial(_run, compile="aot_eager"), 2, str(messy), str(tmp / "two"), "t2v")  # --compile too
    one, two = _files(tmp / "one"), _files(tmp / "two")
    assert sorted(one) == sorted(g.replace(".mp4", ".safetensors") for g in GOOD)
    assert one.keys() == two.keys() and all(a.keys() == two[n].keys() for n, a in one.items())
    for n, a in one.items():  # compiled convs are F.conv3d, eager ones oneDNN: fp32 rounding apart
        assert all(torch.allclose(a[k].float(), two[n][k].float(), rtol=1e-4, atol=1e-5) for k in a), n
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
    assert all(set(x) == set(KEYS["t2v"]) for x in one.values())  # T2V: no black-image features
    assert all(r["keys"] == sorted(KEYS["t2v"]) for r in index)
    with pytest.raises(ValueError, match="--image-dropout-features needs --task i2v"):  # before any work
        _run(0, 1, str(messy), str(tmp / "forced"), "t2v", image_dropout_features=True)
    assert not (tmp / "forced").exists()


def _check_noimg(out: Path, files: dict[str, dict]) -> float:
    """Stored black-image states == encode_prompts(caption, black image of the clip's size) on the
    models the run used; they differ from the real-image states. Returns the largest difference
    relative to the states' scale."""
    from PIL import Image

    from hvfunc.text import black_images, encode_prompts

    m = ex.load_models(out / "models" / "vae", out / "models" / "text_encoder_i2v", out / "models" / "text_encoder_2",
                       tiny=True)
    worst = 0.0
    for r in (json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()):
        t = files[Path(r["file"]).name]
        assert set(NOIMG_KEYS) <= set(r["keys"])
        image = Image.new("RGB", (r["width"], r["height"]), (200, 40, 90))
        ref = encode_prompts(m.text, [r["caption"]], images=black_images([image]), device="cpu", video=True)
        diff = float((t["text_states_noimg"] - ref.text_states[0]).abs().max())
        worst = max(worst, diff / float(ref.text_states[0].abs().max()))  # batch of 2 vs 1: fp32 rounding
        assert torch.equal(t["text_mask_noimg"], ref.text_mask[0]) and torch.equal(t["text_mask_noimg"], t["text_mask"])
        torch.testing.assert_close(t["text_states_2"], ref.text_states_2[0])  # CLIP ignores the image
        assert float((t["text_states_noimg"] - t["text_states"]).abs().max()) > 1e-2  # the image matters
    return worst


def _strip_noimg(path: Path) -> None:
    """Rewrite a sample file as extraction wrote it before black-image features existed."""
    t = {k: v for k, v in io.load_safetensors(path).items() if k not in NOIMG_KEYS}
    rec = json.loads(io.safetensors_metadata(path)["record"])
    del rec["keys"]
    io.save_safetensors(t, path, metadata={"record": json.dumps(rec)})


def test_interrupted_extraction_resumes_without_redoing(messy, tmp, capfd):  # noqa: F811
    from hvfunc.config import data_preset
    from hvfunc.data.dataset import build_dataset

    out = tmp / "run"
    spawn(_run, 1, str(messy), str(out), "i2v")
    full = _files(out)
    assert all("cond_latents" in t and t["cond_latents"].shape[1] == 1 for t in full.values())
    assert _check_noimg(out, full) <= 1e-6  # measured 3.3e-7
    # as if killed: two clips never written, one temp file half-written, no index; and two clips
    # written before black-image features existed
    samples = sorted((out / "samples").glob("clip_*.safetensors"))
    for p in samples[:2]:
        p.unlink()
    for p in samples[2:4]:
        _strip_noimg(p)
    (out / "samples" / ".clip_0005.tmp999.safetensors").write_bytes(b"partial")
    (out / "index.jsonl").unlink()
    ds = build_dataset(messy, data_preset("tiny"), seed=0)
    todo, redo = ex.pending(out, ds, ex.plan_batches(ds, 2), noimg=True)
    assert sorted(redo) == [p.stem for p in samples[2:4]]
    redone = {ex.clip_id(ds, i) + ".safetensors" for b in todo for i in b}
    assert {p.name for p in samples[:4]} <= redone
    kept = {p.name: p.stat().st_mtime_ns for p in samples if p.name not in redone}
    assert kept
    os.sync()
    capfd.readouterr()
    spawn(_run, 1, str(messy), str(out), "i2v")
    log = capfd.readouterr().out
    assert "re-extracting 2 clips whose files lack ['text_states_noimg', 'text_mask_noimg']" in log
    assert {p.name: p.stat().st_mtime_ns for p in samples if p.name in kept} == kept  # finished clips not redone
    assert _same(_files(out), full)
    assert len((out / "index.jsonl").read_text().splitlines()) == len(full)
    assert not list((out / "samples").glob(".*"))  # the stale temp file was cleaned up
