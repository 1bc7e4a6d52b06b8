"""LoRA finetuning in the trainer: its config, the training mask, the adapter leaves, and the
identity of the frozen base weights that a run's checkpoints belong to.

What trains is a predicate over leaf names (hvfunc.lora.trainable): every leaf for full
finetuning, the adapters for LoRA, through the same trainer. Frozen leaves are stored in
their compute dtype with requires_grad False, so autograd never builds their weight-gradient
GEMM (F.linear and hvfunc.ops._QKV skip it), no gradient buffer, no optimizer state, and
their FSDP gather has no backward (no reduce-scatter). Adapters are fp32 masters with AdamW
state, placed by the same plan as every leaf (their specs derive from the base leaves').
Checkpoints hold the trainable leaves only; trainer.json records the adapters' config and
the base's identity, and a resume against other base weights fails naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hvfunc import lora, lora_formats
from hvfunc.config import DiTConfig
from hvfunc.lora import LoraConfig
from hvfunc.params import Spec, check_tree, init_leaves

_SAMPLE = 1 << 20  # bytes hashed at the start, middle and end of each base file


@dataclass(frozen=True, kw_only=True)
class LoraTrain(LoraConfig):
    """LoRA finetuning: with `enabled`, only adapters train and the base weights stay frozen."""

    enabled: bool = False
    """Train LoRA adapters on frozen base weights (False: full finetuning, every leaf trains)."""
    init_from: Path | None = None
    """A LoRA file in any format (hvfunc.lora_formats) to start the adapters from; its modules, rank
    and alpha replace targets / rank / alpha above (one rank and alpha for all its modules)."""


@dataclass(frozen=True)
class Tuning:
    """What a run trains, resolved before any weight exists."""

    adapters: LoraConfig | None
    """The adapters' config (from --lora.init-from's file if given); None: full finetuning."""
    spec: Spec = field(default_factory=dict)
    """Adapter leaves (lora_spec), {} for full finetuning."""
    base: dict = field(default_factory=dict)
    """Identity of the frozen base weights (base_identity), {} for full finetuning."""
    source: lora.Lora | None = None
    """Adapters read from --lora.init-from."""

    @property
    def scale(self) -> float:
        return 1.0 if self.adapters is None else self.adapters.alpha / self.adapters.rank

    def trains(self, key: str) -> bool:
        return lora.trainable("all" if self.adapters is None else "adapters")(key)

    def leaves(self, seed: int) -> Iterator[tuple[str, Tensor]]:
        """The adapters' starting fp32 values: the file's, or drawn from their spec (B = 0)."""
        if self.source is not None:
            return ((k, self.source.tensors[k].float()) for k in self.spec)
        return init_leaves(self.spec, generator=torch.Generator().manual_seed(seed))

    def record(self) -> dict:
        """trainer.json's entries for this run (none for full finetuning: its files stay as they were)."""
        if self.adapters is None:
            return {}
        return {"lora": dataclasses.asdict(self.adapters), "base": self.base}


def resolve(cfg: LoraTrain, model: DiTConfig, base: Path | None, seed: int) -> Tuning:
    """The run's Tuning; bad LoRA files or configs raise ValueError naming them."""
    if not cfg.enabled:
        if cfg.init_from is not None:
            raise ValueError(f"--lora.init-from {cfg.init_from} needs --lora.enabled (LoRA training)")
        return Tuning(None)
    source = None
    adapters = LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, init=cfg.init)
    if cfg.init_from is not None:
        source = lora_formats.read(cfg.init_from)
        try:
            lora.check(source, model)
            rank, alpha = lora.one_scale(source)
        except ValueError as e:
            raise ValueError(f"--lora.init-from {cfg.init_from}: {e}") from None
        adapters = LoraConfig(rank=rank, alpha=alpha, targets=tuple(source.modules()), init=cfg.init)
    spec = lora.lora_spec(model, adapters)
    if source is not None:
        check_tree(source.tensors, spec, what=f"LoRA {cfg.init_from}")
    return Tuning(adapters, spec, base_identity(base, seed), source)


def base_identity(path: Path | None, seed: int) -> dict:
    """Size and a sampled sha256 (first, middle, last MiB of every file, with names and sizes) of
    the base weights: cheap on a 26 GB checkpoint, independent of where the file lives now."""
    if path is None:
        return {"init": f"upstream init, seed {seed}"}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size};".encode())
        with f.open("rb") as fh:
            for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                fh.seek(at)
                h.update(fh.read(_SAMPLE))
    return {"path": str(path), "bytes": total, "sampled_sha256": h.hexdigest()}


def _named(base: dict) -> str:
    return f"{base['path']} ({base['bytes']} bytes)" if "path" in base else base.get("init", "?")


def check_resume(saved: dict, tune: Tuning, where: Path) -> None:
    """A checkpoint's trainer.json against this run: the same kind of training, the same adapters,
    the same base weights (by content, wherever the file is now)."""
    if ("lora" in saved) != (tune.adapters is not None):
        kind = "LoRA adapters" if "lora" in saved else "a full finetune"
        raise ValueError(f"{where} holds {kind}; this run is {'LoRA' if tune.adapters else 'full finetuning'}: "
                         f"use another --out or match --lora.enabled")
    if tune.adapters is None:
        return
    want = json.loads(json.dumps(dataclasses.asdict(tune.adapters)))
    if saved["lora"] != want:
        raise ValueError(f"{where} holds adapters {saved['lora']}, this run asks for {want}")
    old, new = saved["base"], tune.base
    if {k: v for k, v in old.items() if k != "path"} != {k: v for k, v in new.items() if k != "path"}:
        raise ValueError(f"{where} holds LoRA adapters trained on base weights {_named(old)}, but this run's base "
                         f"is {_named(new)}: other weights. Resume with the original --init-from, or start a new --out")


def trained_lora(path: str | Path, key: str = "params") -> tuple[lora.Lora, str, Path]:
    """(whole fp32 adapters, DiT preset, step folder) of a LoRA training checkpoint, read without
    a process group. path: a step-* folder, or a run's checkpoints/ folder (its newest).
    key "ema": the adapters' EMA instead (the run must have kept one)."""
    from hvfunc.config import dit_preset
    from parallel import checkpoint

    path = Path(path)
    step = checkpoint.latest(path) or path
    if not (step / checkpoint.STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no complete training checkpoint (no step-*/{checkpoint.STATE_FILE})")
    state = json.loads((step / checkpoint.STATE_FILE).read_text())
    if "lora" not in state:
        raise ValueError(f"{step} is a full-finetuning checkpoint (no LoRA adapters): use `convert.py export`")
    checkpoint.check_key(state, key, step)
    adapters = LoraConfig(**(state["lora"] | {"targets": tuple(state["lora"]["targets"])}))
    spec = lora.lora_spec(dit_preset(state["model"]), adapters)
    tensors = checkpoint.load_params_single_process(step, {k: s.shape for k, s in spec.items()}, key=key)
    return as_lora(tensors, adapters), state["model"], step


def as_lora(tensors: dict[str, Tensor], adapters: LoraConfig) -> lora.Lora:
    """A run's adapter leaves as a Lora: one alpha (the run's) for every adapted module."""
    return lora.Lora(tensors, {m: float(adapters.alpha) for m in dict.fromkeys(map(lora.module_of, tensors))})
