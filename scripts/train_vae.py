"""Train a tiny causal VAE on raw clips (one process) and write it in the official VAE layout.

    python scripts/train_vae.py --data runs/demo/data/data.txt --out runs/demo/vae --preset demo

writes <out>/vae/pytorch_model.pt + config.json (pass it as --models.vae to extract.py and
sample.py), <out>/metrics.jsonl (loss per step) and <out>/eval.json (reconstruction PSNR of
every clip before and after training, and the std of the scaled latents the DiT will see).
"""

from __future__ import annotations

import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel import runtime
from parallel.vae_train import VAETrainConfig, train_vae

if __name__ == "__main__":
    with runtime.user_errors():
        print(f"VAE: {train_vae(tyro.cli(VAETrainConfig))}")
