"""Buckets of one shape (frames, height, width) and a resumable data-parallel bucket sampler.

Sampler semantics (all ranks compute the same plan; no communication):
  * an epoch's plan is a pure function of (buckets, seed, epoch, batch_size, world_size,
    drop_last, shuffle): each bucket is shuffled, cut into global batches of
    batch_size * world_size indices, and the global batches of all buckets are shuffled;
  * rank r takes slice [r*batch_size, (r+1)*batch_size) of every global batch, so every
    step has one shape on every rank (equal work, no stragglers);
  * a bucket's last partial global batch is filled by repeating its own clips (default),
    or dropped with drop_last=True -- counted in `dropped`, never silent;
  * each index comes with a per-draw seed (a torch.Generator seed for the temporal crop),
    so the same step always crops the same frames, and epochs differ;
  * `state_dict()` / `load_state_dict()` hold (epoch, position): resuming replays the rest
    of the epoch exactly. After an epoch ends the sampler moves to the next one.
rank and world_size are plain ints (the data-parallel coordinates); process groups live in
parallel/, never in hvfunc.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence

import torch

from hvfunc.config import DataConfig
from hvfunc.data.manifest import Entry
from hvfunc.data.report import SkipReport
from hvfunc.data.transform import target_size
from hvfunc.data.video import ClipError, clip_length

Key = tuple[int, int, int]  # (frames, height, width) of every clip in a bucket
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, epoch) over the seed space


def mix_seed(seed: int, n: int) -> int:
    """A generator seed for draw n of a run seeded `seed` (distinct per (seed, n), in [0, 2**63))."""
    return (seed * _MIX + n) % 2**63


def bucket_key(entry: Entry, cfg: DataConfig) -> Key:
    """(frames, height, width) a clip yields; raises ClipError when it must be skipped."""
    frames = clip_length(entry.num_frames, entry.fps, cfg=cfg)
    if not frames:
        raise ClipError("too_few_frames", f"{entry.num_frames} frames at {entry.fps:g} fps give fewer than "
                        f"min_frames={cfg.min_frames} at train_fps={cfg.train_fps} (stride {cfg.temporal_stride}, "
                        f"cp {cfg.cp})")
    return (frames, *target_size(entry.height, entry.width, cfg))


def assign_buckets(entries: Sequence[Entry], cfg: DataConfig, report: SkipReport) -> tuple[list[Entry], list[Key]]:
    """Entries that fit the config and their keys; the rest go to the report."""
    kept, keys = [], []
    for e in entries:
        try:
            keys.append(bucket_key(e, cfg))
        except ClipError as err:
            report.add(e.path, err.reason, err.detail)
            continue
        kept.append(e)
    return kept, keys


def group(keys: Sequence[Key]) -> dict[Key, list[int]]:
    """Dataset indices per bucket, buckets in sorted order."""
    out: dict[Key, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(tuple(k), []).append(i)
    return dict(sorted(out.items()))


class BucketSampler:
    """Batch sampler over buckets: yields lists of (index, draw_seed) of length batch_size."""

    def __init__(self, buckets: Mapping[Key, Sequence[int]], *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = False, shuffle: bool = True) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.buckets = {tuple(k): list(v) for k, v in sorted(buckets.items()) if len(v)}
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.global_batch = batch_size * world_size
        g = self.global_batch
        self.dropped = {k: len(v) % g for k, v in self.buckets.items() if drop_last and len(v) % g}
        """Per bucket, clips left out of every epoch by drop_last (which ones changes per epoch)."""
        if len(self) == 0:
            sizes = {f"{k[0]}x{k[1]}x{k[2]}": len(v) for k, v in self.buckets.items()}
            raise ValueError(f"no batch to draw: global batch {self.global_batch} (batch_size {batch_size} x world "
                             f"{world_size}), drop_last={drop_last}, bucket sizes {sizes or 'none (empty dataset)'}")
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        g = self.global_batch
        return sum(len(v) // g if self.drop_last else -(-len(v) // g) for v in self.buckets.values())

    def padded(self) -> dict[Key, int]:
        """Per bucket, how many draws repeat a clip to fill its last global batch (0 with drop_last)."""
        g = self.global_batch
        return {} if self.drop_last else {k: -len(v) % g for k, v in self.buckets.items() if len(v) % g}

    def plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All global batches of an epoch: lists of global_batch (index, draw_seed) pairs."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        g, batches = self.global_batch, []
        for idx in self.buckets.values():
            order = [idx[i] for i in torch.randperm(len(idx), generator=gen)] if self.shuffle else list(idx)
            if len(order) % g and not self.drop_last:
                order += [order[i % len(order)] for i in range(-len(order) % g)]
            batches += [order[i:i + g] for i in range(0, len(order) - g + 1, g)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen)]
        seeds = torch.randint(0, 2**62, (len(batches), g), generator=gen).tolist()
        return [list(zip(b, s)) for b, s in zip(batches, seeds)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan = self.plan(self.epoch)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while self.position < len(plan):
            batch = plan[self.position][lo:hi]
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def fingerprint(self) -> str:
        """Hash of the buckets: resuming on a different dataset is refused."""
        blob = json.dumps([[list(k), v] for k, v in self.buckets.items()]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def state_dict(self, position: int | None = None) -> dict:
        """Where the sampler is. Pass `position` = batches the training loop consumed this epoch
        when a DataLoader prefetches (the sampler itself has run ahead by the prefetch depth)."""
        return {"epoch": self.epoch, "position": self.position if position is None else position,
                "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "global_batch": self.global_batch, "drop_last": self.drop_last, "shuffle": self.shuffle,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        mine = self.state_dict()
        # the plan depends on the global batch, not on how it is split: another mesh with the
        # same global batch resumes mid-epoch exactly
        state = dict(state, global_batch=state.get("global_batch", state["batch_size"] * state["world_size"]))
        keys = ("seed", "global_batch", "drop_last", "shuffle", "fingerprint")
        changed = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if changed and state.get("position", 0):
            raise ValueError("cannot resume mid-epoch with a different data plan (" + "; ".join(changed) + "); "
                             "resume at an epoch boundary or restore the saved settings")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"sampler position {state['position']} is outside the epoch's {len(self)} batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
