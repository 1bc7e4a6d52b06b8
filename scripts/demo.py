"""The README's first command: the tiny workflow end to end on this machine (CPU, minutes).

1. a synthetic dataset in the real data.txt / data.json / videos/ format (moving shapes, captions)
2. scripts/extract.py: tiny random VAE + LLaVA-Llama-3 + CLIP written as upstream's folders and
   loaded by the real loaders; latents and text states per clip
3. torchrun --nproc-per-node 2 scripts/train.py tiny: FSDP over 2 gloo ranks, DCP checkpoints,
   metrics.jsonl
4. a loss curve (loss.png) and the learning criterion: the mean loss of the last quarter of
   the steps must be at most 0.9 x the first quarter's (exit code 1 otherwise)
5. scripts/convert.py export of the trained checkpoint, then a LoRA stage: train.py
   tiny-lora (2 ranks) from the exported weights, convert.py export-lora (official kohya file)
6. scripts/sample.py for a training caption (I2V: its clip's first frame as the reference
   image) with the extraction's VAE and text encoders, without and with the LoRA -> mp4s
Every step is a real script run as a user would run it; rerunning resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvfunc.data.synthetic import make_dataset  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    """Folder for everything the demo writes (data/, features/, train/)."""
    clips: int = 8
    """Synthetic clips to generate."""
    ranks: int = 2
    """Training processes (gloo, FSDP over all of them)."""
    steps: int = 60
    """Optimizer steps."""
    lora_steps: int = 20
    """Optimizer steps of the LoRA stage."""
    sample_steps: int = 20
    """Euler steps of the sampling stage."""
    task: str = "t2v"
    """t2v, or i2v (token_replace: first-frame latent and LLaVA image input)."""
    compile: Literal["none", "auto", "inductor", "aot_eager"] = "none"
    """Compile the DiT blocks while training (train.py --compile.backend; auto: Inductor on
    CPU/CUDA). An Inductor compile takes ~30-60 s per block graph on 2 CPU cores."""
    seed: int = 0


def run(cmd: list[str], env: dict | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def plot(losses: list[float], path: Path, width: int = 640, height: int = 360) -> None:
    """Loss per step (grey) and its 8-step moving average (blue) as a PNG."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    pad, lo, hi = 40, min(losses), max(losses)
    xy = lambda i, v: (pad + i * (width - 2 * pad) / max(1, len(losses) - 1),  # noqa: E731
                       height - pad - (v - lo) / max(hi - lo, 1e-9) * (height - 2 * pad))
    d.rectangle([pad, pad, width - pad, height - pad], outline="black")
    d.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 170, 170), width=1)
    avg = [sum(losses[max(0, i - 7):i + 1]) / len(losses[max(0, i - 7):i + 1]) for i in range(len(losses))]
    d.line([xy(i, v) for i, v in enumerate(avg)], fill=(30, 90, 220), width=3)
    d.text((pad, 10), f"training loss, {len(losses)} steps (max {hi:.3f}, min {lo:.3f})", fill="black")
    d.text((pad, height - pad + 10), "step", fill="black")
    img.save(path)


def main(cfg: DemoConfig) -> int:
    out = cfg.out.resolve()
    data_txt = make_dataset(out / "data", num_clips=cfg.clips, num_folders=2, seed=cfg.seed)
    print(f"dataset: {data_txt}", flush=True)
    py = sys.executable
    run([py, "scripts/extract.py", "--data", str(data_txt), "--out", str(out / "features"), "--models.preset",
         "tiny", "--task", cfg.task, "--device", "cpu", "--seed", str(cfg.seed)])
    preset = "tiny-i2v" if cfg.task == "i2v" else "tiny"
    run([py, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.ranks), "scripts/train.py", preset,
         "--features", str(out / "features"), "--out", str(out / "train"), "--steps", str(cfg.steps),
         "--seed", str(cfg.seed), "--compile.backend", cfg.compile], env={"OMP_NUM_THREADS": "1"})
    losses = [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    plot(losses, out / "train" / "loss.png")
    q = max(1, len(losses) // 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    learned = last <= 0.9 * first
    print(f"\nloss: first quarter mean {first:.4f}, last quarter mean {last:.4f} (ratio {last / first:.2f}; "
          f"criterion <= 0.90): {'LEARNED' if learned else 'NOT LEARNED'}")
    print(f"checkpoint: {(out / 'train' / 'checkpoints' / 'latest').read_text()}, metrics: "
          f"{out / 'train' / 'metrics.jsonl'}, curve: {out / 'train' / 'loss.png'}")
    lora_file = finetune_lora(cfg, out, preset)
    base = sample(cfg, out, preset, "samples")
    styled = sample(cfg, out, preset, "samples-lora", "--lora", str(lora_file))
    print(f"samples: {base[0]} (base), {styled[0]} (with the LoRA {lora_file}); the demo's VAE is random, "
          "so the frames show noise")
    return 0 if learned else 1


def finetune_lora(cfg: DemoConfig, out: Path, preset: str) -> Path:
    """Export the pretrained weights, train a rank-4 LoRA on them (2 ranks), export it (official format)."""
    py, dit = sys.executable, out / "train" / "dit.safetensors"
    run([py, "scripts/convert.py", "export", "--checkpoint", str(out / "train" / "checkpoints"), "--target", str(dit),
         "--dtype", "fp32"])
    run([py, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.ranks), "scripts/train.py", f"{preset}-lora",
         "--features", str(out / "features"), "--out", str(out / "lora"), "--init-from", str(dit), "--steps",
         str(cfg.lora_steps), "--seed", str(cfg.seed)], env={"OMP_NUM_THREADS": "1"})
    lora_file = out / "lora" / "lora.safetensors"
    run([py, "scripts/convert.py", "export-lora", "--checkpoint", str(out / "lora" / "checkpoints"), "--target",
         str(lora_file), "--format", "official"])
    return lora_file


def sample(cfg: DemoConfig, out: Path, preset: str, folder: str, *extra: str) -> list[Path]:
    """Sample a training caption from the pretrained weights with the extraction's models."""
    from hvfunc.data.features import read_index

    rec = read_index(out / "features")[0]
    models = out / "features" / "models"
    llm = models / ("text_encoder_i2v" if cfg.task == "i2v" else "text_encoder")
    cmd = [sys.executable, "scripts/sample.py", preset, "--prompt", rec["caption"], "--dit",
           str(out / "train" / "dit.safetensors"), "--models.vae", str(models / "vae"), "--models.text-encoder",
           str(llm), "--models.text-encoder-2", str(models / "text_encoder_2"), "--height", str(rec["height"]),
           "--width", str(rec["width"]), "--frames", str(rec["frames"]), "--steps", str(cfg.sample_steps), "--seed",
           str(cfg.seed), "--out", str(out / folder), *extra]
    if cfg.task == "i2v":  # the clip's first frame as the reference image
        from PIL import Image

        from hvfunc.data.video import decode

        Image.fromarray(decode(rec["source"], [0]).numpy()[0]).save(out / "reference.png")
        cmd += ["--image", str(out / "reference.png")]
    run(cmd, env={"OMP_NUM_THREADS": "1"})
    return sorted((out / folder).glob("*.mp4"))


if __name__ == "__main__":
    sys.exit(main(tyro.cli(DemoConfig)))
