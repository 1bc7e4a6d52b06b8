"""Sample HunyuanVideo (T2V / I2V) to mp4: prompts (and images) -> videos with json sidecars.

    python scripts/sample.py tiny --prompt "A red circle moves from left to right." --out runs/samples
    python scripts/sample.py hunyuan-video-t2v --prompt "A cat walks on the grass, realistic style." \\
        --dit ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt \\
        --models.vae ckpts/hunyuan-video-t2v-720p/vae --models.text-encoder ckpts/text_encoder \\
        --models.text-encoder-2 ckpts/text_encoder_2 --out results
    torchrun --nproc-per-node 8 scripts/sample.py hunyuan-video-i2v --prompts-file prompts.txt \\
        --images-file images.txt --parallel.cp 8 ...            # Ulysses: 8 GPUs per video

A preset fills every field with upstream's defaults; flags override them. The tiny presets
without weights build random tiny models (a smoke test; the sidecar says so). Rerunning
the same command skips videos that exist; --overwrite redoes them.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphs.blocks import Compile  # noqa: E402
from hvfunc.data.extract import ModelArgs  # noqa: E402
from hvfunc.sample import SAMPLING_PRESETS  # noqa: E402
from parallel import runtime  # noqa: E402
from parallel.sample_run import run  # noqa: E402
from parallel.sampler import SampleConfig  # noqa: E402

T2V_NEGATIVE = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
                "bad teeth, bad eyes, bad limbs, distortion")  # official T2V default (used only with cfg_scale > 1)
I2V_NEGATIVE = "deformation, a poor composition and deformed video, bad teeth, bad eyes, bad limbs"  # official I2V

# Official T2V (hyvideo/config.py): 720x1280, 129 frames, 50 steps, shift 7, embedded guidance 6.0,
# real CFG off, DiT bf16, VAE and text encoders fp16, 24 fps, VAE tiling on.
_T2V = SampleConfig(model="hunyuan-video-t2v", height=720, width=1280, frames=129, negative_prompt=T2V_NEGATIVE,
                    sampling=SAMPLING_PRESETS["t2v"], compile=Compile(backend="auto", dynamic=False))
# Official I2V: 720p buckets (base 960), shift 7 with --i2v-stability (README's stable recipe) or
# 17 without (dynamic), embedded guidance 6.0 as every official script passes.
_I2V = replace(_T2V, model="hunyuan-video-i2v", height=None, width=None, negative_prompt=I2V_NEGATIVE,
               sampling=SAMPLING_PRESETS["i2v"], bucket_base=960)
# CPU smoke tests: tiny models, 17 frames at 64x96, 8 steps, fp32, eager.
_TINY = replace(_T2V, model="tiny", height=64, width=96, frames=17, sampling=replace(SAMPLING_PRESETS["t2v"], steps=8),
                dtype="fp32", vae_dtype="fp32", text_dtype="fp32", device="cpu", compile=Compile(dynamic=False),
                models=ModelArgs(preset="tiny"), out=Path("runs/samples"))

PRESETS = {
    "tiny": ("Tiny random T2V models on CPU (smoke test; pass --dit and --models.* for trained ones).", _TINY),
    "tiny-i2v": ("Tiny random I2V models on CPU.", replace(_TINY, model="tiny-i2v", height=None, width=None,
                                                           negative_prompt=I2V_NEGATIVE, bucket_base=64,
                                                           sampling=replace(SAMPLING_PRESETS["i2v"], steps=8))),
    "hunyuan-video-t2v": ("HunyuanVideo T2V 720p (official defaults).", _T2V),
    "hunyuan-video-i2v": ("HunyuanVideo-I2V, stable recipe (shift 7, i2v_stability).", _I2V),
    "hunyuan-video-i2v-dynamic": ("HunyuanVideo-I2V, dynamic recipe (shift 17, no i2v_stability).",
                                  replace(_I2V, sampling=SAMPLING_PRESETS["i2v-dynamic"])),
}


def main(argv: list[str] | None = None) -> list[Path]:
    cfg = tyro.extras.overridable_config_cli(PRESETS, args=argv)
    with runtime.user_errors():
        return run(cfg)


if __name__ == "__main__":
    main()
