"""Text-encoder folders: the LLaVA -> text_encoder converter (function and CLI) and the loader,
on tiny checkpoints written here; bad paths and configs fail with messages that name them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from text_fixtures import PROMPTS, clip_tokenizer, images, tiny_llama3_tokenizer, write_clip, write_llava

from hvfunc import io
from hvfunc.text import encode_prompts, make_encoders
from hvfunc.text.convert import convert_text_encoder
from hvfunc.text.load import load_encoders

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import convert as convert_cli  # scripts/convert.py


def _upstream_output(llava):
    """What upstream's preprocessing saves: `language_model` as a LlamaForCausalLM, in fp16."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(llava.config.text_config)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    return {k: v.half() for k, v in lm.state_dict().items()}


def _rewrite_weights(src: Path, llava, layout: str) -> None:
    (src / "model.safetensors").unlink()
    sd = llava.state_dict()  # transformers 5.x names: model.language_model.*, lm_head.*
    if layout == "5.x-names":
        io.save_safetensors(sd, src / "model.safetensors")
        return
    keys = list(sd)  # legacy names in two pickled shards with an index, as 4.x folders have them
    legacy = {k.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
              .replace("model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.",
                                                                       "multi_modal_projector."): k for k in keys}
    names = list(legacy)
    shards = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for f, ks in shards.items():
        torch.save({k: sd[legacy[k]].clone() for k in ks}, src / f)
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", ["saved", "5.x-names", "legacy-bin-shards"])
def test_convert_extracts_the_language_model(tmp, layout):
    tok = tiny_llama3_tokenizer()
    src, out = tmp / "llava", tmp / "text_encoder"
    llava = write_llava(src, tok)
    if layout == "saved":
        convert_cli.main(["text-encoder", "--source", str(src), "--target", str(out)])
    else:
        _rewrite_weights(src, llava, layout)
        convert_text_encoder(src, out)
    got = io.load_safetensors(out / "model.safetensors")
    want = _upstream_output(llava)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert {v.dtype for v in got.values()} == {torch.float16}
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(out, output_loading_info=True)  # what upstream's loader calls
    assert type(model).__name__ == "LlamaModel" and not info["missing_keys"]
    assert AutoTokenizer.from_pretrained(out)(PROMPTS)["input_ids"] == tok(PROMPTS)["input_ids"]
    assert sorted(p.name for p in tmp.iterdir()) == ["llava", "text_encoder"]  # no temp folder left


def test_convert_bad_inputs_fail_clearly_and_leave_no_target(tmp, capsys):
    tok = tiny_llama3_tokenizer()
    src, out = tmp / "llava", tmp / "out"
    write_llava(src, tok)
    with pytest.raises(FileNotFoundError, match="folder not found: .*nope"):
        convert_text_encoder(tmp / "nope", out)
    with pytest.raises(SystemExit, match="error: .*folder not found"):
        convert_cli.main(["text-encoder", "--source", str(tmp / "nope"), "--target", str(out)])
    convert_text_encoder(src, out)
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_text_encoder(src, out)
    convert_text_encoder(src, out, overwrite=True)
    with pytest.raises(ValueError, match="model_type 'llama', expected one of \\['llava'\\]"):
        convert_text_encoder(out, tmp / "again")  # an already converted folder
    conf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**conf, "text_config": {**conf["text_config"],
                                                                         "model_type": "mistral"}}))
    with pytest.raises(ValueError, match="text_config.model_type is 'mistral'"):
        convert_text_encoder(src, tmp / "t1")
    (src / "config.json").write_text(json.dumps(conf))
    full = io.load_safetensors(src / "model.safetensors")
    io.save_safetensors({k: v for k, v in full.items() if k != "language_model.model.layers.1.mlp.down_proj.weight"},
                        src / "model.safetensors")
    with pytest.raises(ValueError, match="missing \\(1\\): model.layers.1.mlp.down_proj.weight"):
        convert_text_encoder(src, tmp / "t2")
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        convert_text_encoder(src, tmp / "t3")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing: \\['gone.safetensors'\\]"):
        convert_text_encoder(src, tmp / "t4")
    (src / "model.safetensors.index.json").unlink()
    io.save_safetensors(full, src / "model.safetensors")
    (src / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        convert_text_encoder(src, tmp / "t5")
    assert sorted(p.name for p in tmp.iterdir()) == ["llava", "out"]  # failures leave nothing behind


def test_load_encoders_from_folders_encodes_like_the_models(tmp):
    from transformers import LlamaModel

    tok, ctok = tiny_llama3_tokenizer(), clip_tokenizer()
    llava = write_llava(tmp / "text_encoder_i2v", tok)
    clip = write_clip(tmp / "text_encoder_2", ctok)
    convert_text_encoder(tmp / "text_encoder_i2v", tmp / "text_encoder")

    enc = load_encoders(tmp / "text_encoder", tmp / "text_encoder_2", strict=False, dtype=torch.float32)
    ref_llm = LlamaModel(llava.config.text_config)  # the LLaVA's language model, rounded to fp16 as converted
    ref_llm.load_state_dict({k: v.half().float() for k, v in llava.model.language_model.state_dict().items()})
    ref = make_encoders(ref_llm, tok, clip, ctok, strict=False)
    a, b = encode_prompts(enc, PROMPTS), encode_prompts(ref, PROMPTS)
    assert torch.equal(a.text_states, b.text_states) and torch.equal(a.text_mask, b.text_mask)
    assert torch.equal(a.text_states_2, b.text_states_2)

    enc = load_encoders(tmp / "text_encoder_i2v", tmp / "text_encoder_2", strict=False, dtype=torch.float32)
    ref = make_encoders(llava, tok, clip, ctok, image_processor=enc.image_processor, strict=False)
    ims = images(2)
    a, b = encode_prompts(enc, PROMPTS, images=ims), encode_prompts(ref, PROMPTS, images=ims)
    assert enc.i2v and torch.equal(a.text_states, b.text_states) and torch.equal(a.text_mask, b.text_mask)

    half = load_encoders(tmp / "text_encoder", tmp / "text_encoder_2", strict=False)  # upstream's fp16
    assert next(half.llm.parameters()).dtype == torch.float16 and half.tokenizer.padding_side == "right"
    assert all(not p.requires_grad for p in half.llm.parameters())


def test_load_encoders_bad_inputs(tmp):
    tok, ctok = tiny_llama3_tokenizer(), clip_tokenizer()
    llm, clip = tmp / "llava", tmp / "clip"
    write_llava(llm, tok)
    write_clip(clip, ctok)
    with pytest.raises(FileNotFoundError, match="LLM text encoder folder not found: .*missing"):
        load_encoders(tmp / "missing", clip)
    with pytest.raises(ValueError, match="model_type 'clip', expected one of \\['llama', 'llava'\\]"):
        load_encoders(clip, clip)
    with pytest.raises(ValueError, match="does not match this tokenizer/model: crop_start 103"):
        load_encoders(llm, clip)  # strict: official Llama-3 constants vs a tiny tokenizer
    (llm / "preprocessor_config.json").rename(tmp / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        load_encoders(llm, clip, strict=False)
    (tmp / "preprocessor_config.json").rename(llm / "preprocessor_config.json")
    conf = json.loads((clip / "config.json").read_text())
    (clip / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="clip/config.json is not valid JSON"):
        load_encoders(llm, clip, strict=False)
    conf["text_config"]["num_hidden_layers"] = 3  # the file holds 2 layers
    (clip / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="CLIP text encoder: the checkpoint in .*clip does not fit"):
        load_encoders(llm, clip, strict=False)
    weights = llm / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="cannot load LlavaForConditionalGeneration from .*llava"):
        load_encoders(llm, clip, strict=False)
