"""LoRA as data: spec vs PEFT, every file format exact both ways, merge vs upstream's rule, diffusers + peft
as the oracle of what a file means."""

import warnings

import pytest
import torch
from conftest import dit_inputs, random_params
from reference import diffusers_inputs, rel_err
from safetensors.torch import load_file, save_file

from hvfunc import ckpt, dit, lora, lora_formats
from hvfunc.config import DIT_PRESETS
from hvfunc.dit_spec import dit_spec
from hvfunc.params import count

TARGETS = lora.OFFICIAL_I2V_TARGETS
PFX = "Hunyuan_video_I2V_lora_"


def _official_targets(cfg):
    """Official linear modules hit by the I2V targets: PEFT's suffix rule on one-word targets is a match
    of the name's last component."""
    return {k[:-7]: s.shape for k, s in ckpt.official_spec(cfg).items()
            if k.endswith(".weight") and len(s.shape) == 2 and k[:-7].rsplit(".", 1)[-1] in TARGETS}


def _kohya_file(cfg, r, *, alpha=None, seed=0, dtype=torch.bfloat16):
    """An upstream-style kohya state dict built from the official shapes (not by our writer)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for m, (o, i) in _official_targets(cfg).items():
        k = PFX + m.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = (torch.randn(r, i, generator=g) * 0.3).to(dtype)
        sd[f"{k}.lora_up.weight"] = (torch.randn(o, r, generator=g) * 0.3).to(dtype)
        sd[f"{k}.alpha"] = torch.tensor(float(r if alpha is None else alpha), dtype=dtype)
    return sd


def _random_lora(cfg, lcfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = lora.lora_spec(cfg, lcfg)
    t = {k: torch.randn(s.shape, generator=g) * 0.3 for k, s in spec.items()}
    mods = dict.fromkeys(map(lora.module_of, t))
    return lora.Lora(t, {m: float(lcfg.alpha) for m in mods})


def _same_lora(a, b):
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) and a.tensors[k].dtype == b.tensors[k].dtype for k in a.tensors)
    assert dict(a.alpha) == dict(b.alpha)


def test_13b_count_and_modules_match_peft():
    """PEFT's LoraConfig with the official target list on a meta model with the official module names."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = DIT_PRESETS["hunyuan-video-i2v"]
    root = torch.nn.Module()
    with torch.device("meta"):
        for k, s in ckpt.official_spec(cfg).items():
            if k.endswith(".weight") and len(s.shape) == 2:
                *path, leaf = k[:-7].split(".")
                node = root
                for p in path:
                    if not hasattr(node, p):
                        node.add_module(p, torch.nn.Module())
                    node = getattr(node, p)
                node.add_module(leaf, torch.nn.Linear(s.shape[1], s.shape[0]))
    inject_adapter_in_model(LoraConfig(r=64, lora_alpha=64, target_modules=list(TARGETS),
                                       init_lora_weights="gaussian"), root, low_cpu_mem_usage=True)
    peft = {}
    for n, p in root.named_parameters():
        if ".lora_" in n:
            m = n.split(".lora_")[0]
            peft[m] = peft.get(m, 0) + p.numel()
    spec = lora.lora_spec(cfg, lora.LoraConfig())
    ours = {}
    for k, s in spec.items():
        ours[lora.module_of(k)] = ours.get(lora.module_of(k), 0) + count({k: s})
    assert ours == peft
    assert count(spec) == sum(peft.values()) and round(count(spec) / 1e5) == 3266  # "about 326.6M"
    # the rank axis is replicated, every other axis is the base leaf's; A ~ N(0, 1/r), B = 0 (PEFT "gaussian")
    base = dit_spec(cfg)
    assert spec["single_blocks.0.linear1_qkv.lora_B"].axes == (*base["single_blocks.0.linear1_qkv.weight"].axes[:2],
                                                              "lora")
    assert spec["single_blocks.0.linear1.lora_A"].axes == ("lora", "embed")
    assert spec["single_blocks.0.linear2_mlp.lora_A"].axes == ("lora", "mlp")
    assert all(s.init.kind == ("normal" if k.endswith("lora_A") else "zeros") for k, s in spec.items())
    assert spec["double_blocks.0.img_attn_qkv.lora_A"].init.scale == 1 / 64


def test_official_file_round_trips_bit_exact(tmp):
    cfg = DIT_PRESETS["tiny-i2v"]
    sd = _kohya_file(cfg, 4)
    save_file(sd, tmp / "official.safetensors")
    lo = lora_formats.read(tmp / "official.safetensors")
    D, r = cfg.hidden_size, 4
    # the fused official leaves are views of hvfunc's layout
    up = sd[f"{PFX}single_blocks_1_linear1.lora_up.weight"]
    assert torch.equal(lo.tensors["single_blocks.1.linear1_qkv.lora_B"], up[:3 * D].view(3, D, r))
    assert torch.equal(lo.tensors["single_blocks.1.linear1_mlp.lora_B"], up[3 * D:])
    down = sd[f"{PFX}single_blocks_1_linear2.lora_down.weight"]
    assert torch.equal(lo.tensors["single_blocks.1.linear2_attn.lora_A"], down[:, :D])
    assert lo.tensors["double_blocks.0.txt_attn_qkv.lora_B"].shape == (3, D, r)
    lora_formats.write(lo, tmp / "back.safetensors", "official")
    back = load_file(tmp / "back.safetensors")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape
               for k in sd)


@pytest.mark.parametrize("src", lora_formats.FORMATS)
def test_every_format_round_trips_and_converts_exactly(tmp, src):
    """src file -> read -> written back is the same file; -> every other format -> read is the same adapters.
    Alpha != rank and per-module ranks, so alpha and rank travel too."""
    cfg = DIT_PRESETS["tiny-i2v"]
    lo = _random_lora(cfg, lora.LoraConfig(rank=4, alpha=6.0, targets=TARGETS + ("adaLN_modulation.1",)))
    lo.tensors.update(lora.unfused("time_in.mlp.0", torch.randn(2, 256), torch.randn(cfg.hidden_size, 2)))
    lo = lora.Lora(lo.tensors, dict(lo.alpha) | {"time_in.mlp.0": 3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mindspeed: "files carry no alpha"
        lora_formats.write(lo, tmp / "a.safetensors", src)
        first = lora_formats.read(tmp / "a.safetensors")
        _same_lora(first, lo)
        lora_formats.write(first, tmp / "b.safetensors", src)
        a, b = load_file(tmp / "a.safetensors"), load_file(tmp / "b.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for dst in lora_formats.FORMATS:
            lora_formats.write(first, tmp / f"{dst}.safetensors", dst)
            _same_lora(lora_formats.read(tmp / f"{dst}.safetensors"), lo)


def _diffusers_split_file(cfg, r=3, seed=1):
    """A diffusers/finetrainers-style file: to_q, to_k, to_v (and proj_mlp) trained independently."""
    g = torch.Generator().manual_seed(seed)
    D, M = cfg.hidden_size, cfg.mlp_hidden
    sd = {}
    for blk, names, rows in (("transformer_blocks.0.attn", ("to_q", "to_k", "to_v"), (D, D, D)),
                             ("single_transformer_blocks.1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                              (D, D, D, M)),
                             ("single_transformer_blocks.0", ("attn.to_q", "attn.to_v"), (D, D))):  # to_k untrained
        for n, rows_n in zip(names, rows):
            sd[f"transformer.{blk}.{n}.lora_A.weight"] = torch.randn(r, D, generator=g)
            sd[f"transformer.{blk}.{n}.lora_B.weight"] = torch.randn(rows_n, r, generator=g)
    return sd


def test_independent_split_adapters_stack_to_the_same_delta(tmp):
    cfg = DIT_PRESETS["tiny"]
    sd = _diffusers_split_file(cfg)
    save_file(sd, tmp / "d.safetensors")
    with pytest.warns(UserWarning, match="stacked"):
        lo = lora_formats.read(tmp / "d.safetensors")
    lora_formats.write(lo, tmp / "official.safetensors", "official")
    off = load_file(tmp / "official.safetensors")

    def delta_official(m):
        k = PFX + m.replace(".", "_")
        up, down = off[f"{k}.lora_up.weight"], off[f"{k}.lora_down.weight"]
        return float(off[f"{k}.alpha"]) / down.shape[0] * up @ down

    def delta_diffusers(prefix, names, zero_rows=()):  # alpha = r (no metadata): scale 1 per part
        rows = [sd[f"transformer.{prefix}.{n}.lora_B.weight"] @ sd[f"transformer.{prefix}.{n}.lora_A.weight"]
                if f"transformer.{prefix}.{n}.lora_A.weight" in sd else torch.zeros(cfg.hidden_size, cfg.hidden_size)
                for n in names]
        return torch.cat(rows, dim=0)

    torch.testing.assert_close(delta_official("double_blocks.0.img_attn_qkv"),
                               delta_diffusers("transformer_blocks.0.attn", ("to_q", "to_k", "to_v")))
    torch.testing.assert_close(delta_official("single_blocks.1.linear1"),
                               delta_diffusers("single_transformer_blocks.1",
                                               ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")))
    assert off[f"{PFX}double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 9  # rank 3 * 3
    d0 = delta_official("single_blocks.0.linear1")
    torch.testing.assert_close(d0[:3 * cfg.hidden_size], delta_diffusers(
        "single_transformer_blocks.0", ("attn.to_q", "attn.to_k", "attn.to_v")))
    assert not d0[3 * cfg.hidden_size:].any() and d0.shape[0] == 3 * cfg.hidden_size + cfg.mlp_hidden
    # the parts are remembered: diffusers -> hvfunc -> diffusers gives the original file back
    lora_formats.write(lo, tmp / "hv.safetensors", "hvfunc")
    lora_formats.write(lora_formats.read(tmp / "hv.safetensors"), tmp / "back.safetensors", "diffusers")
    back = load_file(tmp / "back.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_merge_equals_upstream_rule_and_honours_alpha():
    """Upstream's merge: W += scale * up @ down in fp32 on the official keys (it ignores alpha: alpha = r)."""
    cfg = DIT_PRESETS["tiny-i2v"]
    params = random_params(cfg, dtype=torch.bfloat16)
    off = ckpt.dit_to_official(params, cfg)
    for alpha in (4, 2):
        sd = _kohya_file(cfg, 4, alpha=alpha)
        lo = lora_formats.from_state_dict(sd)
        ours = ckpt.dit_to_official(lora.merge(params, lo, 0.7), cfg)
        via_sd, merged = lora_formats.merge_state_dict(off, [(lo, 0.7)])
        assert len(merged) == len(_official_targets(cfg))
        for k, W in off.items():
            m, want = k[:-7], W
            if f"{PFX}{m.replace('.', '_')}.lora_up.weight" in sd and k.endswith(".weight"):
                up, down = (sd[f"{PFX}{m.replace('.', '_')}.lora_{x}.weight"].float() for x in ("up", "down"))
                want = (W.float() + 0.7 * (alpha / 4) * (up @ down)).to(W.dtype)
            assert torch.equal(ours[k], want) and torch.equal(via_sd[k], want), k
        assert ours.keys() == off.keys() and all(v.dtype == torch.bfloat16 for v in ours.values())


def test_merge_partial_base_and_errors_name_the_key():
    cfg = DIT_PRESETS["tiny"]
    off = ckpt.dit_to_official(random_params(cfg), cfg)
    lo = lora_formats.from_state_dict(_kohya_file(cfg, 2, dtype=torch.float32))
    part = {k: v for k, v in off.items() if k.startswith("double_blocks.1.")}
    out, merged = lora_formats.merge_state_dict(part, [(lo, 1.0)])
    assert out.keys() == part.keys() and merged and all(m.startswith("double_blocks.1.") for m in merged)
    full, _ = lora_formats.merge_state_dict(off, [(lo, 1.0)])
    assert all(torch.equal(out[k], full[k]) for k in part)
    with pytest.raises(ValueError, match="no LoRA module has its weight"):
        lora_formats.merge_state_dict({k: v for k, v in off.items() if k.startswith("img_in.")}, [(lo, 1.0)])
    wide = dict(off, **{"double_blocks.1.img_mlp.fc1.weight": torch.zeros(7, cfg.hidden_size)})
    with pytest.raises(ValueError, match=r"double_blocks\.1\.img_mlp\.fc1\.weight is \(7, 64\)"):
        lora_formats.merge_state_dict(wide, [(lo, 1.0)])
    sd = _kohya_file(cfg, 2)
    bad = dict(sd, **{f"{PFX}double_blocks_0_img_attn_foo.lora_down.weight": torch.zeros(2, 64)})
    with pytest.raises(ValueError, match="img_attn_foo"):
        lora_formats.from_state_dict(bad)
    mis = dict(sd, **{f"{PFX}double_blocks_0_img_mlp_fc2.lora_up.weight": torch.zeros(64, 3)})
    with pytest.raises(ValueError, match="double_blocks.0.img_mlp.fc2"):
        lora_formats.from_state_dict(mis)
    narrow = DIT_PRESETS["tiny"].replace(hidden_size=32, heads_num=2)
    with pytest.raises(ValueError, match="double_blocks.0.img_attn_proj.*delta W"):
        lora.check(lora_formats.from_state_dict(_kohya_file(narrow, 2)), DIT_PRESETS["tiny"])


def _pool_params(cfg, scale, seed=0):
    """Full-width random weights in seconds: every leaf a view of one N(0, scale^2) pool at its own offset."""
    spec = dit_spec(cfg)
    big = max(count({k: s}) for k, s in spec.items())
    pool = torch.randn(big + 10_000_019, generator=torch.Generator().manual_seed(seed)) * scale
    return {k: pool[o:o + count({k: s})].view(s.shape)
            for i, (k, s) in enumerate(spec.items()) for o in [(i * 7_368_787) % 10_000_019]}


def _meta_diffusers(cfg, params):
    from diffusers import HunyuanVideoTransformer3DModel

    kw = {k: v for k, v in ckpt.diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**kw)
    model.load_state_dict(ckpt.dit_to_diffusers(params, cfg), strict=True, assign=True)  # shares our storage
    return model.eval()


def _ours_vs_diffusers(cfg, params, lo, path):
    """diffusers' HunyuanVideo load_lora_weights on our file (its two steps: lora_state_dict converts,
    load_lora_into_transformer builds the PEFT config and adapters) vs our forward on merged params."""
    from diffusers import HunyuanVideoPipeline

    inp = dit_inputs(cfg, B=1, T=1, H=4, W=4, S=4, lens=(3,))
    model = _meta_diffusers(cfg, params)
    sd, meta = HunyuanVideoPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    HunyuanVideoPipeline.load_lora_into_transformer(sd, transformer=model, metadata=meta)
    with torch.no_grad():
        theirs = model(**diffusers_inputs(**inp))[0]
        ours = dit.forward(lora.merge(params, lo), **inp, cfg=cfg)
        base = dit.forward(params, **inp, cfg=cfg)
    assert rel_err(base, theirs) > 1e-3  # the LoRA changes the output
    return rel_err(ours, theirs)


def test_comfyui_file_loads_in_diffusers_and_gives_our_output(tmp):
    """A comfyui file we write, converted by diffusers' own HunyuanVideo LoRA converter (it hard-codes
    hidden 3072 for single blocks: full width, one block of each kind)."""
    cfg = DIT_PRESETS["tiny"].replace(hidden_size=3072, heads_num=24, rope_dim_list=(16, 56, 56), mlp_width_ratio=1.0,
                                      mm_double_blocks_depth=1, mm_single_blocks_depth=1, text_refiner_depth=1,
                                      guidance_embed=False)
    params = _pool_params(cfg, 0.02)
    lo = _random_lora(cfg, lora.LoraConfig(rank=2, alpha=2.0))
    lo = lora.Lora({k: v * 0.2 for k, v in lo.tensors.items()}, lo.alpha)
    lora_formats.write(lo, tmp / "comfy.safetensors", "comfyui")
    assert _ours_vs_diffusers(cfg, params, lo, tmp / "comfy.safetensors") <= 1e-5


def test_diffusers_file_with_alpha_and_ranks_loads_in_diffusers(tmp):
    """Our diffusers-format file (alpha != rank, mixed ranks, every linear incl. the swapped final
    modulation): PEFT's config comes from our lora_adapter_metadata."""
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg, scale=0.2)
    every = tuple(ckpt.official_spec(cfg))
    lo = _random_lora(cfg, lora.LoraConfig(rank=3, alpha=5.0, targets=tuple(k[:-7] for k in every
                                                                           if k.endswith(".weight"))))
    lo.tensors.update(lora.unfused("final_layer.linear", torch.randn(5, 64) * .3, torch.randn(16 * 4, 5) * .3))
    lo = lora.Lora(lo.tensors, dict(lo.alpha) | {"final_layer.linear": 2.0})
    lora_formats.write(lo, tmp / "d.safetensors", "diffusers")
    assert _ours_vs_diffusers(cfg, params, lo, tmp / "d.safetensors") <= 1e-5
