"""The README's first command: the tiny preset end to end on this machine.

Today: build the tiny DiT, write it as an official-format checkpoint, load it back
through the real loader, and run T2V and I2V forwards on random latents and text.
Later issues grow this into dataset -> features -> training -> sampling to mp4.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from hvfunc import ckpt, dit, params
from hvfunc.config import dit_preset
from hvfunc.dit_spec import dit_spec


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    preset: str = "tiny"
    """DiT preset to run (see hvfunc.config.DIT_PRESETS)."""
    out: Path | None = None
    """Folder for the demo's files (a temporary folder when omitted)."""
    seed: int = 0
    """Seed for weights and inputs."""


def main(cfg: DemoConfig) -> None:
    out = cfg.out or Path(tempfile.mkdtemp(prefix="hvfunc-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in (cfg.preset, f"{cfg.preset}-i2v"):
        model = dit_preset(name)
        p = params.init(dit_spec(model), generator=torch.Generator().manual_seed(cfg.seed))
        path = out / f"{name}.pt"
        torch.save({"module": ckpt.dit_to_official(p, model)}, path)  # the official file layout
        loaded = ckpt.load_dit(path, model)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        x = torch.randn(1, model.in_channels, 5, 16, 16, generator=g)
        text = torch.randn(1, 24, model.text_states_dim, generator=g)
        mask = (torch.arange(24) < 17).long()[None]
        start = time.perf_counter()
        with torch.no_grad():
            v = dit.forward(loaded, x, torch.tensor([500.0]), text, mask,
                            torch.randn(1, model.text_states_dim_2, generator=g), cfg=model,
                            guidance=torch.tensor([6000.0]))
        ms = (time.perf_counter() - start) * 1e3
        print(f"{name:>10}: {params.count(p):,} params, checkpoint {path.name} reloaded, "
              f"forward {tuple(x.shape)} -> {tuple(v.shape)} in {ms:.1f} ms, |v| max {v.abs().max():.1e} (0: final layer starts at zero, as upstream)")
    print(f"files in {out}")


if __name__ == "__main__":
    main(tyro.cli(DemoConfig))
