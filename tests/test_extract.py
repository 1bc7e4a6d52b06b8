"""scripts/extract.py end to end: stored features equal diffusers' VAE and encode_prompt on the same
clips and captions, bad clips reported (exit 0), 1 rank == 2 ranks (each clip written by one rank),
resume is exact."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from dist import spawn
from reference import diffusers_vae, rel_err
from test_data_dataset import GOOD, INDEX_SKIPS, READ_SKIPS, messy  # noqa: F401 - the messy dataset fixture
from test_text import _diffusers_template

from hvfunc import io, vae
from hvfunc.config import data_preset
from hvfunc.data import extract as ex
from hvfunc.data.buckets import mix_seed
from hvfunc.data.dataset import build_dataset
from hvfunc.data.features import KEYS, NOIMG_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import extract  # noqa: E402


SCALE = 0.476986  # the official VAE config's scaling_factor (hunyuanvideo-official.md section 2)


def _run(rank, world, data: str, out: str, task: str, **kw) -> None:
    extract.main(extract.ExtractArgs(data=Path(data), out=Path(out), task=task, models=extract.ModelArgs(
        preset="tiny"), device="cpu", batch_size=2, **kw))


def _run_logged(rank, world, data: str, out: str, task: str, log: str, **kw) -> None:
    """_run, recording the clip ids this rank writes (log.<rank>.json)."""
    real, written = extract.write_sample, []

    def write(root, record, tensors):
        written.append(record["id"])
        return real(root, record, tensors)

    extract.write_sample = write
    try:
        _run(rank, world, data, out, task, **kw)
    finally:
        extract.write_sample = real
    Path(f"{log}.{rank}.json").write_text(json.dumps(written))


def _files(out: Path) -> dict[str, dict]:
    return {p.name: io.load_safetensors(p) for p in sorted((out / "samples").glob("*.safetensors"))
            if not p.name.startswith(".")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.keys() == b[n].keys() and all(torch.equal(x[k], b[n][k]) for k in x)
                                        for n, x in a.items())


def _pipelines(enc, task: str):
    """diffusers' text side of the pipeline that `task` samples with, on the run's own encoders."""
    from diffusers import HunyuanVideoImageToVideoPipeline, HunyuanVideoPipeline

    kw = dict(text_encoder=enc.llm, tokenizer=enc.tokenizer, transformer=None, vae=None, scheduler=None,
              text_encoder_2=enc.clip, tokenizer_2=enc.clip_tokenizer)
    if task == "i2v":
        return HunyuanVideoImageToVideoPipeline(image_processor=enc.image_processor, **kw)
    return HunyuanVideoPipeline(**kw)


def _frame0(video_CTHW: torch.Tensor):
    """Frame 0 of a [-1, 1] clip as the 8-bit RGB picture it was decoded from."""
    from PIL import Image

    u8 = ((video_CTHW[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(u8.permute(1, 2, 0).numpy())


def _models(root: Path, task: str) -> ex.Models:
    """The models an extraction run wrote (--models.preset tiny), through the real loaders."""
    llm = "text_encoder_i2v" if task == "i2v" else "text_encoder"
    return ex.load_models(root / "vae", root / llm, root / "text_encoder_2", tiny=True)


@torch.no_grad()
def _expected(models: Path, data: Path, task: str, ids: list[str], *, seed: int = 0,
              tiling: vae.Tiling | None = vae.Tiling()) -> dict[str, dict]:
    """Per clip id, the features computed by diffusers from the clip extraction reads: VAE
    posterior sample (the clip's seed mix_seed(seed, i)) x 0.476986, tiled with `tiling`
    (extraction's: upstream's numbers); I2V: mode of frame 0 alone x 0.476986; encode_prompt of
    the caption (I2V: with frame 0, and with a black image of its size)."""
    from PIL import Image

    from hvfunc.vae.ckpt import load_vae

    params, vcfg = load_vae(models / "vae")
    ref = diffusers_vae(vcfg, params, tiling)
    enc = _models(models, task).text
    pipe, tpl = _pipelines(enc, task), _diffusers_template(enc.video_template)
    ds = build_dataset(data, data_preset("tiny"), seed=seed)
    want = {}
    for i in (i for i in range(len(ds)) if ex.clip_id(ds, i) in ids):
        clip = ds.load(i, mix_seed(seed, i))
        x = clip["video"][None]  # [1, 3, T, H, W]
        g = torch.Generator().manual_seed(mix_seed(seed, i))
        t = {"latents": ref.encode(x).latent_dist.sample(generator=g)[0] * SCALE}
        if task == "t2v":
            states, pooled, mask = pipe.encode_prompt([clip["caption"]], prompt_template=tpl, device="cpu",
                                                      dtype=torch.float32)
        else:
            t["cond_latents"] = ref.encode(x[:, :, :1]).latent_dist.mode()[0] * SCALE
            image = _frame0(clip["video"])
            kw = dict(prompt_template=tpl, device="cpu", dtype=torch.float32, image_embed_interleave=4)
            states, pooled, mask = pipe.encode_prompt([image], [clip["caption"]], **kw)
            black = pipe.encode_prompt([Image.new("RGB", image.size)], [clip["caption"]], **kw)
            t |= {"text_states_noimg": black[0][0], "text_mask_noimg": black[2][0]}
        want[ex.clip_id(ds, i)] = t | {"text_states": states[0], "text_mask": mask[0], "text_states_2": pooled[0]}
    return want


def _worst(files: dict, want: dict) -> dict[str, float]:
    """Largest error per key, relative to the reference's scale; masks must be equal."""
    files = {Path(n).stem: t for n, t in files.items()}
    assert files.keys() == want.keys()
    worst: dict[str, float] = {}
    for n, w in want.items():
        for k, ref in w.items():
            if k.startswith("text_mask"):
                assert torch.equal(files[n][k], ref.to(files[n][k].dtype)), (n, k)
            else:
                worst[k] = max(worst.get(k, 0.0), rel_err(files[n][k], ref))
    return worst


def test_bad_clips_reported_and_ranks_write_the_same_files(messy, tmp):  # noqa: F811
    """1 rank and 2 ranks, both with --compile aot_eager: the same files bit for bit, every clip
    written by exactly one rank; the values equal diffusers'."""
    run = functools.partial(_run_logged, compile="aot_eager")
    spawn(run, 1, str(messy), str(tmp / "one"), "t2v", str(tmp / "w1"))
    spawn(run, 2, str(messy), str(tmp / "two"), "t2v", str(tmp / "w2"))
    one, two = _files(tmp / "one"), _files(tmp / "two")
    assert sorted(one) == sorted(g.replace(".mp4", ".safetensors") for g in GOOD)
    assert _same(one, two)
    assert _same({"u": io.load_safetensors(tmp / "one" / "uncond.safetensors")},
                 {"u": io.load_safetensors(tmp / "two" / "uncond.safetensors")})
    by_rank = [json.loads((tmp / f"w2.{r}.json").read_text()) for r in range(2)]
    assert all(by_rank) and sorted(by_rank[0] + by_rank[1]) == sorted(g[:-4] for g in GOOD)  # each clip once
    assert sorted(json.loads((tmp / "w1.0.json").read_text())) == sorted(g[:-4] for g in GOOD)
    worst = _worst(one, _expected(tmp / "one" / "models", messy, "t2v", [Path(n).stem for n in one]))
    # compiled VAE (F.conv3d) vs diffusers' eager one, text batched by 2 vs 1; measured 1.7e-7 and 0
    assert worst["latents"] <= 1e-5, worst
    assert worst["text_states"] <= 1e-6 and worst["text_states_2"] <= 1e-6, worst
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


def test_tiled_extraction_equals_diffusers_tiled(messy, tmp):  # noqa: F811
    """ex.extract with small tiles (64 px, 16 frames: a 17 x 64 x 96 clip is tiled in space and
    time): the latents are diffusers' posterior sample under the same tiling, and differ from
    the untiled ones (the tiles were used)."""
    from dataclasses import replace

    small = vae.Tiling(tile_sample_min_size=64, tile_sample_min_tsize=16)
    ex.write_tiny_models(tmp / "models", "t2v")
    models = replace(_models(tmp / "models", "t2v"), tiling=small)
    ds = build_dataset(messy, data_preset("tiny"), seed=0)
    batch = ds.buckets[(17, 64, 96)]  # two good clips and the bad ones of that size (skipped)
    got = {r["id"]: t for r, t in ex.extract(models, ds, batch, seed=0, task="t2v", device=torch.device("cpu"))}
    assert sorted(got) == ["clip_0000", "clip_0005"]
    worst = _worst(got, _expected(tmp / "models", messy, "t2v", list(got), tiling=small))
    assert worst["latents"] <= 1e-5 and worst["text_states"] <= 1e-6, worst  # measured 3.2e-6 and 0
    untiled = _expected(tmp / "models", messy, "t2v", list(got), tiling=None)
    assert all(rel_err(t["latents"], untiled[n]["latents"]) > 1e-3 for n, t in got.items())


def _strip_noimg(path: Path) -> None:
    """Rewrite a sample file as extraction wrote it before black-image features existed."""
    t = {k: v for k, v in io.load_safetensors(path).items() if k not in NOIMG_KEYS}
    rec = json.loads(io.safetensors_metadata(path)["record"])
    del rec["keys"]
    io.save_safetensors(t, path, metadata={"record": json.dumps(rec)})


def _validation_prompts(tmp: Path) -> dict:
    """extract.py's --validation-* arguments: two prompts, their reference images, a negative prompt."""
    from PIL import Image

    (tmp / "vp.txt").write_text("A red circle moves.\nA blue square falls.\n")
    for i in range(2):
        Image.new("RGB", (40, 32), (200, 90 * i, 30)).save(tmp / f"v{i}.png")
    (tmp / "vi.txt").write_text("v0.png\nv1.png\n")
    return dict(validation_prompts=tmp / "vp.txt", validation_images=tmp / "vi.txt", validation_negative_prompt="blurry")


def _check_validation_encodings(out: Path, tmp: Path) -> None:
    """<out>/validation holds diffusers' encode_prompt of each (image, prompt) and of (black image, negative)."""
    from PIL import Image

    enc = _models(out / "models", "i2v").text
    pipe, kw = _pipelines(enc, "i2v"), dict(prompt_template=_diffusers_template(enc.video_template), device="cpu",
                                            dtype=torch.float32, image_embed_interleave=4)
    got = io.load_safetensors(out / "validation" / "conditioning.safetensors")
    for i, prompt in enumerate(["A red circle moves.", "A blue square falls."]):
        image = Image.open(tmp / f"v{i}.png").convert("RGB")
        for part, (im, text) in (("cond", (image, prompt)), ("uncond", (Image.new("RGB", image.size), "blurry"))):
            states, pooled, mask = pipe.encode_prompt([im], [text], **kw)
            assert torch.equal(got[f"{i}.{part}.text_mask"], mask.to(got[f"{i}.{part}.text_mask"].dtype))
            assert rel_err(got[f"{i}.{part}.text_states"], states) <= 1e-6  # measured 0
            assert rel_err(got[f"{i}.{part}.text_states_2"], pooled) <= 1e-6


def test_interrupted_extraction_resumes_without_redoing(messy, tmp, capfd):  # noqa: F811
    out = tmp / "run"
    spawn(functools.partial(_run, **_validation_prompts(tmp)), 1, str(messy), str(out), "i2v")
    _check_validation_encodings(out, tmp)
    full = _files(out)
    assert all("cond_latents" in t and t["cond_latents"].shape[1] == 1 for t in full.values())
    records = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert all(set(NOIMG_KEYS) <= set(r["keys"]) for r in records)
    # eager extraction vs diffusers; measured: latents 9.5e-7, cond_latents 3.3e-6, text states 0
    worst = _worst(full, _expected(out / "models", messy, "i2v", [Path(n).stem for n in full]))
    assert worst["latents"] <= 1e-5 and worst["cond_latents"] <= 1e-5, worst
    assert max(worst[k] for k in ("text_states", "text_states_noimg", "text_states_2")) <= 1e-6, worst
    assert all(float((t["text_states_noimg"] - t["text_states"]).abs().max()) > 1e-2 for t in full.values())
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
