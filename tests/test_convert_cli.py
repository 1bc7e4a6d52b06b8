"""scripts/convert.py end to end on files it writes itself."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
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


def _rule(off, sd, scale, prefix):
    """Upstream's merge on official keys: W += scale * up @ down in fp32 (alpha ignored; files have alpha = r)."""
    out = dict(off)
    for k, W in off.items():
        n = prefix + k[:-len(".weight")].replace(".", "_")
        if f"{n}.lora_up.weight" in sd:
            out[k] = (W.float() + scale * (sd[f"{n}.lora_up.weight"].float() @ sd[f"{n}.lora_down.weight"].float())
                      ).to(W.dtype)
    return out


def test_merge_lora_cli_is_the_official_rule_partial_and_stacked(tmp):
    from safetensors.torch import save_file
    from test_lora import PFX, _kohya_file

    cfg = DIT_PRESETS["tiny-i2v"]
    off = ckpt.dit_to_official(random_params(cfg, dtype=torch.bfloat16), cfg)
    torch.save({"module": off}, tmp / "base.pt")
    sd = _kohya_file(cfg, 4)
    save_file(sd, tmp / "a.safetensors")
    convert.main(["merge-lora", "--base", str(tmp / "base.pt"), "--lora", f"{tmp / 'a.safetensors'}:0.5",
                  "--target", str(tmp / "out.pt")])
    out, want = torch.load(tmp / "out.pt", weights_only=True)["module"], _rule(off, sd, 0.5, PFX)
    assert out.keys() == off.keys() and all(torch.equal(out[k], want[k]) for k in off)
    # a pruned base (two double blocks' weights only) merges what it holds, without the model's depth
    part = {k: v for k, v in off.items() if k.startswith(("double_blocks.1.img", "single_blocks.0.linear2"))}
    save_file({k: v.contiguous() for k, v in part.items()}, tmp / "part.safetensors")
    convert.main(["merge-lora", "--base", str(tmp / "part.safetensors"), "--lora", str(tmp / "a.safetensors"),
                  "--target", str(tmp / "part_out.safetensors")])
    got, want = load_file(tmp / "part_out.safetensors"), _rule(part, sd, 1.0, PFX)
    assert got.keys() == part.keys() and all(torch.equal(got[k], want[k]) for k in part)
    # two LoRAs (a musubi file too) stack on an fp32 base, written in diffusers' layout
    off32 = {k: v.float() for k, v in off.items()}
    save_file(off32, tmp / "base32.safetensors")
    sd2 = {k.replace(PFX, "lora_unet_"): v for k, v in _kohya_file(cfg, 2, seed=3).items()}
    save_file(sd2, tmp / "b.safetensors")
    convert.main(["merge-lora", "--base", str(tmp / "base32.safetensors"), "--lora", str(tmp / "a.safetensors"),
                  "--lora", f"{tmp / 'b.safetensors'}:-0.3", "--to", "diffusers", "--preset", "tiny-i2v",
                  "--target", str(tmp / "merged")])
    got = load_file(tmp / "merged" / "diffusion_pytorch_model.safetensors")
    want = ckpt.official_to_diffusers(_rule(_rule(off32, sd, 1.0, PFX), sd2, -0.3, "lora_unet_"), cfg)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-6) for k in want)


def test_lora_cli_converts_and_reports_bad_files(tmp):
    from safetensors.torch import save_file
    from test_lora import PFX, _kohya_file

    cfg = DIT_PRESETS["tiny"]
    sd = {k.replace(PFX, "lora_unet_"): v for k, v in _kohya_file(cfg, 2).items()}
    save_file(sd, tmp / "musubi.safetensors")
    convert.main(["lora", "--source", str(tmp / "musubi.safetensors"), "--target", str(tmp / "comfy.safetensors"),
                  "--format", "comfyui"])
    comfy = load_file(tmp / "comfy.safetensors")
    assert len(comfy) == 2 * len(sd) // 3  # alpha = r: no alpha keys, as diffusers' loader wants
    assert torch.equal(comfy["diffusion_model.single_blocks.1.linear1.lora_B.weight"],
                       sd["lora_unet_single_blocks_1_linear1.lora_up.weight"])
    assert torch.equal(comfy["diffusion_model.double_blocks.0.img_mod.linear.lora_A.weight"],
                       sd["lora_unet_double_blocks_0_img_mod_linear.lora_down.weight"])
    save_file(dict(sd, **{"lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight": torch.zeros(3, 2)}),
              tmp / "bad.safetensors")
    with pytest.raises(SystemExit, match="error: .*bad.safetensors.*img_attn_qkvx"):
        convert.main(["lora", "--source", str(tmp / "bad.safetensors"), "--target", str(tmp / "x.safetensors"),
                      "--format", "hvfunc"])
    narrow = cfg.replace(hidden_size=32, heads_num=2, rope_dim_list=(4, 6, 6))
    off = ckpt.dit_to_official(random_params(narrow), narrow)
    save_file(off, tmp / "narrow.safetensors")
    with pytest.raises(SystemExit, match=r"error: .*mlp\.fc1\.weight is \(128, 32\), the adapter gives \(256, 64\)"):
        convert.main(["merge-lora", "--base", str(tmp / "narrow.safetensors"), "--lora",
                      str(tmp / "musubi.safetensors"), "--target", str(tmp / "y.safetensors")])
