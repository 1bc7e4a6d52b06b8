"""Train the HunyuanVideo DiT on extracted features (flow matching, any dp/cp/tp layout).

    torchrun --nproc-per-node 2 scripts/train.py tiny --features runs/tiny/features --out runs/tiny/train
    torchrun --nproc-per-node 8 scripts/train.py hunyuan-video-t2v --features /data/feats --out /ckpt/run1 \\
        --init-from ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt --parallel.cp 2
    torchrun --nproc-per-node 8 scripts/train.py hunyuan-video-i2v --features /data/i2v-feats --out /ckpt/i2v \\
        --text-dropout 0.1 --image-dropout 0.1   # upstream I2V's --uncond-p / --sematic-cond-drop-p

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

PRESETS = {
    "tiny": ("Tiny DiT on CPU: the README demo (seconds per step).", _TINY),
    "tiny-i2v": ("Tiny I2V DiT on CPU.", replace(_TINY, model="tiny-i2v", guidance=6.016,
                                               timesteps=TimestepSampling(shift=7.0))),
    "hunyuan-video-t2v": ("13B T2V pretraining/finetuning (MindSpeed-MM recipe).", _T2V),
    "hunyuan-video-i2v": ("13B I2V full finetuning.", _I2V),
}


if __name__ == "__main__":
    train(tyro.extras.overridable_config_cli(PRESETS))
