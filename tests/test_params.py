"""Param specs: the full T2V model's size and key set, init rules, meta planning."""

import torch

from hvfunc import ckpt, params
from hvfunc.config import DIT_PRESETS, DiTConfig
from hvfunc.dit_spec import dit_spec


def test_full_t2v_has_official_parameter_count_on_meta():
    cfg = DIT_PRESETS["hunyuan-video-t2v"]
    tree = params.abstract(dit_spec(cfg))
    assert all(v.device.type == "meta" for v in tree.values())
    assert params.count(tree) == 12_821_012_544  # reference: hunyuanvideo-official.md 1.1
    assert len(ckpt.official_spec(cfg)) == 856  # official tensor count
    assert params.count(ckpt.official_spec(cfg)) == 12_821_012_544


def test_full_t2v_count_and_shapes_equal_diffusers_on_meta():
    """diffusers' HunyuanVideoTransformer3DModel with the official HYVideo-T/2-cfgdistill config
    (written out here from hunyuanvideo-official.md 1.1, not derived from our DiTConfig), built
    on the meta device: same parameter count, and our spec converted to diffusers' layout has
    exactly its keys and shapes."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
            num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
            rope_theta=256.0, rope_axes_dim=(16, 56, 56))
    assert all(p.device.type == "meta" for p in ref.parameters())
    cfg = DIT_PRESETS["hunyuan-video-t2v"]
    tree = params.abstract(dit_spec(cfg))
    assert params.count(tree) == sum(p.numel() for p in ref.parameters())
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ckpt.dit_to_diffusers(tree, cfg).items()} == theirs


def test_official_shapes_of_full_model():
    s = ckpt.official_spec(DIT_PRESETS["hunyuan-video-t2v"])
    expect = {"img_in.proj.weight": (3072, 16, 1, 2, 2), "double_blocks.0.img_attn_qkv.weight": (9216, 3072),
              "double_blocks.19.txt_mod.linear.weight": (18432, 3072),
              "double_blocks.0.img_attn_q_norm.weight": (128,), "single_blocks.39.linear1.weight": (21504, 3072),
              "single_blocks.0.linear2.weight": (3072, 15360), "single_blocks.0.modulation.linear.weight": (9216, 3072),
              "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight": (9216, 3072),
              "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight": (12288, 3072),
              "txt_in.input_embedder.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
              "guidance_in.mlp.0.weight": (3072, 256), "final_layer.linear.weight": (64, 3072),
              "final_layer.adaLN_modulation.1.weight": (6144, 3072)}
    for k, shape in expect.items():
        assert s[k].shape == shape, k
    assert not any("norm1" in k or "pre_norm" in k for k in s if "double_blocks" in k or "single_blocks" in k)


def test_init_follows_upstream_rules_and_is_deterministic():
    cfg = DIT_PRESETS["tiny"]
    a = params.init(dit_spec(cfg), generator=torch.Generator().manual_seed(3))
    b = params.init(dit_spec(cfg), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k, v in a.items():
        if "_mod.linear" in k or "modulation" in k or k.startswith("final_layer."):
            assert not v.any(), f"{k} must start at zero (upstream zero-init)"
        if k.endswith("norm.weight"):
            assert torch.equal(v, torch.ones_like(v))
    assert a["time_in.mlp.0.weight"].std().item() < 0.03  # N(0, 0.02)
    bound = 1 / 64 ** 0.5
    w = a["double_blocks.0.img_attn_qkv.weight"]
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # nn.Linear default U(+-1/sqrt(fan_in))


def test_config_rejects_inconsistent_values():
    import pytest

    with pytest.raises(ValueError, match="sums to"):
        DiTConfig(hidden_size=64, heads_num=4, rope_dim_list=(4, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden_size=65, heads_num=4)
    with pytest.raises(ValueError, match="preset"):
        from hvfunc.config import dit_preset
        dit_preset("nope")


def test_check_tree_lists_every_problem():
    import pytest

    spec = dit_spec(DIT_PRESETS["tiny"])
    tree = params.init(spec)
    del tree["img_in.proj.bias"]
    tree["extra.weight"] = torch.zeros(1)
    tree["time_in.mlp.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as e:
        params.check_tree(tree, spec)
    msg = str(e.value)
    assert "img_in.proj.bias" in msg and "extra.weight" in msg and "time_in.mlp.0.weight: got (3, 3)" in msg
