"""--log.tensorboard: the event files hold metrics.jsonl's records (read back with TensorBoard's own
EventAccumulator), a resumed run's redone steps replace the earlier ones, images round-trip, and a
missing tensorboard package is one error line at start."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dist import spawn
from test_trainer import _cfg, make_features

from parallel import tblog
from parallel.tblog import LogConfig
from parallel.trainer import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.compat.proto.event_pb2 import SessionLog  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run_then_resume(rank, world, cfg):
    """4 steps, then the step-4 checkpoint removed (as if killed before saving it) and the run
    rerun: it resumes at step 2 and redoes steps 3 and 4 (their seconds / throughput differ)."""
    train(cfg)
    shutil.rmtree(cfg.out / "checkpoints" / "step-00000004")
    train(cfg)


def _events(folder: Path) -> EventAccumulator:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def test_scalars_equal_metrics_jsonl_after_a_resume(tmp):
    feats = make_features(tmp / "feats")
    cfg = _cfg(feats, tmp / "run", log=LogConfig(tensorboard=True))
    spawn(_run_then_resume, 1, cfg)
    recs = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    first, second = sorted((tmp / "run" / "tensorboard").glob("events.out.tfevents.*"))  # one per run
    # the resumed run's file starts by purging steps >= 3 (SessionLog START at purge_step 3)
    starts = [e.step for e in EventFileLoader(str(second)).Load() if e.HasField("session_log")
              and e.session_log.status == SessionLog.START]
    assert starts == [3] and not any(e.HasField("session_log") for e in EventFileLoader(str(first)).Load())
    ea = _events(tmp / "run" / "tensorboard")
    keys = {k for k, v in recs[0].items() if k != "step" and isinstance(v, (int, float))}
    assert keys >= {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "skipped_steps",
                    "text_dropped", "image_dropped"}
    assert set(ea.Tags()["scalars"]) == keys
    for k in sorted(keys):
        got = [(e.step, e.value) for e in ea.Scalars(k)]  # each step once: the redone ones replace the first run's
        assert got == [(r["step"], float(np.float32(r[k]))) for r in recs], k  # TensorBoard scalars are float32


def test_images_round_trip(tmp):
    frame = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    tb = tblog.TensorBoard(tmp / "tb")
    tb.images(5, {"prompt-0": frame})
    with pytest.raises(ValueError, match=r"image 'x': expected \[H, W, 3\] uint8, got float32 \[6, 10, 3\]"):
        tb.images(5, {"x": frame.astype(np.float32)})
    tb.close()
    from PIL import Image

    (event,) = _events(tmp / "tb").Images("samples/prompt-0")
    assert event.step == 5 and (event.width, event.height) == (10, 6)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")), frame)


def test_missing_tensorboard_is_one_error_line(tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    tblog.check(LogConfig())  # off: nothing imported
    with pytest.raises(ValueError, match=tblog.MISSING):
        tblog.check(LogConfig(tensorboard=True))
    # the script: exit 2, one error line, before anything else is checked (the features do not exist)
    code = ("import runpy, sys; sys.modules['tensorboard'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path('scripts/train.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "scripts/train.py", "tiny", "--features", str(tmp / "nope"),
                        "--out", str(tmp / "t"), "--log.tensorboard"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and lines == [f"error: {tblog.MISSING}"], r.stderr[-2000:]
