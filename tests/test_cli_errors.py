"""Every script's user errors: exit code 2, one `error: ...` line naming the bad value, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    (["scripts/extract.py", "--data", "/nope/data.txt", "--out", "{tmp}/f"], "data list not found: /nope/data.txt"),
    (["scripts/extract.py", "--data", "{tmp}/data.txt", "--out", "{tmp}/f", "--data-preset", "huge"],
     "unknown data preset 'huge'"),
    (["scripts/extract.py", "--data", "{tmp}/data.txt", "--out", "{tmp}/f", "--validation-prompts", "/nope/p.txt"],
     "--validation-prompts not found: /nope/p.txt"),
    (["scripts/make_dataset.py", "--out", "{tmp}/d", "--num-clips", "1", "--num-folders", "3"],
     "num_folders (3) <= num_clips (1)"),
    (["scripts/plan_memory.py", "--model", "nope"], "unknown DiT preset 'nope'"),
    (["scripts/plan_memory.py", "fit", "--shape", "512x512x32"], "frames must be 4k + 1"),
    (["scripts/train.py", "tiny", "--features", "/nope/feats", "--out", "{tmp}/t"], "/nope/feats/index.jsonl"),
    (["scripts/train.py", "tiny", "--features", "{tmp}", "--out", "{tmp}/t", "--parallel.tp", "3"],
     "heads_num 4 is not divisible by tp*cp = 3*1"),
    (["scripts/train.py", "tiny", "--features", "{tmp}", "--out", "{tmp}/t", "--text-dropout", "2"],
     "text_dropout must be in [0, 1], got 2.0"),
    (["scripts/sample.py", "tiny", "--prompt", "a cat", "--parallel.cp", "3", "--out", "{tmp}/s"],
     "not divisible by --parallel.cp 3"),
    (["scripts/sample.py", "tiny", "--prompt", "a cat", "--frames", "18", "--out", "{tmp}/s"], "use 17 or 21"),
    (["scripts/convert.py", "dit", "--preset", "tiny", "--source", "/nope/dit.pt", "--target", "{tmp}/x"],
     "/nope/dit.pt"),
    (["scripts/train_vae.py", "--data", "/nope/data.txt", "--out", "{tmp}/v"], "/nope/data.txt"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[f"{c[0][0].split('/')[1]}-{i}" for i, c in enumerate(CASES)])
def test_user_error_is_one_line_exit_2(tmp_path, argv, message):
    (tmp_path / "data.txt").write_text(f"{tmp_path},{tmp_path}/data.json\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and sum(x.startswith("error:") for x in lines) == 1
