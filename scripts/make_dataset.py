"""Write a synthetic raw-video dataset (moving coloured shapes) in the data.txt / data.json format.

    python scripts/make_dataset.py --out data/synthetic --num-clips 10
prints the data.txt to pass to training or feature extraction, and the dataset's skip
report and buckets under a data preset (nothing should be skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro

from hvfunc.config import data_preset
from hvfunc.data.dataset import build_dataset
from hvfunc.data.synthetic import make_dataset
from parallel import runtime


@dataclass(frozen=True, kw_only=True)
class MakeDatasetConfig:
    out: Path
    """Folder to write (ds0/, ds1/, ... and data.txt); existing clips of the same names are replaced."""
    num_clips: int = 10
    """Clips in all; sizes, frame rates and lengths cycle through hvfunc.data.synthetic.FORMATS."""
    num_folders: int = 1
    """Dataset folders (data.txt lines) the clips are split between."""
    seed: int = 0
    """Seed of every random choice (shapes, colours, directions, positions)."""
    preset: str = "tiny"
    """Data preset (hvfunc.config.DATA_PRESETS) used to check the result and list its buckets."""


def main(cfg: MakeDatasetConfig) -> Path:
    data_txt = make_dataset(cfg.out, num_clips=cfg.num_clips, num_folders=cfg.num_folders, seed=cfg.seed)
    print(build_dataset(data_txt, data_preset(cfg.preset)).summary())
    print(f"data list: {data_txt}")
    return data_txt


if __name__ == "__main__":
    args = tyro.cli(MakeDatasetConfig)
    with runtime.user_errors():
        main(args)
