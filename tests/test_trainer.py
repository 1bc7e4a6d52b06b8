"""The training loop: resume is exact, checkpoints reshard, bad steps are skipped and counted."""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from dist import spawn
from torch.multiprocessing import ProcessExitedException

from graphs.blocks import Compile
from graphs.recompute import Recompute
from hvfunc import io
from hvfunc.config import DIT_PRESETS
from hvfunc.data.features import build_index, write_sample
from hvfunc.dit_spec import dit_spec
from parallel import checkpoint
from parallel.mesh import ParallelConfig
from parallel.optim import OptimConfig
from parallel.trainer import TrainConfig, train


def make_features(root: Path, *, n: int = 6, task: str = "t2v", nan_at: int | None = None,
                  noimg: str | None = None, uncond: bool = False) -> Path:
    """A feature folder in the extract.py format: two latent shapes, unequal text lengths.
    noimg (I2V): "random" black-image states, or "copy" of the real ones; uncond: write uncond.safetensors."""
    cfg = DIT_PRESETS["tiny"]
    g, g_noimg = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)  # noimg: same other tensors
    for i in range(n):
        T = 2 if i % 2 else 3
        lat = torch.randn(cfg.in_channels, T, 8, 8, generator=g)
        if i == nan_at:
            lat[0, 0, 0, 0] = float("nan")
        t = {"latents": lat, "text_states": torch.randn(12, cfg.text_states_dim, generator=g),
             "text_mask": (torch.arange(12) < 4 + i).long(), "text_states_2": torch.randn(cfg.text_states_dim_2, generator=g)}
        if task == "i2v":
            t["cond_latents"] = torch.randn(cfg.in_channels, 1, 8, 8, generator=g)
        if noimg:
            rnd = noimg == "random"
            t |= {"text_states_noimg": torch.randn(12, cfg.text_states_dim, generator=g_noimg) if rnd
                  else t["text_states"].clone(),
                  "text_mask_noimg": (torch.arange(12) < 3 + i).long() if rnd else t["text_mask"].clone()}
        write_sample(root, {"id": f"s{i:03d}", "caption": f"clip {i}", "task": task}, t)
    if uncond:
        g = torch.Generator().manual_seed(2)
        io.save_safetensors({"text_states": torch.randn(12, cfg.text_states_dim, generator=g),
                             "text_mask": (torch.arange(12) < 2).long(),
                             "text_states_2": torch.randn(cfg.text_states_dim_2, generator=g)},
                            root / "uncond.safetensors")
    build_index(root)
    return root


def _cfg(features: Path, out: Path, **kw) -> TrainConfig:
    base = dict(features=features, out=out, model="tiny", steps=4, batch_size=1, dtype="fp32", device="cpu",
                checkpoint_every=2, optim=OptimConfig(lr=1e-3, warmup_steps=0))
    return TrainConfig(**(base | kw))


def _run(rank, world, cfgs, out):
    results = []
    for c in cfgs:
        records = train(c)
        results.append([r["loss"] for r in records])
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(results, f)


def _spawn_train(world: int, cfgs: list[TrainConfig], tmp: Path) -> list[list[float]]:
    spawn(_run, world, cfgs, str(tmp / "res.pkl"))
    with open(tmp / "res.pkl", "rb") as f:
        return pickle.load(f)


def _final_params(run: Path) -> dict:
    shapes = {k: s.shape for k, s in dit_spec(DIT_PRESETS["tiny"]).items()}
    return checkpoint.load_params_single_process(checkpoint.latest(run / "checkpoints"), shapes)


def _killed_while_saving(rank, world, cfg, at_step):
    """train(cfg), killed (os._exit, no clean-up) once DCP has written checkpoint at_step's files."""
    import os

    real = checkpoint.dcp.save

    def save(state, *, checkpoint_id):
        real(state, checkpoint_id=checkpoint_id)
        if checkpoint_id.endswith(f".step-{at_step:08d}.partial"):
            os._exit(137)

    checkpoint.dcp.save = save
    train(cfg)


def test_resume_continues_the_same_trajectory(tmp):
    """4 uninterrupted steps == 4 steps killed while saving step 4 (after a complete save at
    step 2), then resumed: the partial checkpoint is ignored, steps 3-4 redone bit-identically."""
    feats = make_features(tmp / "feats")
    (a,) = _spawn_train(1, [_cfg(feats, tmp / "a")], tmp)
    with pytest.raises(ProcessExitedException, match="exit code 137"):
        spawn(_killed_while_saving, 1, _cfg(feats, tmp / "b"), 4)
    ck = tmp / "b" / "checkpoints"
    assert (ck / ".step-00000004.partial").is_dir() and checkpoint.latest(ck) == ck / "step-00000002"
    (b2,) = _spawn_train(1, [_cfg(feats, tmp / "b")], tmp)
    assert len(a) == 4 and b2 == a[2:]  # bit-identical losses after a resume
    pa, pb = _final_params(tmp / "a"), _final_params(tmp / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    recs = [json.loads(x) for x in (tmp / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [json.loads(x)["loss"] for x in (tmp / "b" / "metrics.jsonl").read_text().splitlines()] == a
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s", "mfu", "peak_mem_gb"} <= set(recs[0])
    assert sorted(p.name for p in (tmp / "a" / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]


def test_checkpoint_reshards_across_meshes(tmp):
    """Save at dp-shard 2 x tp 2 (step 2); resume at one process and at cp 2: step 3 is the same.
    The cp 2 run also recomputes (full / selective with offload, compiled blocks): that changes
    memory, not results."""
    import shutil

    feats = make_features(tmp / "feats")
    ref = _spawn_train(4, [_cfg(feats, tmp / "ref", steps=2, parallel=ParallelConfig(dp_shard=2, tp=2),
                                batch_size=2),
                           _cfg(feats, tmp / "ref", steps=3, parallel=ParallelConfig(dp_shard=2, tp=2),
                                batch_size=2)], tmp)
    ref_params = _final_params(tmp / "ref")  # after step 3
    shutil.rmtree(tmp / "ref" / "checkpoints" / "step-00000003")
    (tmp / "ref" / "checkpoints" / "latest").unlink()
    for world, par in ((1, ParallelConfig()), (2, ParallelConfig(dp_shard=1, cp=2))):
        run = tmp / f"y{world}"
        shutil.copytree(tmp / "ref" / "checkpoints", run / "checkpoints")
        rc = Recompute(double_full=1, selective=True, offload=True) if world == 2 else Recompute()
        cc = Compile(backend="aot_eager") if world == 2 else Compile()  # offload_saved around compiled blocks
        (step3,) = _spawn_train(world, [_cfg(feats, run, steps=3, parallel=par, batch_size=4, recompute=rc,
                                             compile=cc)], tmp)
        assert step3 == pytest.approx(ref[1], rel=1e-5)  # the global batch (4) is the same: same data
        a, b = _final_params(run), ref_params
        for k in a:
            assert float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) <= 1e-5, k


def test_non_finite_steps_are_skipped_then_stop(tmp):
    feats = make_features(tmp / "feats", n=2, nan_at=0)
    (losses,) = _spawn_train(1, [_cfg(feats, tmp / "ok", steps=4, max_bad_steps=5)], tmp)
    recs = [json.loads(x) for x in (tmp / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped_steps"] == sum(1 for v in losses if v != v) > 0
    with pytest.raises(RuntimeError, match="1 consecutive steps had a non-finite loss"):
        _raise_from_train(_cfg(feats, tmp / "stop", steps=6, max_bad_steps=0), tmp)
    assert checkpoint.latest(tmp / "stop" / "checkpoints") is not None


def _loaded_params(rank, world, cfg, out):
    """The trainer's parameters right after --init-from (sharded over the ranks), gathered whole."""
    from parallel.mesh import build
    from parallel.trainer import _params

    meshes = build(cfg.parallel, device_type="cpu")
    params = _params(cfg, DIT_PRESETS[cfg.model], meshes, torch.device("cpu"))
    full = {k: v.full_tensor().detach() for k, v in params.items()}
    if rank == 0:
        torch.save(full, out)


def _train_error(rank, world, cfg, out):
    """train(cfg), keeping the exception it raises (pickled as raised)."""
    try:
        train(cfg)
    except Exception as e:  # noqa: BLE001 - handed to the test, which checks its class and message
        with open(out, "wb") as f:
            pickle.dump(e, f)


def _raise_from_train(cfg, tmp: Path) -> None:
    """Run train(cfg) in a 1-process group and re-raise its exception here, class intact."""
    path = tmp / "err.pkl"
    path.unlink(missing_ok=True)
    spawn(_train_error, 1, cfg, str(path))
    if path.is_file():
        with open(path, "rb") as f:
            raise pickle.load(f)


def test_export_and_init_from(tmp):
    """convert.py export writes the trained (DCP) weights; --init-from starts from exactly the
    file's tensors (official .pt and hvfunc safetensors, sharded over 2 ranks) and fails loudly."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import convert
    from conftest import random_params

    from hvfunc import ckpt

    cfg = DIT_PRESETS["tiny"]
    feats = make_features(tmp / "feats")
    _spawn_train(1, [_cfg(feats, tmp / "a", steps=2)], tmp)
    convert.main(["export", "--checkpoint", str(tmp / "a" / "checkpoints"), "--target", str(tmp / "w.pt"),
                  "--to", "official", "--dtype", "keep"])
    trained = _final_params(tmp / "a")  # what DCP holds after 2 steps
    exported = torch.load(tmp / "w.pt", weights_only=True)["module"]  # the file's tensors, official keys
    assert exported.keys() == ckpt.official_spec(cfg).keys()
    assert all(torch.equal(exported[k], v) for k, v in ckpt.dit_to_official(trained, cfg).items())
    other = random_params(cfg, seed=5)  # every leaf unlike upstream's init (zero gates, unit norms)
    io.save_safetensors(other, tmp / "w.safetensors")
    for src, want in (("w.pt", trained), ("w.safetensors", other)):
        spawn(_loaded_params, 2, _cfg(feats, tmp / "b", init_from=tmp / src,
                                      parallel=ParallelConfig(dp_shard=2)), str(tmp / "loaded.pt"))
        loaded = torch.load(tmp / "loaded.pt")
        assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want), src
        if src == "w.pt":  # and, in the file's own (official) keys, its tensors
            assert all(torch.equal(v, exported[k]) for k, v in ckpt.dit_to_official(loaded, cfg).items())
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint not found: {tmp / 'missing.pt'}")):
        _raise_from_train(_cfg(feats, tmp / "d", steps=1, init_from=tmp / "missing.pt"), tmp)
    bad = torch.load(tmp / "w.pt", weights_only=True)
    del bad["module"]["final_layer.linear.bias"]
    torch.save(bad, tmp / "bad.pt")
    msg = re.escape(f"{tmp / 'bad.pt'} (official format)") + r".*\n\s*missing \(1\): final_layer\.linear\.bias"
    with pytest.raises(ValueError, match=msg):  # never a silent start from random init
        _raise_from_train(_cfg(feats, tmp / "e", steps=1, init_from=tmp / "bad.pt"), tmp)
    assert not (tmp / "d").exists() and not (tmp / "e" / "metrics.jsonl").exists()


def test_bucket_shapes_are_checked_before_training():
    from types import SimpleNamespace

    from parallel.trainer import _check_buckets

    cp2 = SimpleNamespace(size=lambda axis: 2 if axis == "cp" else 1, cfg=ParallelConfig(cp=2))
    model = DIT_PRESETS["tiny"]
    _check_buckets([(16, 3, 8, 8), (16, 2, 8, 8)], model, cp2)  # 48 and 32 tokens: fine
    with pytest.raises(ValueError, match=r"\(16, 3, 6, 6\).*over 2 ranks"):  # 27 tokens
        _check_buckets([(16, 3, 8, 8), (16, 3, 6, 6)], model, cp2)
    with pytest.raises(ValueError, match="in_channels 16"):
        _check_buckets([(4, 3, 8, 8)], model, cp2)


def _init_peak(rank, world, cfg, out):
    from graphs.memory import peak_memory, tensor_bytes
    from parallel.mesh import build
    from parallel.trainer import _params

    model = DIT_PRESETS[cfg.model]
    meshes = build(cfg.parallel, device_type="cpu")
    params, peak = peak_memory(lambda: _params(cfg, model, meshes, torch.device("cpu")))
    local = tensor_bytes({k: v.to_local() for k, v in params.items()})
    if rank == 0:
        full = {k: math.prod(s.shape) * 4 for k, s in dit_spec(model).items()}
        torch.save(dict(peak=peak, local=local, total=sum(full.values()), leaf=max(full.values())), out)


def test_ranks_never_hold_the_whole_model(tmp):
    """dp_shard 2: building the sharded fp32 params peaks at this rank's shards plus about one
    full leaf (built leaf by leaf), not at the whole model (13B: 51 GB per rank)."""
    spawn(_init_peak, 2, _cfg(tmp, tmp, parallel=ParallelConfig(dp_shard=2)), str(tmp / "peak.pt"))
    r = torch.load(tmp / "peak.pt")
    assert r["local"] <= 0.6 * r["total"] and r["leaf"] <= 0.05 * r["total"]
    assert r["peak"] <= r["local"] + 3 * r["leaf"], r


def test_layout_is_checked_before_anything_starts(tmp):
    """Heads over tp x cp, SP needs tp: ValueError before the process group
    and the weight init (this process has none, so reaching either would fail differently)."""
    feats = make_features(tmp / "feats", n=2)
    heads = DIT_PRESETS["tiny"].heads_num
    for par, msg in ((ParallelConfig(tp=2, cp=heads), f"heads_num {heads} is not divisible by tp\\*cp = 2\\*{heads}"),
                     (ParallelConfig(cp=2, sequence_parallel=True), "sequence_parallel .* needs tp > 1")):
        with pytest.raises(ValueError, match=msg):
            train(_cfg(feats, tmp / "out", parallel=par))
    with pytest.raises(ValueError, match="has a guidance embedding: --guidance needs a value"):
        train(_cfg(feats, tmp / "out", guidance=None))
    assert not (tmp / "out").exists()


def test_sigterm_saves_a_checkpoint_and_stops(tmp):
    """scripts/train.py as a user runs it: SIGTERM mid-run -> checkpoint at the current step, exit 0."""
    import signal
    import subprocess
    import time

    feats = make_features(tmp / "feats")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "scripts" / "train.py"), "tiny", "--features", str(feats), "--out",
           str(tmp / "run"), "--steps", "1000", "--checkpoint-every", "1000", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    done = len(metrics.read_text().splitlines())
    assert "SIGTERM" in out and 2 <= done < 1000
    assert checkpoint.latest(tmp / "run" / "checkpoints").name == f"step-{done:08d}"


def _batch(ds, items: list[tuple[int, int]]) -> dict:
    from hvfunc.data.features import collate

    return collate([ds[it] for it in items])


def test_dropout_draws_and_substitution():
    """Exact: image_dropout=1 gives the noimg states (uncond where text-dropped); the draws that existed
    before image dropout (sigma, noise, text drop: in that order from the sample's seed) are unchanged."""
    import tempfile

    from hvfunc import flow
    from hvfunc.data.features import FeatureDataset
    from parallel.train_loop import draws as _draws, with_dropout as _with_dropout

    with tempfile.TemporaryDirectory() as d:
        feats = make_features(Path(d), task="i2v", noimg="random", uncond=True)
        ds = FeatureDataset(feats, task="i2v", noimg=True)
        uncond = io.load_safetensors(feats / "uncond.safetensors")
        batch = _batch(ds, [(0, 0), (2, 1), (4, 2), (0, 3), (2, 4)])  # one latent shape; seeds 0..4
    for p_img in (0.0, 0.6, 1.0):
        cfg = _cfg(Path("f"), Path("o"), model="tiny-i2v", text_dropout=0.4, image_dropout=p_img)
        sigma, noise, text, image = _draws(batch, cfg, torch.device("cpu"))
        for b, seed in enumerate(batch["seed"]):  # the sequence as it was drawn before image dropout existed
            g = torch.Generator().manual_seed(seed)
            assert torch.equal(sigma[b:b + 1], flow.sample_sigmas(1, cfg.timesteps, generator=g))
            assert torch.equal(noise[b], torch.randn(tuple(batch["latents"].shape[1:]), generator=g))
            assert text[b] == bool(torch.rand((), generator=g) < 0.4)
        assert 0 < sum(text) < len(text)  # these seeds mix dropped and kept prompts
        out, counts = _with_dropout(batch, text, image, uncond)
        assert not set(out) & {"text_states_noimg", "text_mask_noimg"}
        assert out["latents"] is batch["latents"] and out["cond_latents"] is batch["cond_latents"]
        for b in range(len(text)):
            src = ({k: uncond[k] for k in ("text_states", "text_mask", "text_states_2")} if text[b] else
                   {"text_states": batch["text_states_noimg"][b], "text_mask": batch["text_mask_noimg"][b],
                    "text_states_2": batch["text_states_2"][b]} if image[b] else
                   {k: batch[k][b] for k in ("text_states", "text_mask", "text_states_2")})
            assert all(torch.equal(out[k][b], v) for k, v in src.items())
        assert counts == [sum(text), sum(i and not t for t, i in zip(text, image))]
        if p_img == 1.0:
            assert counts == [sum(text), len(text) - sum(text)]  # every sample not text-dropped lost its image
        if p_img == 0.0:
            assert counts[1] == 0
        if p_img == 0.6:
            assert 0 < counts[1] < len(text) - sum(text)  # these seeds drop some images, not all


def _metric(run: Path, key: str) -> list:
    return [json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_image_dropout_trains_end_to_end(tmp):
    """tiny-i2v, 4 steps of 2: with noimg states equal to the real ones, image_dropout=0.5 gives exactly the
    losses of image_dropout=0 (draws untouched, right tensors swapped in); with other noimg states the losses
    are equal up to the first image-dropped step and differ at it."""
    from conftest import random_params

    same = make_features(tmp / "same", task="i2v", noimg="copy", uncond=True)
    other = make_features(tmp / "other", task="i2v", noimg="random", uncond=True)
    io.save_safetensors(random_params(DIT_PRESETS["tiny-i2v"]), tmp / "w.safetensors")  # upstream init zeroes
    # the gates: text would not reach the loss in the first steps
    kw = dict(model="tiny-i2v", batch_size=2, guidance=6.016, text_dropout=0.25, init_from=tmp / "w.safetensors")
    base, swap, dropped = _spawn_train(1, [_cfg(same, tmp / "base", **kw),
                                           _cfg(same, tmp / "swap", image_dropout=0.5, **kw),
                                           _cfg(other, tmp / "drop", image_dropout=0.5, **kw)], tmp)
    assert swap == base and all(math.isfinite(v) for v in base)
    n_img = _metric(tmp / "drop", "image_dropped")
    assert _metric(tmp / "base", "image_dropped") == [0] * 4 and 0 < sum(n_img) < 8
    assert _metric(tmp / "drop", "text_dropped") == _metric(tmp / "base", "text_dropped")
    first = next(k for k, n in enumerate(n_img) if n)
    assert dropped[:first] == base[:first] and dropped[first] != base[first]


def test_image_dropout_fails_before_training(tmp):
    from hvfunc.data.features import FeatureDataset

    t2v = make_features(tmp / "t2v", uncond=True)
    with pytest.raises(ValueError, match="image_dropout=0.1 .* 'tiny' is text-to-video"):
        train(_cfg(t2v, tmp / "a", image_dropout=0.1))
    plain = make_features(tmp / "plain", task="i2v", uncond=True)
    with pytest.raises(ValueError, match=f"6 of 6 samples in {plain} .*--image-dropout-features True"):
        train(_cfg(plain, tmp / "b", model="tiny-i2v", image_dropout=0.1))
    mixed = make_features(tmp / "mixed", task="i2v", noimg="random", uncond=True)
    t = io.load_safetensors(mixed / "samples" / "s003.safetensors")
    write_sample(mixed, {"id": "s003", "caption": "clip 3", "task": "i2v"},
                 {k: v for k, v in t.items() if not k.endswith("_noimg")})
    build_index(mixed)
    with pytest.raises(ValueError, match=r"1 of 6 samples .*s003.safetensors: no \['text_states_noimg'"):
        FeatureDataset(mixed, task="i2v", noimg=True)
    assert len(FeatureDataset(mixed, task="i2v")) == 6  # without image dropout the folder is fine
    with pytest.raises(ValueError, match="text_dropout=0.2 needs .*uncond.safetensors"):
        train(_cfg(make_features(tmp / "nouncond"), tmp / "c", text_dropout=0.2))
    with pytest.raises(ValueError, match="image_dropout must be in"):
        train(_cfg(t2v, tmp / "d", image_dropout=1.5))
    assert not any((tmp / r).exists() for r in "abcd")  # nothing started
    with pytest.raises(ValueError, match="I2V features"):
        write_sample(tmp / "x", {"id": "x", "caption": "", "task": "t2v"},
                     dict(io.load_safetensors(t2v / "samples" / "s000.safetensors"), text_states_noimg=t["text_states"],
                          text_mask_noimg=t["text_mask"]))
    with pytest.raises(ValueError, match="shapes differ"):
        write_sample(tmp / "x", {"id": "x", "caption": "", "task": "i2v"},
                     dict(t, text_states_noimg=t["text_states"][:5], text_mask_noimg=t["text_mask"]))
