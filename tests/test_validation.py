"""Sample videos while training (parallel.validation), I2V: mp4s and sidecars at exactly the
--validation.every steps, the loss trajectory unchanged, the videos' latents equal to scripts/sample.py
on the same checkpoint, cp 2 equal to one rank, the weights it samples with (EMA, LoRA merged), and the
errors when the prompts were not encoded. Tiny models on CPU."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from dist import spawn
from PIL import Image
from reference import rel_err
from test_sample_cli import _main as sample_main
from test_trainer import _cfg, make_features

from hvfunc import io, lora
from hvfunc.config import DIT_PRESETS
from hvfunc.data import extract as ex
from hvfunc.sample import Sampling
from parallel import train_loop, validation
from parallel.mesh import ParallelConfig
from parallel.tblog import LogConfig
from parallel.trainer import train
from parallel.validation import ValidationConfig

SIZE = {"height": 32, "width": 32, "frames": 5, "sampling": Sampling(steps=2), "seed": 3, "save_latents": True}


def _encode(root: Path, task: str, prompts: list[str]) -> tuple[Path, Path, Path | None]:
    """Features, tiny models and the prompts' encodings as extract.py --validation-prompts writes them;
    returns (features, models folder, images file)."""
    from PIL import Image

    feats = make_features(root / "feats", task=task)
    vae, llm, clip = ex.write_tiny_models(root / "models", task)
    (root / "p.txt").write_text("\n".join(prompts) + "\n")
    images = None
    if task == "i2v":
        for i in range(len(prompts)):
            Image.new("RGB", (40, 32), (200, 40 * i, 30)).save(root / f"ref{i}.png")
        images = root / "images.txt"
        images.write_text("".join(f"ref{i}.png\n" for i in range(len(prompts))))
    pr = validation.Prompts.read(root / "p.txt", images, i2v=task == "i2v", flags=("prompts", "images"))
    validation.encode(ex.load_models(vae, llm, clip, tiny=True).text, feats, pr, negative=None,
                      device=torch.device("cpu"), encoders={"dtype": "float32"})
    return feats, root / "models", images


def _latents(folder: Path) -> dict[str, torch.Tensor]:
    return {p.name: io.load_safetensors(p)["latents"] for p in sorted(folder.glob("*.latents.safetensors"))}


def _fast_mfu(monkeypatch=None) -> None:
    """The trainer's MFU denominator is a timed 2048^3 matmul (seconds on a busy CPU): not under test here."""
    from graphs import bench

    if monkeypatch is None:
        bench.matmul_peak = lambda *a, **k: 1e12
    else:
        monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: 1e12)


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory):
    """One I2V run with --validation.every 2 over 5 steps, the logger hook's view of its videos, and
    the same run without validation."""
    tmp = tmp_path_factory.mktemp("val")
    mp = pytest.MonkeyPatch()
    _fast_mfu(mp)
    feats, models, images = _encode(tmp, "i2v", ["A red circle moves.", "A blue square falls."])
    val = ValidationConfig(prompts=tmp / "p.txt", images=images, every=2, vae=models / "vae", **SIZE)
    tb = importlib.util.find_spec("tensorboard") is not None  # the first frames also go to TensorBoard
    cfg = _cfg(feats, tmp / "run", model="tiny-i2v", steps=5, keep_last=3, validation=val,
               log=LogConfig(tensorboard=tb))
    seen, real_log = {}, train_loop._log

    def log(run, *args, **kw):  # the logger hook: the step's videos are in the run state before _log
        if run.samples is not None and run.samples.step == run.step:
            seen[run.step] = [(p.name, f.copy()) for p, f in run.samples.videos]
        return real_log(run, *args, **kw)

    mp.setattr(train_loop, "_log", log)
    with_val = train(cfg)
    mp.setattr(train_loop, "_log", real_log)
    without = train(replace(cfg, out=tmp / "plain", checkpoint_every=100, validation=ValidationConfig(),
                            log=LogConfig()))
    yield {"tmp": tmp, "cfg": cfg, "models": models, "images": images, "losses": (with_val, without), "seen": seen}
    mp.undo()


def test_videos_at_every_n_steps_and_loss_unchanged(i2v_run):
    with_val, without = i2v_run["losses"]
    assert [r["loss"] for r in with_val] == [r["loss"] for r in without]  # no training randomness consumed
    run = i2v_run["tmp"] / "run"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002", "step-00000004"]
    names = ["000-seed3-a-red-circle-moves", "001-seed3-a-blue-square-falls"]
    for step in (2, 4):
        folder = run / "samples" / f"step-{step:08d}"
        assert sorted(p.name for p in folder.glob("*.mp4")) == [n + ".mp4" for n in names]
        side = json.loads((folder / f"{names[1]}.json").read_text())
        assert side["settings"]["dit"]["step"] == step and side["settings"]["prompt"] == "A blue square falls."
        assert side["settings"]["image"] == str(i2v_run["tmp"] / "ref1.png")
    seen = i2v_run["seen"]
    assert {s: [(n, f.shape, f.dtype) for n, f in v] for s, v in seen.items()} == \
        {s: [(n + ".mp4", (32, 32, 3), np.uint8) for n in names] for s in (2, 4)}  # first frames


def test_first_frames_reach_tensorboard(i2v_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(i2v_run["tmp"] / "run" / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    for name in ("000-seed3-a-red-circle-moves", "001-seed3-a-blue-square-falls"):
        events = ea.Images(f"samples/{name}")
        assert [e.step for e in events] == [2, 4]
        for e in events:  # PNG in the event file: lossless, so exactly the frame the hook saw
            want = dict(i2v_run["seen"][e.step])[name + ".mp4"]
            assert np.array_equal(np.asarray(Image.open(BytesIO(e.encoded_image_string)).convert("RGB")), want)


def test_videos_equal_sample_py_on_the_checkpoint(i2v_run):
    """scripts/sample.py on the step-2 checkpoint with the same models, prompts, images and settings
    (its own text stage): the same latents, bit for bit."""
    tmp, models = i2v_run["tmp"], i2v_run["models"]
    sample_main()(["tiny-i2v", "--dit", str(tmp / "run" / "checkpoints" / "step-00000002"), "--prompts-file",
                   str(tmp / "p.txt"), "--images-file", str(i2v_run["images"]), "--models.vae", str(models / "vae"),
                   "--models.text-encoder", str(models / "text_encoder_i2v"), "--models.text-encoder-2",
                   str(models / "text_encoder_2"), "--steps", "2", "--frames", "5", "--height", "32", "--width", "32",
                   "--seed", "3", "--save-latents", "--out", str(tmp / "sampled")])
    got, want = _latents(tmp / "run" / "samples" / "step-00000002"), _latents(tmp / "sampled")
    assert list(got) == list(want) and len(got) == 2
    assert all(torch.equal(got[k], want[k]) for k in got), [rel_err(got[k], want[k]) for k in got]
    later = _latents(tmp / "run" / "samples" / "step-00000004")
    assert all(rel_err(got[k], later[k]) > 1e-4 for k in got)  # the weights moved between validations


def _train(rank, world, cfg):
    _fast_mfu()
    train(cfg)


def test_cp2_validation_equals_one_rank(i2v_run):
    """Training and validation on cp 2 (2 gloo ranks sampling each video together): the step-2 video's
    latents equal the one-rank run's."""
    tmp = i2v_run["tmp"]
    spawn(_train, 2, replace(i2v_run["cfg"], out=tmp / "cp2", steps=2, checkpoint_every=100,
                             parallel=ParallelConfig(cp=2)))
    a, b = (_latents(tmp / d / "samples" / "step-00000002") for d in ("run", "cp2"))
    assert list(a) == list(b) and len(a) == 2
    worst = max(rel_err(b[k], a[k]) for k in a)
    print(f"cp 2 vs one rank (2 training steps, then sampling): {worst:.2e} relative")  # docs/training.md
    assert worst <= 1e-5  # measured 4.2e-8
    side = json.loads((tmp / "cp2" / "samples" / "step-00000002" / "000-seed3-a-red-circle-moves.json").read_text())
    assert side["ranks"] == {"world": 2, "cp": 2}


def test_missing_or_other_encodings_fail_at_start(tmp, monkeypatch):
    _fast_mfu(monkeypatch)
    feats = make_features(tmp / "feats")
    (tmp / "p.txt").write_text("a cat\n")
    (tmp / "vae").mkdir()
    val = ValidationConfig(prompts=tmp / "p.txt", every=1, vae=tmp / "vae", height=32, width=32, frames=5)
    with pytest.raises(ValueError, match=r"holds no encoded validation prompts: run scripts/extract.py "
                                         r"--validation-prompts .*p\.txt"):
        train(_cfg(feats, tmp / "a", validation=val))
    from hvfunc.data import validation as vdata
    from hvfunc.pipeline import Conditioning

    cond = {"text_states": torch.zeros(1, 4, 32), "text_mask": torch.ones(1, 4), "text_states_2": torch.zeros(1, 16)}
    vdata.write(feats, ["a dog"], None, [Conditioning(cond, None)], negative=None, sources={"prompts": "old.txt"},
                encoders={})
    with pytest.raises(ValueError, match=r"made from old.txt \(prompt 0 was 'a dog', here 'a cat'\): run "
                                         r"scripts/extract.py --validation-prompts"):
        train(_cfg(feats, tmp / "b", validation=val))
    with pytest.raises(ValueError, match="--validation.prompts FILE and --validation.every N"):
        train(_cfg(feats, tmp / "c", validation=replace(val, every=0)))
    assert not any((tmp / d).exists() for d in "abc")  # nothing ran


def test_weights_are_the_ema_with_lora_merged():
    """validation.weights against W + alpha / r * B @ A by hand, the adapters taken from the EMA."""
    cfg = DIT_PRESETS["tiny"]
    from conftest import random_params

    base = random_params(cfg, seed=0)
    adapters = lora.LoraConfig(rank=2, alpha=3.0, targets=("img_mlp.fc1",))
    g = torch.Generator().manual_seed(1)
    ad = {k: torch.randn(s.shape, generator=g) for k, s in lora.lora_spec(cfg, adapters).items()}
    ema = {k: v + 0.5 for k, v in ad.items()}
    got = validation.weights(base | ad, ema, adapters, torch.float32)
    assert set(got) == set(base)  # no adapter leaf left: merged
    for k, w in base.items():
        stem = k.removesuffix(".weight")
        want = w + 1.5 * ema[f"{stem}.lora_B"] @ ema[f"{stem}.lora_A"] if f"{stem}.lora_A" in ema else w
        assert torch.allclose(got[k], want, rtol=1e-6, atol=1e-6), k
    assert sum(f"{k.removesuffix('.weight')}.lora_A" in ema for k in base) == cfg.mm_double_blocks_depth
    full_ema = {k: v * 2 for k, v in base.items()}  # full finetuning: the EMA replaces every leaf
    assert all(torch.equal(got2, full_ema[k]) for k, got2 in validation.weights(base, full_ema, None,
                                                                               torch.float32).items())
