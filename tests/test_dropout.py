"""CFG condition dropout in training: text -> the uncond features, image (I2V) -> the prompt's
black-image features; draws come from the per-sample seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import _cfg, _spawn_train, make_features

from hvfunc import io
from hvfunc.data.features import read_index, sample_path, write_sample
from parallel.trainer import _draws, _with_dropout


def _batch(B: int = 3, S: int = 6, D: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(B, 2, 1, 2, 2, generator=g), "seed": [11, 12, 13],
            "text_states": torch.randn(B, S, D, generator=g), "text_mask": torch.ones(B, S, dtype=torch.long),
            "text_states_2": torch.randn(B, 3, generator=g),
            "text_states_noimg": torch.randn(B, S, D, generator=g),
            "text_mask_noimg": torch.zeros(B, S, dtype=torch.long)}


def test_dropout_replaces_exactly_the_dropped_conditions():
    b = _batch()
    uncond = {"text_states": torch.full((6, 4), 7.0), "text_mask": torch.full((6,), 2),
              "text_states_2": torch.full((3,), 9.0)}
    out = _with_dropout(b, ["image", "text", None], uncond)
    assert torch.equal(out["text_states"][0], b["text_states_noimg"][0])
    assert torch.equal(out["text_mask"][0], b["text_mask_noimg"][0])
    assert torch.equal(out["text_states_2"][0], b["text_states_2"][0])  # CLIP sees no image
    assert all(torch.equal(out[k][1], uncond[k].to(out[k])) for k in uncond)
    assert all(torch.equal(out[k][2], b[k][2]) for k in uncond)
    assert torch.equal(b["text_mask"], torch.ones(3, 6, dtype=torch.long))  # the input batch is untouched
    with pytest.raises(ValueError, match="uncond.safetensors"):
        _with_dropout(b, [None, "text", None], None)


def test_image_draws_come_after_the_others(tmp):
    """Turning image dropout on keeps every sigma, noise and text-dropout draw of a run."""
    b = _batch()
    base = _cfg(Path("f"), tmp, model="tiny-i2v", text_dropout=0.5)
    s0, n0, d0 = _draws(b, base, torch.device("cpu"))
    s1, n1, d1 = _draws(b, _cfg(Path("f"), tmp, model="tiny-i2v", text_dropout=0.5, image_dropout=0.9),
                        torch.device("cpu"))
    assert torch.equal(s0, s1) and torch.equal(n0, n1)
    assert [d == "text" for d in d0] == [d == "text" for d in d1]
    _, _, all_img = _draws(b, _cfg(Path("f"), tmp, model="tiny-i2v", image_dropout=1.0), torch.device("cpu"))
    assert all_img == ["image"] * 3


def _add_noimg(root: Path) -> None:
    g = torch.Generator().manual_seed(1)
    for r in read_index(root):
        t = io.load_safetensors(sample_path(root, r["id"]))
        t["text_states_noimg"] = torch.randn(t["text_states"].shape, generator=g)
        t["text_mask_noimg"] = t["text_mask"].clone()
        write_sample(root, r, t)
    one = io.load_safetensors(sample_path(root, read_index(root)[0]["id"]))
    uncond = {k: torch.zeros_like(one[k]) for k in ("text_states", "text_states_2")}
    io.save_safetensors(uncond | {"text_mask": (torch.arange(len(one["text_mask"])) < 2).long()},
                        root / "uncond.safetensors")


def test_i2v_training_with_both_dropouts_and_clear_errors(tmp):
    plain = make_features(tmp / "plain", n=4, task="i2v")
    feats = make_features(tmp / "feats", n=4, task="i2v")
    _add_noimg(feats)
    # upstream's init zeroes the gates and the final layer: the text matters from step 3 on
    (a,), (b,) = (_spawn_train(1, [_cfg(feats, tmp / n, model="tiny-i2v", steps=4, **kw)], tmp)
                  for n, kw in (("a", {}), ("b", dict(text_dropout=0.5, image_dropout=1.0))))
    assert all(v == v for v in a + b) and a[:2] == b[:2] and a[3] != b[3]  # dropped conditions used
    with pytest.raises(Exception):  # T2V model: no image to drop
        _spawn_train(1, [_cfg(make_features(tmp / "t2v", n=2), tmp / "c", steps=1, image_dropout=0.1)], tmp)
    with pytest.raises(Exception):  # features extracted without the black-image states
        _spawn_train(1, [_cfg(plain, tmp / "d", model="tiny-i2v", steps=1, image_dropout=0.1)], tmp)
    assert not (tmp / "d" / "metrics.jsonl").exists()
