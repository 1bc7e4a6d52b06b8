"""EMA of the trained weights: the closed form over the recorded parameters, a bit-exact resume,
checkpoints next to the params, export under the official `ema` key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_trainer import _cfg, _spawn_train, make_features

from hvfunc import ckpt
from hvfunc.config import DIT_PRESETS
from hvfunc.dit_spec import dit_spec
from hvfunc.params import init_leaves
from parallel import checkpoint
from parallel.ema import EMAConfig

CFG = DIT_PRESETS["tiny"]
D = 0.8


def _at(run: Path, step: int, key: str) -> dict:
    shapes = {k: s.shape for k, s in dit_spec(CFG).items()}
    return checkpoint.load_params_single_process(run / "checkpoints" / f"step-{step:08d}", shapes, key=key)


def test_ema_is_the_closed_form_over_the_steps(tmp):
    """3 steps, a checkpoint after each: EMA_k = sum_i (1-d) d^(k-i) p_i + d^k p_0 (p_0 the init)."""
    feats = make_features(tmp / "feats")
    _spawn_train(1, [_cfg(feats, tmp / "a", steps=3, checkpoint_every=1, keep_last=5, ema=EMAConfig(decay=D))], tmp)
    p = [dict(init_leaves(dit_spec(CFG), generator=torch.Generator().manual_seed(0)))]  # the trainer's init, seed 0
    p += [_at(tmp / "a", i, "params") for i in (1, 2, 3)]
    for k in (1, 2, 3):
        ema = _at(tmp / "a", k, "ema")
        moved = 0.0
        for name, e in ema.items():
            want = D ** k * p[0][name].double() + sum((1 - D) * D ** (k - i) * p[i][name].double()
                                                      for i in range(1, k + 1))
            assert float((e.double() - want).norm()) <= 1e-6 * float(want.norm()) + 1e-7, (k, name)
            moved = max(moved, float((e - p[k][name]).norm()))
        assert moved > 1e-4  # the EMA lags the weights: it is not a copy of them


def test_resume_gives_the_same_ema_bit_exactly(tmp):
    feats = make_features(tmp / "feats")
    kw = {"checkpoint_every": 2, "ema": EMAConfig(decay=D)}
    _spawn_train(1, [_cfg(feats, tmp / "a", steps=4, **kw)], tmp)
    _spawn_train(1, [_cfg(feats, tmp / "b", steps=2, **kw), _cfg(feats, tmp / "b", steps=4, **kw)], tmp)
    a, b = _at(tmp / "a", 4, "ema"), _at(tmp / "b", 4, "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], _at(tmp / "a", 4, "params")[k]) for k in a)


def test_export_writes_the_ema(tmp):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import convert

    feats = make_features(tmp / "feats")
    _spawn_train(1, [_cfg(feats, tmp / "a", steps=2, ema=EMAConfig(decay=D)),
                     _cfg(feats, tmp / "plain", steps=1)], tmp)
    ck = str(tmp / "a" / "checkpoints")
    convert.main(["export", "--checkpoint", ck, "--target", str(tmp / "w.pt"), "--to", "official", "--dtype", "keep",
                  "--ema"])
    ema, params = _at(tmp / "a", 2, "ema"), _at(tmp / "a", 2, "params")
    for key, want in (("ema", ema), ("module", params)):
        got = ckpt.read_state_dict(tmp / "w.pt", key=key)
        ref = ckpt.dit_to_official(want, CFG)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), key
    convert.main(["export", "--checkpoint", ck, "--target", str(tmp / "w.safetensors"), "--dtype", "keep", "--ema"])
    got = ckpt.read_state_dict(tmp / "w.safetensors")  # other targets: the EMA weights instead of the params
    assert all(torch.equal(got[k], ema[k]) for k in ema)
    with pytest.raises(SystemExit, match="holds no EMA weights"):
        convert.main(["export", "--checkpoint", str(tmp / "plain" / "checkpoints"), "--target", str(tmp / "x.pt"),
                      "--ema"])


def test_decay_out_of_range_is_an_error():
    for d in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"--ema.decay must be in \[0, 1\) \(0 = off\), got {d}"):
            EMAConfig(decay=d)


def test_lora_ema_covers_the_adapters_and_exports(tmp):
    """LoRA on 2 ranks (dp_shard 2): the checkpoint's EMA holds exactly the adapters (the frozen base has
    none), export-lora --ema writes it (read back exactly), and it lags the trained adapters."""
    import torch.distributed.checkpoint as dcp
    from test_lora_train import LORA, _base_file, _lora_cfg

    from hvfunc import lora, lora_formats
    from parallel.mesh import ParallelConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import convert

    feats = make_features(tmp / "feats", task="i2v")
    _spawn_train(2, [_lora_cfg(feats, tmp / "a", _base_file(tmp), steps=2, checkpoint_every=2, batch_size=2,
                               ema=EMAConfig(decay=D), parallel=ParallelConfig(dp_shard=2))], tmp)
    step = tmp / "a" / "checkpoints" / "step-00000002"
    adapters = sorted(lora.lora_spec(DIT_PRESETS["tiny-i2v"], LORA))
    saved = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert {k for k in saved if k.startswith("ema.")} == {f"ema.{k}" for k in adapters}
    shapes = {k: lora.lora_spec(DIT_PRESETS["tiny-i2v"], LORA)[k].shape for k in adapters}
    ema = checkpoint.load_params_single_process(step, shapes, key="ema")
    params = checkpoint.load_params_single_process(step, shapes)
    convert.main(["export-lora", "--checkpoint", str(step), "--target", str(tmp / "ema.safetensors"), "--format",
                  "hvfunc", "--ema"])
    back = lora_formats.read(tmp / "ema.safetensors")
    assert back.tensors.keys() == ema.keys() and all(torch.equal(back.tensors[k], ema[k]) for k in ema)
    assert any(float((ema[k] - params[k]).norm()) > 1e-6 for k in adapters if k.endswith("lora_B"))
