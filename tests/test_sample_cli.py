"""scripts/sample.py as a user runs it: mp4s and sidecars, reruns, user errors, ranks (cp and data
parallel), training checkpoints as weights. Tiny models on CPU; the diffusers parity of the same
script is tests/test_sample_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from reference import rel_err
from test_sample_e2e import write_models

from hvfunc import io

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(ranks)]
    return subprocess.run([*launch, "scripts/sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def weights(files: dict) -> list[str]:
    return ["--dit", str(files["dit"]), "--models.vae", str(files["vae"]), "--models.text-encoder",
            str(files["llm"]), "--models.text-encoder-2", str(files["clip"])]


def latents(out: Path) -> dict[str, torch.Tensor]:
    return {p.name: io.load_safetensors(p)["latents"] for p in sorted(out.glob("*.latents.safetensors"))}


def test_writes_mp4s_and_sidecars_and_skips_finished_videos(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red circle moves from left to right.\n\nA blue square falls.\n")
    out = tmp_path / "out"
    args = ("tiny", "--prompts-file", str(prompts), "--num-videos", "2", "--steps", "2", "--frames", "9",
            "--out", str(out), "--seed", "5")
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    mp4s = sorted(out.glob("*.mp4"))
    assert [p.name for p in mp4s] == ["000-seed5-a-red-circle-moves-from-left-to-right.mp4",
                                      "001-seed6-a-red-circle-moves-from-left-to-right.mp4",
                                      "002-seed5-a-blue-square-falls.mp4", "003-seed6-a-blue-square-falls.mp4"]
    for p in mp4s:
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            frames = sum(1 for _ in c.decode(s))
            assert (frames, s.height, s.width, s.average_rate) == (9, 64, 96, 24)
            assert s.codec_context.name in ("h264", "mpeg4") and s.format.name == "yuv420p"
        side = json.loads(p.with_suffix(".json").read_text())
        assert side["settings"]["seed"] == int(p.name.split("seed")[1].split("-")[0])
        assert side["random_weights"] and "noise" in r.stdout  # random tiny models say so
    before = {p: p.stat().st_mtime_ns for p in mp4s}
    again = cli(*args)
    assert again.returncode == 0 and "4 already" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in mp4s} == before  # nothing rewritten
    other = cli(*args[:-2], "--seed", "5", "--shift", "3.0")
    assert other.returncode == 2 and "exists with other settings" in other.stderr and "--overwrite" in other.stderr
    redo = cli(*args, "--overwrite")
    assert redo.returncode == 0 and all(p.stat().st_mtime_ns != before[p] for p in mp4s)


def _main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "scripts" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("args, message", [
    (("--height", "70"), "height 70 (need a multiple of 16: use 64 or 80)"),
    (("--frames", "18"), "18 frames (need 4k+1: use 17 or 21)"),
    (("--parallel.cp", "3"), "not divisible by --parallel.cp 3"),
    (("--prompt", " "), "prompt 0 is empty"),
    (("--dit", "/nonexistent/dit.pt"), "--dit /nonexistent/dit.pt does not exist"),
    (("--image", "x.png"), "is text-to-video"),
])
def test_user_errors_fail_before_any_model_loads(tmp_path, capsys, args, message):
    """In-process: the plan raises before a process group or a model exists (main exits 2)."""
    base = ["tiny", "--out", str(tmp_path / "out")] + ([] if "--prompt" in args else ["--prompt", "a cat"])
    with pytest.raises(SystemExit) as e:
        _main()([*base, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing was loaded or written


def test_user_error_in_a_real_process_is_one_line_exit_2(tmp_path):
    r = cli("tiny", "--prompt", "a cat", "--height", "70", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr


def test_i2v_and_real_preset_errors(tmp_path, capsys):
    main = _main()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for argv, message in ((["tiny-i2v", "--image", str(tmp_path / "missing.png")], "image not found"),
                          (["tiny-i2v", "--image", str(tmp_path / "bad.png")], "cannot read image"),
                          (["hunyuan-video-t2v"], "needs --dit")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--prompt", "a cat", "--out", str(tmp_path / "out")])
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("i2v", [False, True])
def test_cp2_equals_one_rank(tmp_path, i2v):
    from PIL import Image

    files = write_models(tmp_path, i2v=i2v)
    extra = ["--prompt", "A red circle moves.", "--steps", "3", "--frames", "9", "--save-latents", "--seed", "3"]
    extra += weights(files) + ["--height", "64", "--width", "48"]
    if i2v:
        Image.new("RGB", (48, 64), (200, 30, 30)).save(tmp_path / "ref.png")
        extra += ["--image", str(tmp_path / "ref.png"), "--cfg-scale", "2.0"]
    preset = "tiny-i2v" if i2v else "tiny"
    one = cli(preset, *extra, "--out", str(tmp_path / "one"))
    two = cli(preset, *extra, "--out", str(tmp_path / "cp2"), "--parallel.cp", "2", ranks=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    a, b = latents(tmp_path / "one"), latents(tmp_path / "cp2")
    assert list(a) == list(b) and len(a) == 1
    (k, x), y = next(iter(a.items())), next(iter(b.values()))
    print(f"cp 2 vs one rank: {rel_err(y, x):.2e} relative")  # docs/inference.md quotes it (pytest -s)
    assert rel_err(y, x) <= 1e-5, rel_err(y, x)
    assert rel_err(x, torch.zeros_like(x)) > 0  # non-degenerate weights: the DiT moved the latents
    assert json.loads((tmp_path / "cp2" / k.replace(".latents.safetensors", ".json")).read_text())["ranks"]["cp"] == 2


def test_two_ranks_without_cp_write_each_video_once(tmp_path):
    files = write_models(tmp_path, i2v=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one red circle\ntwo blue squares\nthree green triangles\n")
    extra = ["--prompts-file", str(prompts), "--steps", "2", "--frames", "5", "--save-latents", *weights(files),
             "--height", "32", "--width", "48"]
    one = cli("tiny", *extra, "--out", str(tmp_path / "one"))
    two = cli("tiny", *extra, "--out", str(tmp_path / "two"), ranks=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-1500:]
    assert two.stdout.count("wrote ") == 3  # each video written by exactly one rank
    a, b = latents(tmp_path / "one"), latents(tmp_path / "two")
    assert list(a) == list(b) and len(a) == 3
    assert all(torch.equal(a[k], b[k]) for k in a)


TRAIN = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from conftest import random_params
from hvfunc import io
from hvfunc.config import DIT_PRESETS
from parallel import checkpoint, optim, runtime
runtime.init("cpu")
params = {{k: v.requires_grad_(True) for k, v in random_params(DIT_PRESETS["tiny"], seed=0, scale=0.1).items()}}
opt = optim.make_optimizer(params, optim.OptimConfig())
checkpoint.save({ck!r}, 3, params, opt, {{"model": "tiny", "seed": 0}})
io.save_safetensors({{k: v.detach() for k, v in params.items()}}, {st!r})
"""


def test_training_checkpoint_as_weights(tmp_path):
    """A run's checkpoints/ folder and one step-* folder load like the same weights as safetensors."""
    files = write_models(tmp_path, i2v=False)
    ck, st = tmp_path / "run" / "checkpoints", tmp_path / "dit.safetensors"
    code = TRAIN.format(root=str(ROOT), tests=str(ROOT / "tests"), ck=str(ck), st=str(st))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=ENV, capture_output=True)
    extra = ["--prompt", "a red circle", "--steps", "2", "--frames", "5", "--save-latents", "--height", "32",
             "--width", "32", "--models.vae", str(files["vae"]), "--models.text-encoder", str(files["llm"]),
             "--models.text-encoder-2", str(files["clip"])]
    got = {}
    for name, dit in (("file", st), ("run", ck), ("step", ck / "step-00000003")):
        r = cli("tiny", *extra, "--dit", str(dit), "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-1500:]
        got[name] = next(iter(latents(tmp_path / name).values()))
    assert torch.equal(got["file"], got["run"]) and torch.equal(got["file"], got["step"])
    r = cli("tiny-i2v", *extra, "--dit", str(ck), "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2  # the image is missing: caught before the checkpoint is read


def test_lora_at_sampling_equals_the_merged_weights(tmp_path):
    """--lora FILE[:SCALE] (a musubi file, two halves stacked) samples exactly like the weights
    that `convert.py merge-lora` writes, and differs from the base."""
    from hvfunc import lora, lora_formats
    from hvfunc.config import DIT_PRESETS

    files = write_models(tmp_path, i2v=False)
    lo = lora.init_lora(DIT_PRESETS["tiny"], lora.LoraConfig(rank=4, alpha=2.0))
    g = torch.Generator().manual_seed(1)
    lo = lora.Lora({k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lo.tensors.items()}, lo.alpha)
    lora_formats.write(lo, tmp_path / "style.safetensors", "musubi")
    merged = tmp_path / "merged.pt"
    subprocess.run([sys.executable, "scripts/convert.py", "merge-lora", "--base", str(files["dit"]), "--lora",
                    str(tmp_path / "style.safetensors"), "--target", str(merged)], cwd=ROOT, check=True, env=ENV,
                   capture_output=True)
    extra = ["--prompt", "a red circle", "--steps", "2", "--frames", "5", "--save-latents", "--height", "32",
             "--width", "32", *weights(files)[2:]]
    style = str(tmp_path / "style.safetensors")
    runs = {"base": ["--dit", str(files["dit"])], "merged": ["--dit", str(merged)],
            "lora": ["--dit", str(files["dit"]), "--lora", f"{style}:0.5", "--lora", f"{style}:0.5"]}
    got = {}
    for name, args in runs.items():
        r = cli("tiny", *extra, *args, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-1500:]
        got[name] = next(iter(latents(tmp_path / name).values()))
    assert torch.equal(got["lora"], got["merged"])
    assert rel_err(got["lora"], got["base"]) > 1e-3
    side = json.loads(next((tmp_path / "lora").glob("*.json")).read_text())
    assert [s for _, s in side["settings"]["lora"]] == [0.5, 0.5] and "LoRA modules" in side["dit_source"]


def test_cp2_with_step_cache_takes_one_rank_decisions(tmp_path):
    """teacache on cp 2: the ranks hold different video tokens but agree on every skip (their
    distance sums are all-reduced), so pattern and latents are one rank's."""
    files = write_models(tmp_path, i2v=False)
    extra = ["--prompt", "A red circle moves.", "--steps", "8", "--frames", "9", "--save-latents", *weights(files),
             "--height", "64", "--width", "48", "--cache.kind", "teacache", "--cache.threshold", "0.3"]
    one = cli("tiny", *extra, "--out", str(tmp_path / "one"))
    two = cli("tiny", *extra, "--out", str(tmp_path / "cp2"), "--parallel.cp", "2", ranks=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    steps = [json.loads(next((tmp_path / d).glob("*.json")).read_text())["steps"] for d in ("one", "cp2")]
    assert steps[0] == steps[1] and 0 < steps[0]["skipped"] < 8, steps
    a, b = next(iter(latents(tmp_path / "one").values())), next(iter(latents(tmp_path / "cp2").values()))
    assert rel_err(b, a) <= 1e-5, rel_err(b, a)
