"""The README's first command: the tiny workflow end to end on this machine (CPU, minutes).

1. synthetic datasets in the real data.txt / data.json / videos/ format: `--clips` training clips
   and one LoRA clip, one coloured shape each on a dark background, 17 frames of 64 x 64 (the
   shape's radius 0.18 x 64 = 11 px: about 3 latent pixels, enough of the latent for the loss to see)
2. scripts/train_vae.py: a tiny causal VAE (16 latent channels, 4x time / 8x space, the official
   layout) trained on those clips; its reconstruction PSNR is printed
3. scripts/extract.py (2 ranks) with that VAE and tiny random LLaVA-Llama-3 + CLIP written as
   upstream's folders: latents and text states per clip (training set and LoRA set)
4. torchrun --nproc-per-node 2 scripts/train.py tiny: FSDP over 2 gloo ranks, DCP checkpoints,
   metrics.jsonl; loss.png and criterion 1: the mean loss of the last quarter of the steps is at
   most 0.9 x the first quarter's
5. scripts/convert.py export, then train.py tiny-lora (2 ranks) on the LoRA clip alone from the
   exported weights, convert.py export-lora (official kohya file)
6. scripts/sample.py with the trained VAE and the extraction's text encoders: the training
   caption from the trained and from an untrained DiT, the LoRA caption without and with the LoRA
   -> mp4s; criterion 2: the trained DiT's video is closer to its caption's clip than the
   untrained one's; criterion 3: with the LoRA the LoRA caption's video is closer to the LoRA clip
   than without. "Closer": the shape's centroid, found in every frame as the pixels away from the
   background colour, is nearer the clip's (mean over frames, in pixels; hvfunc.data.synthetic.
   shape_error, which also gives the colour error and the PSNR that are printed with it)
7. frame.png (frames of the clips and of the samples) and loss.png in the output folder
Exit code 1 when a criterion fails (--no-enforce-pictures: only criterion 1 counts, for runs with
fewer steps than the defaults, which are sized so that 2 and 3 are met).
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

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvfunc.data.synthetic import make_dataset, shape_error  # noqa: E402

FORMAT = (64, 64, 24, 17)  # height, width, fps, frames: 17 frames at the trained 24 fps, 5 x 8 x 8 latents
SIZE = 0.18  # the shape's radius / 64 px


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    """Folder for everything the demo writes (data/, vae/, features/, train/, lora/, samples*/)."""
    clips: int = 3
    """Synthetic training clips (one shape each, one caption each)."""
    ranks: int = 2
    """Training processes (gloo, FSDP over all of them)."""
    vae_steps: int = 600
    """Optimizer steps of the demo VAE (scripts/train_vae.py)."""
    steps: int = 500
    """Optimizer steps of the DiT."""
    batch_size: int = 4
    """Clips per rank per step, DiT and LoRA (train.py --batch-size). A tiny step costs about the same at 2 or 4
    (0.37 vs 0.40 s on 2 ranks); at 4 with lr 3e-3, 500 steps told the captions apart as well as 1000 at 2 with
    lr 2e-3."""
    lr: float = 3e-3
    """DiT learning rate (train.py --optim.lr)."""
    lora_steps: int = 200
    """Optimizer steps of the LoRA stage."""
    lora_lr: float = 5e-3
    """LoRA learning rate (train.py tiny-lora --optim.lr)."""
    sample_steps: int = 20
    """Euler steps of the sampling stage."""
    task: str = "t2v"
    """t2v, or i2v (token_replace: first-frame latent and LLaVA image input)."""
    compile: Literal["none", "auto", "inductor", "aot_eager"] = "none"
    """Compile the DiT blocks while training (train.py --compile.backend; auto: Inductor on
    CPU/CUDA). An Inductor compile takes ~30-60 s per block graph on 2 CPU cores."""
    enforce_pictures: bool = True
    """Exit 1 when criterion 2 or 3 (the pictures) fails; --no-enforce-pictures reports them only (runs with
    fewer steps than the defaults). The loss criterion always counts."""
    seed: int = 0


def run(cmd: list[str], env: dict | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def plot(losses: list[float], path: Path, width: int = 480, height: int = 270) -> None:
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
    img.save(path, optimize=True)


def main(cfg: DemoConfig) -> int:
    out, py = cfg.out.resolve(), sys.executable
    train_txt = make_dataset(out / "data", num_clips=cfg.clips, seed=cfg.seed, formats=(FORMAT,), movers=1, size=SIZE)
    lora_txt = make_dataset(out / "lora_data", num_clips=1, seed=cfg.seed + 1, formats=(FORMAT,), movers=1, size=SIZE)
    both = out / "vae_data.txt"  # the VAE learns every clip the demo will decode
    both.write_text(train_txt.read_text() + lora_txt.read_text())
    print(f"datasets: {train_txt} ({cfg.clips} clips), {lora_txt} (the LoRA clip)", flush=True)
    print("\n== VAE: train a tiny causal VAE on the clips", flush=True)
    run([py, "scripts/train_vae.py", "--data", str(both), "--out", str(out / "vae"), "--steps", str(cfg.vae_steps),
         "--seed", str(cfg.seed), "--preset", "demo", "--image-fraction", "0.5", "--no-progress"])
    ev = json.loads((out / "vae" / "eval.json").read_text())
    print(f"VAE reconstruction PSNR of the clips: {ev['before']['psnr']:.1f} dB at init -> {ev['after']['psnr']:.1f} dB "
          f"after {cfg.vae_steps} steps (each clip's flat mean colour, no shape drawn: {ev['after']['psnr_flat']:.1f} dB)",
          flush=True)
    models = extract(cfg, out, train_txt, "features")
    extract(cfg, out, lora_txt, "lora_features", models)
    learned = pretrain(cfg, out)
    preset = "tiny-i2v" if cfg.task == "i2v" else "tiny"
    lora_file = finetune_lora(cfg, out, preset)
    pictures = check_pictures(cfg, out, preset, lora_file)
    ok = learned and (pictures or not cfg.enforce_pictures)
    verdict = "all criteria met" if learned and pictures else "a criterion failed"
    print(f"\n{verdict}{'' if cfg.enforce_pictures else ' (criteria 2 and 3 reported, not enforced)'}; "
          f"everything is under {out}")
    return 0 if ok else 1


def extract(cfg: DemoConfig, out: Path, data: Path, folder: str, models: Path | None = None) -> Path:
    """extract.py (2 ranks) with the demo VAE; text encoders: tiny random ones, or those of `models`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.ranks), "scripts/extract.py",
           "--data", str(data), "--out", str(out / folder), "--models.preset", "tiny", "--models.vae",
           str(out / "vae" / "vae"), "--task", cfg.task, "--device", "cpu", "--seed", str(cfg.seed)]
    if models is not None:
        cmd += ["--models.text-encoder", str(models / llm_name(cfg)), "--models.text-encoder-2",
                str(models / "text_encoder_2")]
    run(cmd, env={"OMP_NUM_THREADS": "1"})
    return out / folder / "models"


def llm_name(cfg: DemoConfig) -> str:
    return "text_encoder_i2v" if cfg.task == "i2v" else "text_encoder"


def pretrain(cfg: DemoConfig, out: Path) -> bool:
    """train.py (2 ranks), the loss plot and criterion 1."""
    preset = "tiny-i2v" if cfg.task == "i2v" else "tiny"
    print("\n== DiT: pretrain on the clips' features", flush=True)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.ranks), "scripts/train.py",
         preset, "--features", str(out / "features"), "--out", str(out / "train"), "--steps", str(cfg.steps),
         "--optim.lr", str(cfg.lr), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed), "--compile.backend",
         cfg.compile],
        env={"OMP_NUM_THREADS": "1"})
    losses = [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    plot(losses, out / "loss.png")
    q = max(1, len(losses) // 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    learned = last <= 0.9 * first
    print(f"\ncriterion 1, loss: first quarter mean {first:.4f}, last quarter mean {last:.4f} (ratio "
          f"{last / first:.2f}; criterion <= 0.90): {'LEARNED' if learned else 'NOT LEARNED'}")
    print(f"checkpoint: {(out / 'train' / 'checkpoints' / 'latest').read_text()}, metrics: "
          f"{out / 'train' / 'metrics.jsonl'}, curve: {out / 'loss.png'}", flush=True)
    return learned


def finetune_lora(cfg: DemoConfig, out: Path, preset: str) -> Path:
    """Export the pretrained weights, train a rank-4 LoRA on them on the LoRA clip (2 ranks), export it."""
    py, dit = sys.executable, out / "train" / "dit.safetensors"
    print("\n== LoRA: finetune the pretrained DiT on the LoRA clip alone", flush=True)
    run([py, "scripts/convert.py", "export", "--checkpoint", str(out / "train" / "checkpoints"), "--target", str(dit),
         "--dtype", "fp32"])
    run([py, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.ranks), "scripts/train.py", f"{preset}-lora",
         "--features", str(out / "lora_features"), "--out", str(out / "lora"), "--init-from", str(dit), "--steps",
         str(cfg.lora_steps), "--optim.lr", str(cfg.lora_lr), "--batch-size", str(cfg.batch_size), "--seed",
         str(cfg.seed)], env={"OMP_NUM_THREADS": "1"})
    lora_file = out / "lora" / "lora.safetensors"
    run([py, "scripts/convert.py", "export-lora", "--checkpoint", str(out / "lora" / "checkpoints"), "--target",
         str(lora_file), "--format", "official"])
    return lora_file


def sample(cfg: DemoConfig, out: Path, preset: str, folder: str, rec: dict, *extra: str) -> np.ndarray:
    """sample.py for a clip's caption (I2V: its first frame as the reference image) with the demo VAE and
    the extraction's text encoders; returns the video's uint8 frames [T, H, W, 3]."""
    from hvfunc.data.video import decode

    models = out / "features" / "models"
    cmd = [sys.executable, "scripts/sample.py", preset, "--prompt", rec["caption"], "--models.vae",
           str(out / "vae" / "vae"), "--models.text-encoder", str(models / llm_name(cfg)), "--models.text-encoder-2",
           str(models / "text_encoder_2"), "--height", str(rec["height"]), "--width", str(rec["width"]),
           "--frames", str(rec["frames"]), "--steps", str(cfg.sample_steps), "--seed", str(cfg.seed), "--out",
           str(out / folder), "--guidance", str(train_guidance(out)), *extra]
    if cfg.task == "i2v":  # the clip's first frame as the reference image
        from PIL import Image

        Image.fromarray(decode(rec["source"], [0]).numpy()[0]).save(out / f"{folder}-reference.png")
        cmd += ["--image", str(out / f"{folder}-reference.png")]
    run(cmd, env={"OMP_NUM_THREADS": "1"})
    video = min((out / folder).glob("*.mp4"))
    print(f"video: {video}", flush=True)
    return decode(video, list(range(rec["frames"]))).numpy()


def train_guidance(out: Path) -> float:
    """The embedded guidance the DiT was trained with (its config.json): the tiny DiT never saw another."""
    return json.loads((out / "train" / "config.json").read_text())["guidance"]


def clip(rec: dict) -> np.ndarray:
    """The frames of a feature record's clip as extraction read them (FORMAT: 24 fps, no resampling)."""
    from hvfunc.data.video import decode

    return decode(rec["source"], list(range(rec["frames"]))).numpy()


def closer(name: str, better: tuple[str, np.ndarray], worse: tuple[str, np.ndarray], target: np.ndarray) -> bool:
    a, b = shape_error(better[1], target), shape_error(worse[1], target)
    ok = a["position_px"] < b["position_px"]
    for label, e in ((better[0], a), (worse[0], b)):
        print(f"  {label:>28}: shape centroid {e['position_px']:5.1f} px from the clip's (mean over frames), colour "
              f"off by {e['colour']:5.1f} of 255, PSNR {e['psnr']:5.1f} dB")
    print(f"{name}: {'MET' if ok else 'NOT MET'} ({a['position_px']:.1f} px < {b['position_px']:.1f} px needed)",
          flush=True)
    return ok


def check_pictures(cfg: DemoConfig, out: Path, preset: str, lora_file: Path) -> bool:
    """Criteria 2 and 3 from the sampled videos; frame.png."""
    from hvfunc.data.features import read_index

    rec, lora_rec = read_index(out / "features")[0], read_index(out / "lora_features")[0]
    dit = ["--dit", str(out / "train" / "dit.safetensors")]
    print("\n== samples", flush=True)
    trained = sample(cfg, out, preset, "samples", rec, *dit)
    untrained = sample(cfg, out, preset, "samples-untrained", rec)
    base = sample(cfg, out, preset, "samples-lora-caption", lora_rec, *dit)
    styled = sample(cfg, out, preset, "samples-lora", lora_rec, *dit, "--lora", str(lora_file))
    print(f"\ncriterion 2, the trained DiT draws its training caption {rec['caption']!r}:")
    learned = closer("criterion 2", ("trained DiT", trained), ("untrained DiT", untrained), clip(rec))
    print(f"criterion 3, the LoRA draws its clip {lora_rec['caption']!r}:")
    tuned = closer("criterion 3", ("with the LoRA", styled), ("without the LoRA", base), clip(lora_rec))
    frames(out / "frame.png", [clip(rec), trained, untrained, clip(lora_rec), base, styled])
    print(f"frames: {out / 'frame.png'} (rows: training clip, trained DiT, untrained DiT, LoRA clip, without and "
          "with the LoRA; frames 0, 8, 16)")
    return learned and tuned


def frames(path: Path, videos: list[np.ndarray], scale: int = 2) -> None:
    """Frames 0, T/2, T-1 of each video side by side, one video a row, `scale` x nearest."""
    from PIL import Image

    T = videos[0].shape[0]
    rows = [np.concatenate([v[t] for t in (0, T // 2, T - 1)], 1) for v in videos]
    img = np.concatenate(rows, 0).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(img).save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main(tyro.cli(DemoConfig)))
