"""scripts/bench.py pipeline: end-to-end T2V rows for ours and diffusers' HunyuanVideoPipeline
on the same weights, with equal decoded videos (fp32, smallest shapes)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "32", "--heads", "2", "--double", "1", "--single", "1", "--text-width", "32", "--frames", "5",
         "--height", "32", "--width", "32", "--steps", "2", "--repeats", "1"]


def _bench_cli():
    spec = importlib.util.spec_from_file_location("bench_cli", ROOT / "scripts/bench.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_pipeline_bench_rows_and_equal_videos(tmp, capsys):
    out = tmp / "pipeline.json"
    rows = _bench_cli().main(["pipeline", *SMALL, "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["impl"] for r in saved["rows"]] == [r["impl"] for r in rows] == ["hvfunc", "diffusers"]
    assert saved["config"]["steps"] == 2 and saved["config"]["text_width"] == 32 and saved["machine"]
    ours, ref = rows
    # our decoded video equals diffusers' pipeline's (same weights, prompt, seed, steps), fp32
    assert ours["video_rel_err"] <= 1e-4, ours["video_rel_err"]
    assert ref["video_rel_err"] == 0.0  # the reference against itself
    for r in rows:
        stages = [r[f"{s}_s"] for s in ("text", "denoise", "decode")]
        assert all(s > 0 for s in stages)
        assert r["total_s"] == pytest.approx(sum(stages), rel=1e-9)  # one run: the total is its stages' sum
        assert r["peak_mem_mb"] == max(r[f"{s}_mem_mb"] for s in ("text", "denoise", "decode")) > 0
    assert ours["ratio"] == pytest.approx(ours["total_s"] / ref["total_s"])
    table = capsys.readouterr().out
    assert "| bench | impl | text_s | denoise_s | decode_s | total_s | ratio | peak_mem_mb | video_rel_err |" in table
    assert "| t2v 5x32x32, 2 steps | hvfunc |" in table and "| t2v 5x32x32, 2 steps | diffusers |" in table


def test_pipeline_bench_rejects_a_bad_text_width():
    from graphs.bench_pipeline import PipelineBench

    with pytest.raises(ValueError, match="--text-width 30 must be a multiple of 4"):
        PipelineBench(text_width=30)
