"""Text conditioning: the official templates and their Llama-3 token counts, diffusers'
encode_prompt as the oracle (T2V, I2V, uncond, truncation), the kept tokens themselves."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from reference import rel_err
from text_fixtures import (
    PROMPTS,
    clip_tokenizer,
    image_processor,
    images,
    llama3_tokenizer,
    tiny_clip,
    tiny_llama,
    tiny_llama3_tokenizer,
    tiny_llava,
)

from hvfunc.text import TEMPLATES, black_images, encode_prompts, make_encoders
from hvfunc.text import templates as T

# The official strings, copied verbatim from HunyuanVideo (fa14b001) and HunyuanVideo-I2V
# (e44c1d95) hyvideo/constants.py: an independent copy of what hvfunc.text.templates builds.
OFFICIAL = {
    "dit-llm-encode": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, texture, "
        "quantity, text, spatial relationships of the objects and background:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "dit-llm-encode-video": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "dit-llm-encode-i2v": (
        "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the image by detailing the color, shape, size, texture, "
        "quantity, text, spatial relationships of the objects and background:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "dit-llm-encode-video-i2v": (
        "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects according to the reference image: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
OFFICIAL_I2V = {"image_emb_start": 5, "image_emb_end": 581, "image_emb_len": 576, "double_return_token_id": 271}
TOKENIZERS = {"llama3": llama3_tokenizer, "tiny": tiny_llama3_tokenizer}


def test_templates_are_the_official_strings_and_constants():
    from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video as t2v
    from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video_image2video as i2v

    assert {k: t.template for k, t in TEMPLATES.items()} == OFFICIAL
    assert [TEMPLATES[k].crop_start for k in OFFICIAL] == [36, 95, 36, 103]
    for k in ("dit-llm-encode-i2v", "dit-llm-encode-video-i2v"):
        assert {f: getattr(TEMPLATES[k], f) for f in OFFICIAL_I2V} == OFFICIAL_I2V
    # diffusers ships the two video templates only, and the same strings and constants.
    assert t2v.DEFAULT_PROMPT_TEMPLATE == {"template": OFFICIAL["dit-llm-encode-video"], "crop_start": 95}
    ours = TEMPLATES["dit-llm-encode-video-i2v"]
    assert i2v.DEFAULT_PROMPT_TEMPLATE == {"template": ours.template, "crop_start": 103, "image_emb_start": 5,
                                           "image_emb_end": 581, "image_emb_len": 576}


def test_official_constants_are_llama3_token_counts():
    """Under the real Llama-3 tokenizer (+ xtuner's <image>, <pad>) the official constants hold,
    except upstream's unused I2V image template (its prefix is 38 tokens, not 36)."""
    tok = llama3_tokenizer()
    for k in ("dit-llm-encode", "dit-llm-encode-video", "dit-llm-encode-video-i2v"):
        assert T.fit(TEMPLATES[k], tok, image_tokens=576) == TEMPLATES[k]
    assert T.measure(TEMPLATES["dit-llm-encode-i2v"], tok).crop_start == 38
    with pytest.raises(ValueError, match="crop_start 36 \\(tokenizer gives 38\\)"):
        T.fit(TEMPLATES["dit-llm-encode-i2v"], tok)
    with pytest.raises(ValueError, match="crop_start 95 \\(tokenizer gives"):
        T.fit(TEMPLATES["dit-llm-encode-video"], tiny_llama3_tokenizer())
    with pytest.raises(ValueError, match="unknown prompt template"):
        T.template("dit-llm-encode-audio")


@functools.cache
def _t2v(tok_name: str, layers: int = 4, skip: int = 2, text_len: int = 256):
    tok, ctok = TOKENIZERS[tok_name](), clip_tokenizer()
    return make_encoders(tiny_llama(tok, layers=layers), tok, tiny_clip(ctok), ctok, strict=tok_name == "llama3",
                         skip=skip, text_len=text_len)


@functools.cache
def _i2v(tok_name: str, layers: int = 4, skip: int = 2, text_len: int = 256):
    tok, ctok = TOKENIZERS[tok_name](), clip_tokenizer()
    size = 336 if tok_name == "llama3" else 56  # 576 image features (the real geometry) or 16
    return make_encoders(tiny_llava(tok, image_size=size, layers=layers), tok, tiny_clip(ctok), ctok,
                         image_processor=image_processor(size), strict=tok_name == "llama3", skip=skip,
                         text_len=text_len)


def _diffusers_template(tpl: T.PromptTemplate) -> dict:
    keys = ("crop_start", "image_emb_start", "image_emb_end", "image_emb_len") if tpl.i2v else ("crop_start",)
    return {"template": tpl.template, **{k: getattr(tpl, k) for k in keys}}


@pytest.mark.parametrize("tok_name", ["llama3", "tiny"])
def test_t2v_equals_diffusers_encode_prompt(tok_name):
    from diffusers import HunyuanVideoPipeline

    enc = _t2v(tok_name)
    pipe = HunyuanVideoPipeline(text_encoder=enc.llm, tokenizer=enc.tokenizer, transformer=None, vae=None,
                                scheduler=None, text_encoder_2=enc.clip, tokenizer_2=enc.clip_tokenizer)
    for video, tpl in ((True, enc.video_template), (False, enc.image_template)):
        ours = encode_prompts(enc, PROMPTS, video=video)
        states, pooled, mask = pipe.encode_prompt(PROMPTS, prompt_template=_diffusers_template(tpl), device="cpu",
                                                  dtype=torch.float32)
        assert ours.text_states.shape == (2, 256, 32) and ours.text_states_2.shape == (2, 24)
        assert torch.equal(ours.text_states, states) and torch.equal(ours.text_states_2, pooled)  # bit-exact
        assert torch.equal(ours.text_mask, mask) and ours.text_mask.dtype == torch.long
        assert ours.text_mask[0].sum() < ours.text_mask[1].sum()  # different lengths, right-padded
    one_by_one = encode_prompts(enc, PROMPTS, batch_size=1)
    assert torch.equal(one_by_one.text_states, ours_video := encode_prompts(enc, PROMPTS).text_states)
    assert encode_prompts(enc, PROMPTS, dtype=torch.bfloat16).text_states.dtype == torch.bfloat16
    assert not torch.equal(ours_video[0], ours_video[1])


@pytest.mark.parametrize("tok_name", ["llama3", "tiny"])
def test_i2v_equals_diffusers_encode_prompt(tok_name):
    """Image + prompt (cond) and black image + negative prompt (uncond), batch of 2."""
    from diffusers import HunyuanVideoImageToVideoPipeline

    enc = _i2v(tok_name)
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=enc.llm, tokenizer=enc.tokenizer, transformer=None, vae=None, scheduler=None,
        text_encoder_2=enc.clip, tokenizer_2=enc.clip_tokenizer, image_processor=enc.image_processor)
    ims = images(2)
    negative = ["deformation, a poor composition and deformed video, bad teeth, bad eyes, bad limbs", ""]
    n_img = enc.video_template.image_emb_len // 4
    for prompts, ims_ in ((PROMPTS, ims), (negative, black_images(ims))):
        ours = encode_prompts(enc, prompts, images=ims_)
        states, pooled, mask = pipe.encode_prompt(ims_, prompts, prompt_template=_diffusers_template(enc.video_template),
                                                  device="cpu", dtype=torch.float32, image_embed_interleave=4)
        assert ours.text_states.shape == (2, n_img + enc.text_len - 4, 32)
        assert torch.equal(ours.text_states, states) and torch.equal(ours.text_states_2, pooled)  # bit-exact
        assert torch.equal(ours.text_mask, mask) and bool(ours.text_mask[:, :n_img].all())
    if tok_name == "llama3":
        assert ours.text_states.shape == (2, 144 + 252, 32)  # upstream's 144 image + 252 text tokens
    black = black_images(ims)
    assert black[0].size == ims[0].size and black[0].getextrema() == ((0, 0),) * 3


def _rows(tok, prompts, tail: str, text_len: int) -> torch.Tensor:
    """Expected token ids of the kept text rows: prompt tokens, the kept tail, padding."""
    out = []
    for p in prompts:  # tokenized apart: "style." + "\n\n" would merge into one Llama-3 token
        ids = tok(p, add_special_tokens=False)["input_ids"] + tok(tail, add_special_tokens=False)["input_ids"]
        out.append(ids + [tok.pad_token_id] * (text_len - len(ids)))
    return torch.tensor(out)


@pytest.mark.parametrize("tok_name", ["llama3", "tiny"])
def test_cropped_states_are_exactly_the_prompt_tokens(tok_name):
    """Structural invariant: with 2 layers and skip 2, hidden_states[-3] is the embedding layer,
    so each kept state names its token. T2V keeps prompt + <|eot_id|> + padding; I2V keeps
    every 4th image feature, then prompt + "\\n\\n" + padding (the assistant header removed)."""
    tok = TOKENIZERS[tok_name]()
    enc = _t2v(tok_name, layers=2)
    emb = enc.llm.get_input_embeddings().weight
    ours = encode_prompts(enc, PROMPTS)
    assert torch.equal(ours.text_states, emb[_rows(tok, PROMPTS, "<|eot_id|>", 256)])

    enc = _i2v(tok_name, layers=2)
    llava = getattr(enc.llm, "model", enc.llm)  # transformers 5.x nests the towers under .model
    ims = images(2)
    ours = encode_prompts(enc, PROMPTS, images=ims)
    pixels = enc.image_processor(ims, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = llava.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = llava.multi_modal_projector(feats)
    n = feats.shape[1] // 4
    assert torch.equal(ours.text_states[:, :n], feats[:, ::4])
    text_emb = enc.llm.get_input_embeddings().weight[_rows(tok, PROMPTS, "\n\n", 252)]
    assert torch.equal(ours.text_states[:, n:], text_emb)
    assert ours.text_mask[:, n:].sum(1).tolist() == [len(tok(p, add_special_tokens=False)["input_ids"]) + 1
                                                    for p in PROMPTS]


def test_layer_selection_is_the_output_of_layer_n_minus_skip():
    """hidden_states[-3] of 4 layers == the last state of the first 2 layers without final norm."""
    enc = _t2v("tiny")
    cut = copy.deepcopy(enc.llm)
    cut.layers = cut.layers[:2]
    cut.norm = torch.nn.Identity()
    tpl = enc.video_template
    ids = enc.tokenizer([tpl.format(p) for p in PROMPTS], max_length=256 + tpl.crop_start, padding="max_length",
                        truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = cut(**ids).last_hidden_state[:, tpl.crop_start:]
    assert torch.equal(encode_prompts(enc, PROMPTS).text_states, want)


def test_i2v_batch_with_truncated_prompt_follows_upstream_per_row():
    """Upstream (and diffusers) handle a truncated I2V prompt only at batch 1 (drop the last 4
    tokens); hvfunc does the same per row in any batch."""
    from diffusers import HunyuanVideoImageToVideoPipeline

    enc = _i2v("tiny", text_len=24)
    prompts, ims = ["A cat.", PROMPTS[1]], images(2)
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=enc.llm, tokenizer=enc.tokenizer, transformer=None, vae=None, scheduler=None,
        text_encoder_2=enc.clip, tokenizer_2=enc.clip_tokenizer, image_processor=enc.image_processor)
    with pytest.warns(UserWarning, match="1 of 2 prompts exceed"):
        ours = encode_prompts(enc, prompts, images=ims)
    ref = [pipe.encode_prompt(im, [p], prompt_template=_diffusers_template(enc.video_template), device="cpu",
                              max_sequence_length=24, dtype=torch.float32, image_embed_interleave=4)
           for p, im in zip(prompts, ims)]
    assert torch.equal(ours.text_mask, torch.cat([r[2] for r in ref]))
    # batch of 2 (one row truncated) vs diffusers at batch 1: not bit-exact (measured 5.9e-7)
    assert rel_err(ours.text_states, torch.cat([r[0] for r in ref])) <= 1e-6
    assert bool(ours.text_mask[1].all()) and not bool(ours.text_mask[0].all())


def test_encode_prompts_rejects_bad_input():
    t2v, i2v = _t2v("tiny"), _i2v("tiny")
    ims = images(2)
    with pytest.raises(ValueError, match="one reference image per prompt: got None"):
        encode_prompts(i2v, PROMPTS)
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        encode_prompts(i2v, PROMPTS, images=ims[:1])
    with pytest.raises(ValueError, match="video template only"):
        encode_prompts(i2v, PROMPTS, images=ims, video=False)
    with pytest.raises(ValueError, match="not a LLaVA"):
        encode_prompts(t2v, PROMPTS, images=ims)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(t2v, [])
    with pytest.raises(ValueError, match="exactly one <image> token"):
        encode_prompts(i2v, ["a <image> of a cat", "a dog"], images=ims)
    with pytest.raises(ValueError, match="needs its CLIPImageProcessor"):
        make_encoders(i2v.llm, i2v.tokenizer, i2v.clip, i2v.clip_tokenizer, strict=False)
    with pytest.raises(ValueError, match="black image like a str"):
        black_images(["x"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encoders_visit_the_device_only_while_encoding():
    for enc, kw in ((_t2v("tiny"), {}), (_i2v("tiny"), {"images": images(2)})):
        cpu = encode_prompts(enc, PROMPTS, **kw)
        gpu = encode_prompts(enc, PROMPTS, device="cuda", **kw)
        assert gpu.text_states.is_cuda and gpu.text_mask.is_cuda and gpu.text_states_2.is_cuda
        assert all(p.device.type == "cpu" for m in (enc.llm, enc.clip) for p in m.parameters())
        assert rel_err(gpu.text_states.cpu(), cpu.text_states) <= 1e-4
        assert torch.equal(gpu.text_mask.cpu(), cpu.text_mask)
        kept = encode_prompts(enc, PROMPTS, device="cuda", offload=False, **kw)
        assert next(enc.llm.parameters()).is_cuda and torch.equal(kept.text_mask.cpu(), cpu.text_mask)
        enc.llm.cpu(), enc.clip.cpu()
