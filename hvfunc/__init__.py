"""hvfunc: HunyuanVideo as pure functions over flat parameter dicts (no distributed code here: see parallel/)."""

from hvfunc.config import DIT_PRESETS, DiTConfig, dit_preset

__all__ = ["DIT_PRESETS", "DiTConfig", "dit_preset"]
