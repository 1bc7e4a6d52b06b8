"""Opt-in step caches of the sampler: TeaCache and the first-block cache (FBCache).

Both skip the DiT blocks of a step whose input barely changed and reuse the residual of
the blocks from the last computed step; they change results by design, so sampling runs
uncached unless a `StepCache` asks. The rules (docs/sampling.md, "Step cache"):

- teacache (TeaCache4HunyuanVideo): indicator = the first double block's modulated video
  input, modulate(LayerNorm(img), shift1, scale1); per step d = rel-L1 to the previous
  step's indicator (updated every step), acc += poly(d) (the published rescale
  polynomial); skip while acc < threshold, else compute and reset acc. The first and
  the last step are always computed (and reset acc). Cached: the residual of all blocks.
- fbcache (ParaAttention's first-block cache): run double block 0; d = rel-L1 of its
  residual to the first-block residual of the last computed step; skip the other blocks
  while d < threshold and add their residual from the last computed step. The first step
  is computed (nothing to compare with); the last is not forced (as ParaAttention).

Decisions are host reads (one float per step), so a cached step cannot sit in a CUDA
graph. rel-L1 = sum|a - b| / sum|b| (= the mean ratio upstream computes) with both sums
in fp32 and summed through `reduce` first, so ranks holding different video tokens
(context parallelism: parallel/ passes an all-reduce over the cp group) take one decision.
Residuals stay in the compute dtype, as upstream keeps them.
Shapes: B batch (2B with real CFG: one decision for the batch), L video tokens of this
rank, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hvfunc.dit import EPS, Embedded
from hvfunc.ops import layer_norm, linear, modulate, split_first
from hvfunc.params import Params, sub

Reduce = Callable[[Tensor], Tensor]  # [2] fp32 local sums -> the sums over the ranks holding other tokens
RunBlocks = Callable[..., Tensor]  # (e, after_first=None) -> video tokens [B, L, D]: dit.run_blocks, bound

KINDS = ("none", "teacache", "fbcache")
# teacache 0.1: TeaCache4HunyuanVideo's "0.1 for 1.6x speedup" (its script runs 0.15, "for 2.1x");
# fbcache 0.06: ParaAttention's HunyuanVideo default (apply_cache_on_pipe residual_diff_threshold).
DEFAULT_THRESHOLD = {"teacache": 0.1, "fbcache": 0.06}
# TeaCache4HunyuanVideo's rescale polynomial of d, highest degree first (numpy.poly1d order)
TEACACHE_POLY = (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02)


@dataclass(frozen=True, kw_only=True)
class StepCache:
    """Which step cache the sampler uses (off by default: it changes results)."""

    kind: Literal["none", "teacache", "fbcache"] = "none"
    """none, teacache (modulated-input rule) or fbcache (first-block residual rule)."""
    threshold: float | None = None
    """Skip threshold; None: the kind's published default (teacache 0.1, fbcache 0.06). 0 never skips."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"cache.kind must be one of {KINDS}, got {self.kind!r}")
        if self.threshold is not None and self.kind == "none":
            raise ValueError(f"cache.threshold={self.threshold} needs cache.kind teacache or fbcache, got none")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"cache.threshold must be >= 0, got {self.threshold}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def thresh(self) -> float:
        return DEFAULT_THRESHOLD[self.kind] if self.threshold is None else self.threshold


def teacache_rescale(d: float) -> float:
    """The TeaCache polynomial at d (positive everywhere: its minimum is 0.052 at d = 0.031)."""
    out = 0.0
    for c in TEACACHE_POLY:
        out = out * d + c
    return out


def l1_sums(cur: Tensor, prev: Tensor) -> Tensor:
    """[sum |cur - prev|, sum |prev|] in fp32 over this rank's elements."""
    p = prev.float()
    return torch.stack([(cur.float() - p).abs().sum(), p.abs().sum()])


def _local(sums: Tensor) -> Tensor:
    return sums


def rel_l1(cur: Tensor, prev: Tensor, reduce: Reduce = _local) -> float:
    """sum |cur - prev| / sum |prev| over all ranks' elements (reduce sums first): a host read."""
    s = reduce(l1_sums(cur, prev))
    return float(s[0] / s[1])


def modulated_input(params: Params, e: Embedded) -> Tensor:
    """TeaCache's indicator [B, L, D]: double block 0's modulated video input (frame-0 tokens
    of I2V with the t = 0 modulation, as the block itself modulates them)."""
    p = sub(params, "double_blocks.0.")

    def shift_scale(v: Tensor | None) -> tuple[Tensor, Tensor] | None:
        return None if v is None else tuple(linear(F.silu(v), p, "img_mod.linear").chunk(6, dim=-1)[0:2])

    return split_first(modulate, e.first, (layer_norm(e.img, EPS),), shift_scale(e.vec), shift_scale(e.vec_first))


@dataclass
class CacheStats:
    """What a cached run did, step by step (filled by CacheState; counts for a run's sidecar)."""

    pattern: list[bool] = field(default_factory=list)
    """Per step: True = the blocks ran (a DiT evaluation), False = skipped."""
    indicators: list[float | None] = field(default_factory=list)
    """Per step: the rule's rel-L1 distance d (teacache before the polynomial); None where
    the step was forced or had nothing to compare with."""

    @property
    def computed(self) -> int:
        return sum(self.pattern)

    @property
    def skipped(self) -> int:
        return len(self.pattern) - self.computed


class CacheState:
    """The per-run state of a step cache; `run` replaces dit.run_blocks in each step.

    Steps are counted by calls: call it once per step, in order; call `steps` restarts
    the run (state reset, stats appended)."""

    def __init__(self, cache: StepCache, steps: int, *, reduce: Reduce = _local, stats: CacheStats | None = None):
        if not cache.enabled:
            raise ValueError("CacheState needs cache.kind teacache or fbcache, got none")
        self.cache, self.steps, self.reduce = cache, steps, reduce
        self.stats = CacheStats() if stats is None else stats
        self.calls = 0

    def run(self, params: Params, e: Embedded, run_blocks: RunBlocks) -> Tensor:
        """The video tokens after all blocks [B, L, D], computed or from the cache."""
        i, self.calls = self.calls % self.steps, self.calls + 1
        if i == 0:
            self.prev, self.residual, self.acc = None, None, 0.0
        if self.cache.kind == "teacache":
            img, computed, d = self._teacache(params, e, i, run_blocks)
        else:
            img, computed, d = self._fbcache(e, run_blocks)
        self.stats.pattern.append(computed)
        self.stats.indicators.append(d)
        return img

    def _teacache(self, params: Params, e: Embedded, i: int, run_blocks: RunBlocks):
        m, d = modulated_input(params, e), None
        if i in (0, self.steps - 1):
            compute, self.acc = True, 0.0
        else:
            d = rel_l1(m, self.prev, self.reduce)
            self.acc += teacache_rescale(d)
            compute = not self.acc < self.cache.thresh  # NaN computes
            if compute:
                self.acc = 0.0
        self.prev = m
        if not compute:
            return e.img + self.residual, False, d
        img = run_blocks(e)
        self.residual = img - e.img
        return img, True, d

    def _fbcache(self, e: Embedded, run_blocks: RunBlocks):
        seen: dict = {"d": None}

        def after_first(img1: Tensor) -> Tensor | None:
            r = img1 - e.img
            if self.prev is not None:
                seen["d"] = rel_l1(r, self.prev, self.reduce)
                if seen["d"] < self.cache.thresh:
                    return img1 + self.residual
            self.prev, seen["img1"] = r, img1  # the reference is the last computed step's residual
            return None

        img = run_blocks(e, after_first=after_first)
        if "img1" not in seen:
            return img, False, seen["d"]
        self.residual = img - seen["img1"]
        return img, True, seen["d"]
