"""Train the HunyuanVideo DiT on extracted features (flow matching, any dp/cp/tp layout).

    torchrun --nproc-per-node 2 scripts/train.py tiny --features runs/tiny/features --out runs/tiny/train
    torchrun --nproc-per-node 8 scripts/train.py hunyuan-video-t2v --features /data/feats --out /ckpt/run1 \\
        --init-from ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt --parallel.cp 2
    torchrun --nproc-per-node 8 scripts/train.py hunyuan-video-i2v --features /data/i2v-feats --out /ckpt/i2v \\
        --text-dropout 0.1 --image-dropout 0.1   # upstream I2V's --uncond-p / --sematic-cond-drop-p
    torchrun --nproc-per-node 8 scripts/train.py hunyuan-video-i2v-lora --features /data/i2v-feats \
        --out /ckpt/i2v-lora --init-from ckpts/hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt

Sample videos every 500 steps (prompts encoded by extract.py --validation-prompts prompts.txt):
    ... --validation.prompts prompts.txt --validation.every 500 --validation.vae ckpts/hunyuan-video-t2v-720p/vae

A preset fills every field; flags override them. Rerunning the same command resumes from
the newest complete checkpoint in --out.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphs.blocks import Recompute  # noqa: E402
from hvfunc.flow import TimestepSampling  # noqa: E402
from parallel import runtime  # noqa: E402
from parallel.lora_train import LoraTrain  # noqa: E402
from parallel.optim import OptimConfig  # noqa: E402
from parallel.trainer import TrainConfig, train  # noqa: E402

_TINY = TrainConfig(features=Path("runs/tiny/features"), out=Path("runs/tiny/train"), model="tiny", steps=60,
                    batch_size=2, dtype="fp32", device="cpu", checkpoint_every=20,
                    optim=OptimConfig(lr=2e-3, warmup_steps=5, grad_clip=1.0))
# MindSpeed-MM's T2V recipe: 5e-6 constant, wd 0.01, clip 1.0, bf16, full recompute of every
# block, logit-normal sigmas without shift, guidance input 1.0 (x1000).
_T2V = TrainConfig(features=Path("runs/t2v/features"), out=Path("runs/t2v/train"), model="hunyuan-video-t2v",
                   steps=5000, batch_size=1, dtype="bf16", guidance=1.0, checkpoint_every=500,
                   optim=OptimConfig(lr=5e-6, weight_decay=0.01, grad_clip=1.0, total_steps=5000),
                   recompute=Recompute(double_full=20, single_full=40))
# I2V (token_replace): sigmas shifted by 7, guidance 6.0 fed as bf16 does upstream (6016).
_I2V = replace(_T2V, features=Path("runs/i2v/features"), out=Path("runs/i2v/train"), model="hunyuan-video-i2v",
               guidance=6.016, timesteps=TimestepSampling(shift=7.0))

# LoRA, the official I2V recipe (hunyuanvideo-official.md section 5, PEFT in train_image2video_lora.py):
# r 64, alpha 64, Gaussian A / zero B on the official targets (326.6M parameters), AdamW lr 1e-4,
# DeepSpeed WarmupLR over 500 steps from 1e-6 (its default log shape), wd 0, clip 1.0, bf16,
# lognorm t shifted by 7, guidance 6.016; token_replace with the loss on frames 1.. (the model's).
_LORA_I2V = replace(_I2V, out=Path("runs/i2v/lora"), steps=2000, checkpoint_every=500,
                    lora=LoraTrain(enabled=True, rank=64, alpha=64.0, init="gaussian"),
                    optim=OptimConfig(lr=1e-4, warmup_steps=500, warmup_start_lr=1e-6, warmup_shape="log",
                                      weight_decay=0.0, grad_clip=1.0))
# T2V LoRA: musubi-tuner's documented HunyuanVideo defaults (docs/hunyuan_video.md reference command:
# --network_dim 32, --learning_rate 2e-4, --timestep_sampling shift --discrete_flow_shift 7.0, bf16;
# --network_alpha defaults to 1; targets: the linears of the double/single blocks without img_mod,
# txt_mod and modulation, its default exclude_patterns; guidance_scale 1.0; max_grad_norm 1.0; no
# warm-up; kohya's LoRA init: kaiming-uniform A, zero B). musubi's adamw8bit is plain AdamW here (fp32
# state) with bitsandbytes' default weight decay 0.01.
_LORA_T2V = replace(_T2V, out=Path("runs/t2v/lora"), steps=2000, checkpoint_every=500, guidance=1.0,
                    timesteps=TimestepSampling(shift=7.0),
                    lora=LoraTrain(enabled=True, rank=32, alpha=1.0, init="kaiming", targets=(
                        "img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2", "txt_attn_qkv",
                        "txt_attn_proj", "txt_mlp.fc1", "txt_mlp.fc2", "linear1", "linear2")),
                    optim=OptimConfig(lr=2e-4, weight_decay=0.01, grad_clip=1.0))
_TINY_LORA = replace(_TINY, out=Path("runs/tiny/lora"), lora=LoraTrain(enabled=True, rank=4, alpha=4.0))
_TINY_I2V = replace(_TINY, model="tiny-i2v", guidance=6.016, timesteps=TimestepSampling(shift=7.0))

PRESETS = {
    "tiny": ("Tiny DiT on CPU: the README demo (seconds per step).", _TINY),
    "tiny-i2v": ("Tiny I2V DiT on CPU.", _TINY_I2V),
    "tiny-lora": ("Tiny DiT LoRA (r 4) on CPU.", _TINY_LORA),
    "tiny-i2v-lora": ("Tiny I2V DiT LoRA (r 4) on CPU.", replace(_TINY_I2V, out=Path("runs/tiny/i2v-lora"),
                                                                lora=_TINY_LORA.lora)),
    "hunyuan-video-t2v": ("13B T2V pretraining/finetuning (MindSpeed-MM recipe).", _T2V),
    "hunyuan-video-i2v": ("13B I2V full finetuning.", _I2V),
    "hunyuan-video-i2v-lora": ("13B I2V LoRA (official recipe: r 64, lr 1e-4, frozen bf16 base).", _LORA_I2V),
    "hunyuan-video-t2v-lora": ("13B T2V LoRA (musubi-tuner's defaults: r 32, alpha 1, lr 2e-4).", _LORA_T2V),
}


if __name__ == "__main__":
    cfg = tyro.extras.overridable_config_cli(PRESETS)
    with runtime.user_errors():
        train(cfg)
