"""scripts/convert.py end to end on files it writes itself."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_params
from reference import diffusers_dit

from hvfunc import ckpt
from hvfunc.config import DIT_PRESETS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convert  # noqa: E402


def test_official_to_hvfunc_to_diffusers_to_official_is_exact(tmp):
    cfg = DIT_PRESETS["tiny-i2v"]
    params = random_params(cfg, dtype=torch.bfloat16)
    off = ckpt.dit_to_official(params, cfg)
    torch.save({"module": off}, tmp / "mp_rank_00_model_states.pt")
    run = lambda *a: convert.main(["dit", "--preset", "tiny-i2v", *a])  # noqa: E731
    run("--source", str(tmp / "mp_rank_00_model_states.pt"), "--target", str(tmp / "hv.safetensors"))
    run("--source", str(tmp / "hv.safetensors"), "--target", str(tmp / "transformer"), "--to", "diffusers")
    run("--source", str(tmp / "transformer"), "--target", str(tmp / "back.pt"), "--to", "official")
    back = torch.load(tmp / "back.pt", weights_only=True)["module"]
    assert back.keys() == off.keys() and all(torch.equal(back[k], off[k]) for k in off)
    # the diffusers folder loads into diffusers' own model class
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel.from_pretrained(tmp / "transformer")
    assert model.config.image_condition_type == "token_replace"
    ref = ckpt.dit_to_diffusers(params, cfg)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert set(diffusers_dit(cfg).state_dict()) == set(ref)


def test_cli_help_and_bad_paths(tmp):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/convert.py"), "dit", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--source" in out.stdout and "--to" in out.stdout
    with pytest.raises(SystemExit, match="error: .*nope.pt"):
        convert.main(["dit", "--preset", "tiny", "--source", str(tmp / "nope.pt"), "--target", str(tmp / "x")])
    with pytest.raises(SystemExit, match="error: .*preset"):
        convert.main(["dit", "--preset", "huge", "--source", str(tmp / "a.pt"), "--target", str(tmp / "x")])
