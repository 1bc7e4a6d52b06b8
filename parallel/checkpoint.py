"""Training checkpoints with torch.distributed.checkpoint (DCP): resumable and reshardable.

Layout: <dir>/step-00000100/ holds the DCP shards of {"params", "optim"} (the trainable
leaves: all of them, or LoRA's adapters), with EMA on also "ema" (parallel.ema, the same
leaves and placements), and trainer.json (step, sampler position, seeds,
config; with LoRA the adapters' config and the base weights' identity). A checkpoint is written to a hidden
`.step-*.partial` folder and renamed only after every rank finished, then `latest` is
updated atomically: a kill at any moment leaves the previous checkpoint usable. DCP
stores DTensors by global shape, so a checkpoint loads onto any other mesh.
All randomness of training derives from seeds and the sampler position, which
trainer.json holds: that is the whole RNG state.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor

from hvfunc import io
from hvfunc.params import Params

STATE_FILE = "trainer.json"


def optim_state(params: Params, opt: torch.optim.Optimizer) -> dict[str, dict[str, Tensor]]:
    """AdamW state keyed by leaf name (created as zeros if the optimizer has not stepped yet)."""
    out = {}
    for k, p in params.items():
        if not p.requires_grad:
            continue
        st = opt.state[p]
        if not st:  # the layout AdamW builds on its first step, so DCP can load into it
            st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p.detach()),
                      exp_avg_sq=torch.zeros_like(p.detach()))
        out[k] = st
    return out


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(params: Params, opt: torch.optim.Optimizer | None, ema: Params | None) -> dict:
    """What DCP writes and reads: detached leaves, optimizer state, and the EMA when there is one."""
    state: dict = {"params": {k: v.detach() for k, v in params.items()}}
    if opt is not None:
        state["optim"] = optim_state(params, opt)
    if ema is not None:
        state["ema"] = ema
    return state


def save(root: str | Path, step: int, params: Params, opt: torch.optim.Optimizer, trainer: dict,
         keep_last: int = 2, ema: Params | None = None) -> Path:
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.partial"
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(_state(params, opt, ema), checkpoint_id=str(tmp))
    _barrier()
    if _rank0():
        io.write_atomic(tmp / STATE_FILE, json.dumps(dict(trainer, step=step), indent=1).encode())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        io.write_atomic(root / "latest", final.name.encode())
        for old in sorted(root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint (has trainer.json), or None."""
    root = Path(root)
    ptr = root / "latest"
    if ptr.is_file() and (root / ptr.read_text().strip() / STATE_FILE).is_file():
        return root / ptr.read_text().strip()
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load(path: str | Path, params: Params, opt: torch.optim.Optimizer | None, ema: Params | None = None) -> dict:
    """Load in place into `params` (any mesh), the optimizer and the EMA; returns trainer.json."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    dcp.load(_state(params, opt, ema), checkpoint_id=str(path))
    return json.loads((path / STATE_FILE).read_text())


def is_checkpoint(path: str | Path) -> bool:
    """A training checkpoint: a complete step-* folder, or a run's checkpoints/ folder holding one."""
    path = Path(path)
    return path.is_dir() and ((path / STATE_FILE).is_file() or latest(path) is not None)


def trained_params(path: str | Path, *, preset: str | None = None, key: str = "params") -> tuple[Params, str, Path]:
    """(whole fp32 params, DiT preset, step folder) of a training checkpoint (any mesh it was
    saved on), read without a process group. path: a step-* folder, or a run's checkpoints/
    folder (its newest complete checkpoint). preset None: the model the run trained.
    key "ema": the EMA weights instead (the run must have kept one)."""
    from hvfunc.config import dit_preset
    from hvfunc.dit_spec import dit_spec

    path = Path(path)
    step = latest(path) or path
    if not (step / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no complete training checkpoint (no step-*/{STATE_FILE})")
    state = json.loads((step / STATE_FILE).read_text())
    if "lora" in state:
        raise ValueError(f"{step} holds LoRA adapters only (the base weights stay frozen and are not saved): "
                         f"export them with `convert.py export-lora`, merge with `convert.py merge-lora`")
    check_key(state, key, step)
    name = preset or state["model"]
    shapes = {k: s.shape for k, s in dit_spec(dit_preset(name)).items()}
    return load_params_single_process(step, shapes, key=key), name, step


def check_key(state: dict, key: str, step: Path) -> None:
    """key "ema" needs a run that kept an EMA (trainer.json's "ema" decay)."""
    if key == "ema" and not state.get("ema"):
        raise ValueError(f"{step} holds no EMA weights (the run trained without --ema.decay): export without --ema")


def load_params_single_process(path: str | Path, shapes: dict[str, tuple[int, ...]],
                               dtype: torch.dtype = torch.float32, key: str = "params") -> Params:
    """Whole parameters (key "ema": the EMA) from a checkpoint without a process group (export / conversion)."""
    out = {k: torch.empty(s, dtype=dtype) for k, s in shapes.items()}
    with warnings.catch_warnings():  # no_dist is the intent, also when a process group exists
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({key: out}, checkpoint_id=str(path), no_dist=True)
    return out
