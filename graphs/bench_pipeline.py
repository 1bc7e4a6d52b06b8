"""End-to-end T2V sampling benchmark: our three stages vs diffusers' HunyuanVideoPipeline.

Same weights, prompt, seed and steps, same process. Text encoders: tiny random Llama + CLIP
written to disk (hvfunc.text.tiny) and loaded once by hvfunc.text.load.load_encoders; the
pipeline gets those same modules and tokenizers. DiT: graphs.bench_dit.models (ours and
diffusers' transformer holding the same weights); VAE: random, ours and diffusers' with the
same weights and upstream's tiling numbers. fp32 throughout.

Stages, timed separately in each run:
- ours: `text` hvfunc.pipeline.encode, `denoise` initial noise + hvfunc.sample.denoise,
  `decode` hvfunc.pipeline.decode;
- diffusers: `text` pipe.encode_prompt, `denoise` pipe(prompt_embeds=..., output_type="latent")
  (its input checks, schedule, noise and loop), `decode` pipe.vae.decode of latents /
  scaling factor (what the pipeline does before its postprocessing, which is left out).
One warm-up run each, then `repeats` runs alternating ours / diffusers (so machine load
drifts hit both); per stage the median, `total` the median of the runs' sums, `ratio` ours /
diffusers total (per stage: `<stage>_ratio` in the JSON). Peak memory: one more untimed run
per row with each stage under graphs.memory.peak_memory (CPU: profiler allocation events;
CUDA: the allocator's peak), bytes above the level at the stage's start, so the loaded
weights are not counted; `peak_mem_mb` is the largest stage's (`<stage>_mem_mb` in the
JSON). All models stay loaded (no freeing between stages). `video_rel_err`: max |ours - diffusers| / max |diffusers| of the
decoded videos [1, 3, frames, height, width] in [-1, 1].
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from graphs import bench
from graphs.bench_dit import DiTBench, models
from graphs.bench_vae import diffusers_vae
from graphs.memory import peak_memory
from hvfunc import params as hp
from hvfunc import pipeline, sample, vae
from hvfunc.config import vae_preset

STAGES = ("text", "denoise", "decode")
COLS = ["bench", "impl", "text_s", "denoise_s", "decode_s", "total_s", "ratio", "peak_mem_mb", "video_rel_err"]


@dataclass(frozen=True, kw_only=True)
class PipelineBench:
    """One T2V prompt sampled end to end (defaults: the CPU small config, the tiny preset widened)."""

    hidden: int = 128
    """DiT width (tiny preset: 64)."""
    heads: int = 4
    """DiT attention heads."""
    double: int = 2
    """DiT double-stream blocks."""
    single: int = 2
    """DiT single-stream blocks."""
    text_width: int = 64
    """Width of the tiny Llama text encoder (the DiT's text_states_dim; multiple of 4); the tiny
    CLIP's is min(768, this) (text_states_dim_2, as graphs.bench_dit sizes it)."""
    vae: str = "tiny"
    """VAE preset (random weights)."""
    frames: int = 17
    """Video frames (4k+1)."""
    height: int = 64
    """Video height in pixels (multiple of 16)."""
    width: int = 96
    """Video width in pixels (multiple of 16)."""
    steps: int = 8
    """Euler steps (shift 7, embedded guidance 6.0, no real CFG)."""
    prompt: str = "A red circle moves from left to right."
    """The prompt both pipelines sample."""
    seed: int = 7
    """Noise seed (CPU generator, as both pipelines draw it)."""
    device: str = "cpu"
    """cpu or cuda."""
    repeats: int = 5
    """Timed runs per implementation (median reported) after one warm-up run each."""
    json: Path | None = None
    """Also write the rows (and the machine) as JSON here."""

    def __post_init__(self) -> None:
        if self.text_width % 4:
            raise ValueError(f"--text-width {self.text_width} must be a multiple of 4 (the tiny Llama has 4 heads)")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")

    def dit(self) -> DiTBench:
        return DiTBench(hidden=self.hidden, heads=self.heads, double=self.double, single=self.single,
                        text_dim=self.text_width, device=self.device)


@dataclass(frozen=True)
class Models:
    text: object  # hvfunc.text.TextEncoders
    dit: dict
    dit_cfg: object  # DiTConfig
    vae: dict
    vae_cfg: object  # VAEConfig
    pipe: object  # diffusers.HunyuanVideoPipeline over the same modules


def build(b: PipelineBench) -> Models:
    """Both pipelines' models, the same weights (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    from hvfunc.text.load import load_encoders
    from hvfunc.text.tiny import write_tiny_encoders

    device = torch.device(b.device)
    with tempfile.TemporaryDirectory() as d:
        llm, clip = write_tiny_encoders(d, width=b.text_width, clip_width=b.dit().model().text_states_dim_2)
        text = load_encoders(llm, clip, strict=False, dtype=torch.float32)  # strict=False: tiny tokenizer
    params, ref = models(b.dit(), device, torch.float32)
    vcfg = vae_preset(b.vae)
    vparams = hp.init(vae.vae_spec(vcfg), generator=torch.Generator().manual_seed(3), device=device)
    ref_vae = diffusers_vae(vcfg, {k: v.cpu() for k, v in vparams.items()}, tiling=vae.Tiling()).to(device)
    pipe = HunyuanVideoPipeline(text_encoder=text.llm, tokenizer=text.tokenizer, transformer=ref, vae=ref_vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text.clip,
                                tokenizer_2=text.clip_tokenizer).to(device)
    pipe.set_progress_bar_config(disable=True)
    return Models(text, params, b.dit().model(), vparams, vcfg, pipe)


Stage = Callable[[str, Callable[[], object]], object]  # stage(name, fn) -> fn(), measuring it
Run = Callable[[Stage], Tensor]  # one run through the stages; returns the decoded video [1, 3, T, H, W]


def timer(device: torch.device, out: dict) -> Stage:
    """out[name] = seconds of the stage, synchronised."""
    def stage(name: str, fn: Callable[[], object]) -> object:
        bench.sync(device)
        start = time.perf_counter()
        res = fn()
        bench.sync(device)
        out[name] = time.perf_counter() - start
        return res
    return stage


def memory(device: torch.device, out: dict) -> Stage:
    """out[name] = peak bytes allocated during the stage above its starting level."""
    def stage(name: str, fn: Callable[[], object]) -> object:
        res, out[name] = peak_memory(fn, device=device)
        return res
    return stage


def ours(b: PipelineBench, m: Models) -> Run:
    device, s = torch.device(b.device), sample.Sampling(steps=b.steps, shift=7.0, guidance=6.0)

    def denoise(cond: pipeline.Conditioning) -> Tensor:
        noise = sample.initial_noise(1, b.frames, b.height, b.width, device=device,
                                     generator=torch.Generator().manual_seed(b.seed))
        return sample.denoise(m.dit, noise, cond.cond, cfg=m.dit_cfg, sampling=s)

    def run(stage: Stage) -> Tensor:
        (cond,) = stage("text", lambda: pipeline.encode(m.text, [b.prompt], negative=None, device=device))
        lat = stage("denoise", lambda: denoise(cond))
        return stage("decode", lambda: pipeline.decode(m.vae, lat, cfg=m.vae_cfg))

    return run


def reference(b: PipelineBench, m: Models) -> Run:
    device, pipe = torch.device(b.device), m.pipe
    tpl = m.text.video_template
    template = {"template": tpl.template, "crop_start": tpl.crop_start}  # diffusers' prompt_template dict

    def denoise(states: Tensor, pooled: Tensor, mask: Tensor) -> Tensor:
        return pipe(prompt_embeds=states, pooled_prompt_embeds=pooled, prompt_attention_mask=mask, height=b.height,
                    width=b.width, num_frames=b.frames, num_inference_steps=b.steps, guidance_scale=6.0,
                    prompt_template=template, generator=torch.Generator().manual_seed(b.seed),
                    output_type="latent", return_dict=False)[0]

    def decode(lat: Tensor) -> Tensor:
        return pipe.vae.decode(lat.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]

    def run(stage: Stage) -> Tensor:
        enc = stage("text", lambda: pipe.encode_prompt(b.prompt, prompt_template=template, device=device,
                                                       dtype=torch.float32))
        lat = stage("denoise", lambda: denoise(*enc))
        return stage("decode", lambda: decode(lat)).float()

    return run


@torch.no_grad()
def run(b: PipelineBench) -> list[dict]:
    m, device = build(b), torch.device(b.device)
    impls = {"hvfunc": ours(b, m), "diffusers": reference(b, m)}
    videos = {k: fn(timer(device, {})) for k, fn in impls.items()}  # warm-up
    runs: dict[str, list[dict]] = {k: [] for k in impls}
    for _ in range(b.repeats):
        for k, fn in impls.items():  # alternating, so load drift on a shared machine hits both
            fn(timer(device, times := {}))
            runs[k].append(times)
    want, rows = videos["diffusers"], []
    for k, fn in impls.items():
        fn(memory(device, mem := {}))
        rows.append(dict(bench=f"t2v {b.frames}x{b.height}x{b.width}, {b.steps} steps", impl=k,
                         **{f"{s}_s": statistics.median(t[s] for t in runs[k]) for s in STAGES},
                         total_s=statistics.median(sum(t.values()) for t in runs[k]),
                         peak_mem_mb=max(mem.values()) / 2**20, **{f"{s}_mem_mb": mem[s] / 2**20 for s in STAGES},
                         video_rel_err=float((videos[k] - want).abs().max() / want.abs().max()),
                         repeats=b.repeats, device=bench.machine()))
    for r in rows[:-1]:
        r |= {f"{s}_ratio": r[f"{s}_s"] / rows[-1][f"{s}_s"] for s in (*STAGES, "total")}
        r["ratio"] = r.pop("total_ratio")
    return rows
