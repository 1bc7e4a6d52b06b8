"""Checkpoint conversion CLI: one subcommand per model part.

    python scripts/convert.py dit --source mp_rank_00_model_states.pt --target dit.safetensors
    python scripts/convert.py dit --source dit.safetensors --target out.pt --to official
    python scripts/convert.py dit --source hunyuanvideo/transformer --target dit.safetensors
    python scripts/convert.py dit --source dit.safetensors --target transformer/ --to diffusers

    python scripts/convert.py export --checkpoint runs/t2v/train/checkpoints --target dit.pt --to official
    python scripts/convert.py export-lora --checkpoint runs/i2v/lora/checkpoints --target lora.safetensors \
        --format comfyui
    python scripts/convert.py text-encoder --source llava-llama-3-8b-v1_1-transformers --target ckpts/text_encoder

    python scripts/convert.py lora --source my_musubi_lora.safetensors --target comfy.safetensors --format comfyui
    python scripts/convert.py merge-lora --base dit.safetensors --lora embrace_kohaya_weights.safetensors:1.0 \
        --lora other.safetensors:0.5 --target merged.safetensors

DiT: the source format is detected from its keys; every conversion is exact (reshapes,
splits, concatenations). Text encoder: upstream's extraction of the LLaVA language model
and tokenizer (fp16). LoRA: any format to any other (docs/lora.md), and merges into DiT weights
in fp32, written in the base dtype. Outputs are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hvfunc import ckpt, io  # noqa: E402
from hvfunc.config import DIT_PRESETS, dit_preset  # noqa: E402

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class DitArgs:
    """Convert DiT (transformer) weights."""

    source: Path
    """Official .pt (`module`/`ema` wrapper or bare), a safetensors file, or a folder of them
    (official `*_model_states.pt`, diffusers `transformer/` shards)."""
    target: Path
    """Output: a .safetensors file (hvfunc / official) or .pt (official), a folder for diffusers."""
    to: Literal["hvfunc", "official", "diffusers"] = "hvfunc"
    """Layout to write."""
    preset: Annotated[str, tyro.conf.arg(help=f"Architecture of the weights: {', '.join(DIT_PRESETS)}.")] = (
        "hunyuan-video-t2v")
    source_format: Literal["auto", "official", "diffusers", "hvfunc"] = "auto"
    """Layout of the source (detected from its keys by default)."""
    key: str = "module"
    """Key that wraps the weights in official .pt files ("module" or "ema")."""
    dtype: Literal["keep", "fp32", "bf16", "fp16"] = "keep"
    """Cast the weights on the way (the official checkpoint is bf16)."""


def write_dit(params: dict, preset: str, target: Path, to: str, source: str, ema: dict | None = None) -> Path:
    """Write hvfunc params in the `to` layout (atomic files); `ema` goes under the official .pt's `ema` key."""
    cfg = dit_preset(preset)
    meta = {"format": to, "preset": preset, "source": source}
    if to == "hvfunc":
        io.save_safetensors(params, target, metadata=meta)
    elif to == "official":
        sd = ckpt.dit_to_official(params, cfg)
        if target.suffix == ".pt":
            io.save_pickle({"module": sd} | ({} if ema is None else {"ema": ckpt.dit_to_official(ema, cfg)}), target)
        else:
            io.save_safetensors(sd, target, metadata=meta)
    else:
        if target.suffix:
            raise ValueError(f"--to diffusers writes a folder; got the file name {target}")
        io.save_safetensors(ckpt.dit_to_diffusers(params, cfg), target / "diffusion_pytorch_model.safetensors",
                            metadata={"format": "pt"})
        io.write_atomic(target / "config.json", json.dumps(ckpt.diffusers_config(cfg), indent=2).encode())
    print(f"wrote {target} ({to}, {len(params)} hvfunc leaves, preset {preset})")
    return target


def convert_dit(a: DitArgs) -> Path:
    params = ckpt.load_dit(a.source, dit_preset(a.preset), source=a.source_format, key=a.key, dtype=DTYPES[a.dtype])
    return write_dit(params, a.preset, a.target, a.to, str(a.source))


@dataclass(frozen=True, kw_only=True)
class ExportArgs:
    """Export the weights of a training checkpoint (DCP, any mesh) without a process group."""

    checkpoint: Path
    """A step-* folder, or a run's checkpoints/ folder (its latest complete checkpoint)."""
    target: Path
    """As for `dit`: a .safetensors / .pt file, or a folder for diffusers."""
    to: Literal["hvfunc", "official", "diffusers"] = "hvfunc"
    preset: str | None = None
    """Architecture; None reads the model the run trained (trainer.json)."""
    dtype: Literal["keep", "fp32", "bf16", "fp16"] = "bf16"
    """Training keeps fp32 weights; the official checkpoint is bf16."""
    ema: bool = False
    """The run's EMA weights (--ema.decay): an official .pt gets them under `ema` next to `module`;
    every other target holds the EMA weights instead of the trained ones."""


def export(a: ExportArgs) -> Path:
    from parallel import checkpoint

    def read(key: str) -> tuple[dict, str, Path]:
        params, preset, path = checkpoint.trained_params(a.checkpoint, preset=a.preset, key=key)
        if DTYPES[a.dtype] is not None:
            params = {k: v.to(DTYPES[a.dtype]) for k, v in params.items()}
        return params, preset, path

    both = a.ema and a.to == "official" and a.target.suffix == ".pt"
    params, preset, path = read("ema" if a.ema and not both else "params")
    return write_dit(params, preset, a.target, a.to, str(path), ema=read("ema")[0] if both else None)


@dataclass(frozen=True, kw_only=True)
class ExportLoraArgs:
    """Export the adapters of a LoRA training checkpoint (DCP, any mesh) without a process group."""

    checkpoint: Path
    """A step-* folder, or a run's checkpoints/ folder (its latest complete checkpoint)."""
    target: Path
    """Output file: .safetensors, or .pt/.pth/.bin for a torch pickle."""
    format: Literal["hvfunc", "official", "musubi", "comfyui", "diffusers", "mindspeed"] = "official"
    """Key format to write (docs/lora.md lists which tool reads which)."""
    dtype: Literal["keep", "fp32", "bf16", "fp16"] = "keep"
    """Training keeps fp32 adapters; upstream's files are bf16."""
    ema: bool = False
    """The adapters' EMA (a run with --ema.decay) instead of the trained adapters."""


def export_lora(a: ExportLoraArgs) -> Path:
    from parallel.lora_train import trained_lora

    lo, preset, path = trained_lora(a.checkpoint, key="ema" if a.ema else "params")
    return _write_lora(lo, a.target, a.format, a.dtype, f" of {preset}, from {path}")


def _write_lora(lo, target: Path, fmt: str, dtype: str, note: str = "") -> Path:
    """Cast (unless keep) and write a LoRA in `fmt`, atomically."""
    from hvfunc import lora_formats

    if DTYPES[dtype] is not None:
        lo = dataclasses.replace(lo, tensors={k: v.to(DTYPES[dtype]) for k, v in lo.tensors.items()})
    lora_formats.write(lo, target, fmt)
    print(f"wrote {target} ({fmt}, {len(lo.modules())} modules{note})")
    return target


@dataclass(frozen=True, kw_only=True)
class TextEncoderArgs:
    """Extract the language model and tokenizer of a LLaVA-Llama-3 folder (upstream's ckpts/text_encoder)."""

    source: Path
    """The llava-llama-3-8b-v1_1-transformers folder (config.json, weights, tokenizer)."""
    target: Path
    """Output folder; written to a temporary sibling and renamed into place when complete."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Weight dtype of the output (upstream: fp16)."""
    overwrite: bool = False
    """Replace a non-empty target folder."""


def text_encoder(args: TextEncoderArgs) -> Path:
    from hvfunc.text.convert import convert_text_encoder

    out = convert_text_encoder(args.source, args.target, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")
    return out


@dataclass(frozen=True, kw_only=True)
class LoraArgs:
    """Convert a LoRA file to another key format (the source format is detected from its keys)."""

    source: Path
    """A LoRA .safetensors (or torch pickle) in any supported format."""
    target: Path
    """Output file: .safetensors, or .pt/.pth/.bin for a torch pickle."""
    format: Literal["hvfunc", "official", "musubi", "comfyui", "diffusers", "mindspeed"]
    """Key format to write (docs/lora.md lists which tool reads which)."""
    dtype: Literal["keep", "fp32", "bf16", "fp16"] = "keep"
    """Cast the adapters on the way."""


def convert_lora(a: LoraArgs) -> Path:
    from hvfunc import lora_formats

    return _write_lora(lora_formats.read(a.source), a.target, a.format, a.dtype)


@dataclass(frozen=True, kw_only=True)
class MergeLoraArgs:
    """Merge LoRAs into DiT weights: W += scale * alpha/r * B @ A in fp32, written in the base dtype."""

    base: Path
    """DiT weights (official, hvfunc or diffusers; a file or a folder), also partial or pruned ones:
    adapters are matched to weights by key."""
    lora: Annotated[tuple[str, ...], tyro.conf.UseAppendAction]
    """FILE[:SCALE], repeatable; several LoRAs stack (scale 1 by default)."""
    target: Path
    """Output: a .safetensors / .pt file, or a folder for diffusers."""
    to: Literal["same", "official", "diffusers", "hvfunc"] = "same"
    """Layout to write; "same" keeps the base's. Another layout needs the whole model (see --preset)."""
    preset: str = "hunyuan-video-i2v"
    """Architecture, used only to convert to another layout."""
    key: str = "module"
    """Key that wraps the weights in official .pt files ("module" or "ema")."""


def merge_lora(a: MergeLoraArgs) -> Path:
    from hvfunc import lora, lora_formats

    loras = [(lora_formats.read(p), s) for p, s in map(lora_formats.parse_spec, a.lora)]
    sd = ckpt.read_state_dict(a.base, key=a.key)
    fmt = ckpt.detect_format(sd)
    if a.to not in ("same", fmt):  # another layout: through the whole model
        params, merged = lora.merge_all(ckpt.load_dit(a.base, dit_preset(a.preset), key=a.key), loras)
        print(f"merged {len(merged)} modules from {len(loras)} LoRA file(s)")
        return write_dit(params, a.preset, a.target, a.to, str(a.base))
    out, merged = lora_formats.merge_state_dict(sd, loras)
    absent = len({m for lo, _ in loras for m in lo.modules()} - set(merged))
    print(f"merged {len(merged)} modules from {len(loras)} LoRA file(s)"
          + (f"; {absent} modules have no weight in the base and were skipped" if absent else ""))
    if fmt == "diffusers" and not a.target.suffix:
        io.save_safetensors(out, a.target / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        if (a.base / "config.json").is_file():
            io.write_atomic(a.target / "config.json", (a.base / "config.json").read_bytes())
    elif a.target.suffix == ".pt":
        io.save_pickle({"module": out} if fmt == "official" else out, a.target)
    else:
        io.save_safetensors(out, a.target, metadata={"format": fmt, "source": str(a.base)})
    print(f"wrote {a.target} ({fmt})")
    return a.target


COMMANDS = {"dit": (DitArgs, convert_dit), "export": (ExportArgs, export),
            "export-lora": (ExportLoraArgs, export_lora), "text-encoder": (TextEncoderArgs, text_encoder),
            "lora": (LoraArgs, convert_lora),
            "merge-lora": (MergeLoraArgs, merge_lora)}


def main(argv: list[str] | None = None) -> Path:
    args = tyro.extras.subcommand_cli_from_dict({k: cls for k, (cls, _) in COMMANDS.items()}, args=argv,
                                                description=__doc__)
    run = next(fn for cls, fn in COMMANDS.values() if isinstance(args, cls))
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # bad user input: the message, not a traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # a user error: main's one "error: ..." line, exit code 2 like every script
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
