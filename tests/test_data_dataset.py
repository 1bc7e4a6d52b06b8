"""The raw-video dataset end to end on real mp4 files: good clips load, every kind of bad input
is skipped with its reason and counted; decord and PyAV agree; the synthetic generator."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hvfunc.config import data_preset
from hvfunc.data import synthetic
from hvfunc.data.buckets import BucketSampler
from hvfunc.data.dataset import VideoDataset, build_dataset, collate
from hvfunc.data.manifest import parse_item, read_manifest
from hvfunc.data.report import SkipReport
from hvfunc.data.video import ClipError, decode, select_frames
from hvfunc.media import write_mp4

CFG = data_preset("tiny")
GOOD = ["clip_0000.mp4", "clip_0001.mp4", "clip_0002.mp4", "clip_0003.mp4", "clip_0004.mp4", "clip_0005.mp4"]
INDEX_SKIPS = {"missing_dataset": 1, "bad_list_line": 1, "bad_json": 1, "bad_fields": 4, "unsupported_type": 1,
               "missing_file": 1, "empty_file": 1, "duplicate_name": 1, "too_few_frames": 1, "too_small": 1,
               "bad_aspect": 1}
# garbage, truncated and lonely do not decode; liar has fewer frames and turned another size than data.json says
READ_SKIPS = {"decode_error": 3, "too_few_frames": 1, "metadata_mismatch": 1}


def _item(path, h=64, w=96, n=41, fps=24, **kw):
    return {"path": path, "cap": f"caption of {path}", "num_frames": n, "fps": fps,
            "resolution": {"height": h, "width": w}} | kw


def _real(folder, name, h, w, n, fps=24):
    spec = synthetic.ClipSpec(height=h, width=w, fps=fps, num_frames=n,
                              movers=(synthetic.Mover("circle", "red", "left to right", 4, 0.5),))
    write_mp4(folder / "videos" / name, synthetic.render(spec), fps)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """6 good synthetic clips in two folders, beside every kind of bad input."""
    root = tmp_path_factory.mktemp("messy")
    data_txt = synthetic.make_dataset(root, num_clips=6, num_folders=2, seed=0)
    ds0, ds1 = root / "ds0", root / "ds1"
    v0 = ds0 / "videos"
    (v0 / "empty.mp4").write_bytes(b"")
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (v0 / "garbage.mp4").write_bytes(bytes(noise.tolist()))
    (v0 / "lonely.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 500)
    good = (v0 / "clip_0000.mp4").read_bytes()
    (v0 / "truncated.mp4").write_bytes(good[: len(good) // 2])
    _real(ds0, "few.mp4", 64, 96, 5)         # 5 frames < min_frames 9
    _real(ds0, "small.mp4", 16, 24, 41)      # 384 pixels < 6144 / 4
    _real(ds0, "wide.mp4", 32, 128, 41)      # h/w 0.25 < 1/2
    _real(ds0, "liar.mp4", 64, 96, 12)       # data.json claims 41 frames
    _real(ds0, "turned.mp4", 64, 96, 41)     # data.json claims 96x64
    items = json.loads((ds0 / "data.json").read_text()) + [
        _item("videos/nope.mp4"), _item("videos/empty.mp4"), _item("videos/few.mp4", n=5),
        _item("videos/small.mp4", 16, 24), _item("videos/wide.mp4", 32, 128),
        {k: v for k, v in _item("videos/nocap.mp4").items() if k != "cap"}, _item("videos/badnum.mp4", n="41"),
        _item("videos/badres.mp4") | {"resolution": [64, 96]}, "just a string", _item("videos/anim.gif"),
        _item("videos/garbage.mp4"), _item("videos/truncated.mp4"), _item("videos/liar.mp4"),
        _item("videos/turned.mp4", 96, 64), _item("videos/lonely.mp4", 32, 64)]  # lonely: its own bucket
    (ds0 / "data.json").write_text(json.dumps(items))
    shutil.copy(v0 / "clip_0000.mp4", ds1 / "videos" / "clip_0000.mp4")
    items1 = json.loads((ds1 / "data.json").read_text()) + [_item("videos/clip_0000.mp4")]
    (ds1 / "data.json").write_text(json.dumps(items1))
    (root / "ds2").mkdir()
    (root / "ds2" / "data.json").write_text("{not json")
    with open(data_txt, "a") as f:
        f.write("/nonexistent/folder,/nonexistent/data.json\nonly-one-field\n\nds2,ds2/data.json\n")
    return data_txt


def test_index_time_skips_each_with_its_reason(messy):
    ds = build_dataset(messy, CFG)
    assert ds.report.counts() == INDEX_SKIPS
    assert ds.report.listed == 22 and len(ds) == 6 + 5
    by_name = {s.path.rsplit("/", 1)[-1]: s.reason for s in ds.report.skips}
    assert by_name["nope.mp4"] == "missing_file" and by_name["empty.mp4"] == "empty_file"
    assert by_name["few.mp4"] == "too_few_frames" and by_name["small.mp4"] == "too_small"
    assert by_name["wide.mp4"] == "bad_aspect" and by_name["anim.gif"] == "unsupported_type"
    assert by_name["clip_0000.mp4"] == "duplicate_name"
    dup = next(s for s in ds.report.skips if s.reason == "duplicate_name")
    assert "/ds1/" in dup.path and "/ds0/" in dup.detail  # the first folder's clip is kept
    fields = " ".join(s.detail for s in ds.report.skips if s.reason == "bad_fields")
    assert all(w in fields for w in ("cap=None", "num_frames='41'", "resolution=[64, 96]", "item is a str"))
    assert {e.name for e in ds.entries} == set(GOOD) | {"garbage.mp4", "truncated.mp4", "liar.mp4", "turned.mp4",
                                                         "lonely.mp4"}


def test_an_epoch_loads_good_clips_and_reports_bad_ones_from_workers(messy, tmp_path):
    ds = build_dataset(messy, CFG, seed=1)
    sampler = BucketSampler(ds.buckets, batch_size=2, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    loaded, main = set(), SkipReport()
    for batch in loader:
        main.extend(batch["skipped"])
        assert batch["video"].shape == (2, 3, *batch["bucket"])
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1 and batch["video"].std() > 0.05
        for path, cap, meta in zip(batch["path"], batch["caption"], batch["meta"]):
            loaded.add(path.rsplit("/", 1)[-1])
            assert cap == meta["cap"] and "shapes" in meta  # extra data.json fields are kept
    assert loaded == set(GOOD)
    assert main.counts() == READ_SKIPS
    assert {s.stage for s in main.skips} == {"read"}
    ds.report.extend(main.skips)
    expected = dict(INDEX_SKIPS)
    for k, n in READ_SKIPS.items():
        expected[k] = expected.get(k, 0) + n
    assert ds.report.counts() == expected
    ds.report.write(tmp_path / "report.json", kept=len(ds))
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["counts"] == expected and written["skipped"] == sum(expected.values())
    text = ds.summary()
    assert all(reason in text for reason in expected) and "11 kept" in text


def test_unreadable_bucket_hands_over_and_all_bad_is_fatal(messy):
    ds = build_dataset(messy, CFG)
    lonely = next(i for i, e in enumerate(ds.entries) if e.name == "lonely.mp4")
    sample = ds[lonely]
    assert sample["bucket"] != ds.keys[lonely] and sample["path"].endswith(tuple(GOOD))
    assert [s.reason for s in sample["skipped"]] == ["decode_error"]
    bad = [i for i, e in enumerate(ds.entries) if e.name not in GOOD]
    only_bad = VideoDataset([ds.entries[i] for i in bad], [ds.keys[i] for i in bad], CFG)
    with pytest.raises(RuntimeError, match="no clip of the dataset can be read"):
        only_bad[0]


def test_empty_result_and_missing_list_are_fatal(tmp_path):
    with pytest.raises(FileNotFoundError, match="data list not found"):
        build_dataset(tmp_path / "nope.txt", CFG)
    (tmp_path / "data.txt").write_text("a,b\n")
    with pytest.raises(ValueError, match="(?s)no usable clip.*missing_dataset"):
        build_dataset(tmp_path / "data.txt", CFG)


def test_optional_fields_and_relative_paths(tmp_path):
    e = parse_item({"path": "v/a.mp4", "cap": ["one", "two"], "duration": 2.5, "fps": 30,
                    "resolution": {"height": 8, "width": 8}, "cut": [12, 99], "aes": 5.1}, tmp_path, "x#0")
    assert (e.num_frames, e.start_frame, e.caption, e.meta["aes"]) == (75, 12, ("one", "two"), 5.1)
    data_txt = synthetic.make_dataset(tmp_path / "ds", num_clips=1)
    (tmp_path / "ds" / "rel.txt").write_text("ds0,ds0/data.json\n")  # relative to the list's folder
    assert [x.name for x in read_manifest(tmp_path / "ds" / "rel.txt")[0]] == ["clip_0000.mp4"]
    assert read_manifest(data_txt)[0] == read_manifest(tmp_path / "ds" / "rel.txt")[0]


def test_decord_and_pyav_decode_the_same_frames(messy):
    pytest.importorskip("decord")
    ds = build_dataset(messy, CFG)
    worst = 0
    for i, e in enumerate(ds.entries):
        if e.name not in GOOD:
            continue
        windows = [select_frames(e.num_frames, e.fps, length=ds.keys[i][0], train_fps=CFG.train_fps,
                                 generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
        # random windows, and the last 10 frames: past the second keyframe (one a second), so PyAV seeks
        for frames in windows + [list(range(e.num_frames - 10, e.num_frames))]:
            a, b = decode(e.path, frames, backend="decord"), decode(e.path, frames, backend="pyav")
            assert a.shape == b.shape == (len(frames), e.height, e.width, 3)
            worst = max(worst, int((a.int() - b.int()).abs().max()))
    assert worst <= 2, worst  # same ffmpeg decoder; colour conversion may round differently
    for name, reason in (("garbage.mp4", "decode_error"), ("liar.mp4", "too_few_frames")):
        path = next(e.path for e in ds.entries if e.name == name)
        for backend in ("decord", "pyav"):
            with pytest.raises(ClipError) as err:
                decode(path, list(range(0, 17)), backend=backend)
            assert err.value.reason == reason, (backend, err.value)
    with pytest.raises(ValueError, match="unknown video backend"):
        decode(path, [0], backend="opencv")


def test_synthetic_is_deterministic_and_captions_describe_the_motion(tmp_path):
    a = synthetic.make_dataset(tmp_path / "a", num_clips=5, seed=3)
    b = synthetic.make_dataset(tmp_path / "b", num_clips=5, seed=3)
    c = synthetic.make_dataset(tmp_path / "c", num_clips=5, seed=4)
    ja, jb, jc = (json.loads((p.parent / "ds0" / "data.json").read_text()) for p in (a, b, c))
    assert ja == jb and ja != jc
    assert {(x["fps"], x["resolution"]["height"], x["resolution"]["width"], x["num_frames"]) for x in ja} == \
        {(f, h, w, n) for h, w, f, n in synthetic.FORMATS}
    for item in ja:
        video = decode(a.parent / "ds0" / item["path"], list(range(item["num_frames"])), backend="pyav").int()
        for m in item["shapes"]:
            assert f"{m['colour']} {m['shape']} moves from {m['direction']}" in item["cap"]
            near = (video - torch.tensor(synthetic.COLOURS[m["colour"]])).abs().max(-1).values < 60  # [T, H, W]
            assert near[0].sum() > 4 and near[-1].sum() > 4
            first, last = (torch.nonzero(near[t]).float().mean(0) for t in (0, -1))  # (y, x) centroids
            dy, dx = (last - first).tolist()
            want = synthetic.DIRECTIONS[m["direction"]]
            assert np.sign(round(dx / 8)) == want[0] and np.sign(round(dy / 8)) == want[1], (item["cap"], dx, dy)


def test_make_dataset_cli(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "make_dataset.py"
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--num-clips", "3"],
                         capture_output=True, text=True, check=True).stdout
    assert "3 clips listed, 3 kept, 0 skipped" in out and (tmp_path / "data.txt").is_file()
    assert len(json.loads((tmp_path / "ds0" / "data.json").read_text())) == 3
