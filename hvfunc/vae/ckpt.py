"""VAE weights and config to and from disk: official `vae/pytorch_model.pt` + `config.json` (and diffusers').

The official keys are hvfunc's keys and diffusers' keys, so conversion is only unwrapping:
upstream's loader takes `ckpt["state_dict"]` when present and, when any key starts with
`vae.`, keeps exactly those keys with the prefix removed (a full training checkpoint also
holds other models). Files are read with `weights_only=True` (hvfunc.io); every mismatch
against the spec is reported at once, naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from hvfunc import io
from hvfunc.config import VAEConfig
from hvfunc.params import Params, check_tree
from hvfunc.vae.spec import vae_spec

WEIGHT_FILES = ("pytorch_model.pt", "diffusion_pytorch_model.safetensors")
# config.json keys that carry no architecture (or one hvfunc always builds) and are skipped
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast"}
_BLOCK_TYPES = {"down_block_types": ("DownEncoderBlockCausal3D", "HunyuanVideoDownBlock3D"),
                "up_block_types": ("UpDecoderBlockCausal3D", "HunyuanVideoUpBlock3D")}


def vae_from_official(state_dict: dict[str, Tensor], cfg: VAEConfig) -> Params:
    """Official (or diffusers) VAE state dict -> hvfunc params (same tensors, spec order).

    Strips a `state_dict` wrapper and a `vae.` prefix as upstream's loader does; raises
    one ValueError listing every missing, unexpected and mis-shaped key.
    """
    sd = state_dict.get("state_dict", state_dict) if isinstance(state_dict, dict) else state_dict
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("VAE weights must be a dict of tensors (optionally under 'state_dict')")
    if any(k.startswith("vae.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    spec = vae_spec(cfg)
    check_tree(sd, spec, what="VAE weights")
    return {k: sd[k] for k in spec}


def vae_config_from_json(d: dict, *, source: str = "config.json") -> VAEConfig:
    """The official (or diffusers') VAE config.json as a VAEConfig; unknown keys are an error."""
    d = dict(d)
    if "temporal_compression_ratio" in d:  # diffusers' name for the same field
        d["time_compression_ratio"] = d.pop("temporal_compression_ratio")
    for key, allowed in _BLOCK_TYPES.items():
        bad = [t for t in d.pop(key, []) if t not in allowed]
        if bad:
            raise ValueError(f"{source}: {key} {bad} not supported (only {' / '.join(allowed)})")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(d) - fields - _IGNORED)
    if unknown:
        raise ValueError(f"{source}: unknown VAE config keys {unknown}; known: {sorted(fields)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    try:
        return VAEConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _find(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file or a `vae/` directory."""
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no VAE weights in {path}: expected one of {list(WEIGHT_FILES)}")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    cfg_file = path.parent / "config.json"
    return path, cfg_file if cfg_file.is_file() else None


def load_vae(path: str | Path, cfg: VAEConfig | None = None, *,
             dtype: torch.dtype | None = None) -> tuple[Params, VAEConfig]:
    """Read a VAE from a directory (`pytorch_model.pt` or diffusers' safetensors, plus `config.json`)
    or a weights file; returns (params, config).

    `cfg` None takes the config from `config.json` beside the weights; when both exist they
    must agree. All-or-nothing: any bad file, key or shape raises a ValueError naming the file.
    """
    from hvfunc.ckpt import read_state_dict  # lazy: hvfunc.ckpt re-exports this module

    weights, cfg_file = _find(Path(path))
    file_cfg = None
    if cfg_file is not None:
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {cfg_file}: {e}") from None
        file_cfg = vae_config_from_json(raw, source=str(cfg_file))
    if cfg is None and file_cfg is None:
        raise ValueError(f"no config.json beside {weights}: pass cfg (e.g. VAE_PRESETS['hunyuan-video'])")
    if cfg is not None and file_cfg is not None and cfg != file_cfg:
        diff = {f.name: (getattr(cfg, f.name), getattr(file_cfg, f.name)) for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(file_cfg, f.name)}
        raise ValueError(f"cfg disagrees with {cfg_file} on (given, file): {diff}")
    cfg = cfg or file_cfg
    sd = read_state_dict(weights, key="state_dict")  # its errors name the file already
    try:
        params = vae_from_official(sd, cfg)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    return params if dtype is None else {k: v.to(dtype) for k, v in params.items()}, cfg


def save_vae(params: Params, cfg: VAEConfig, folder: str | Path) -> Path:
    """Write `folder/pytorch_model.pt` (the state dict, official keys) and `folder/config.json`,
    each atomically: what load_vae and diffusers' AutoencoderKLHunyuanVideo read. Returns folder."""
    check_tree(params, vae_spec(cfg), what="VAE params")
    folder = Path(folder)
    io.save_pickle(dict(params), folder / "pytorch_model.pt")
    io.write_atomic(folder / "config.json", json.dumps(asdict(cfg), indent=1).encode())
    return folder
