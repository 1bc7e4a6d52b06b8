"""Bucket assignment and the data-parallel bucket sampler: coverage, determinism, resume."""

from collections import Counter
from pathlib import Path

import pytest

from hvfunc.config import data_preset
from hvfunc.data.buckets import BucketSampler, assign_buckets, group
from hvfunc.data.manifest import Entry
from hvfunc.data.report import SkipReport

A, B, C = (17, 64, 96), (17, 96, 64), (9, 64, 64)
BUCKETS = {A: list(range(10)), B: list(range(10, 17)), C: list(range(17, 20))}


def _entry(name, n, fps, h, w):
    return Entry(path=Path(name), caption="c", num_frames=n, fps=fps, height=h, width=w)


def test_assign_buckets_hand_cases():
    cfg = data_preset("tiny")  # 17 frames max, min 9, 24 fps, max_area 64*96, stride 16, aspect 2
    entries = [_entry("a", 41, 24, 64, 96),    # 41 -> 17 frames, 64x96 fits max_area
               _entry("b", 52, 30, 96, 64),    # 52 at 30 fps -> 42 -> 17; portrait
               _entry("c", 21, 12, 64, 64),    # 21 at 12 fps -> 42 -> 17
               _entry("d", 12, 24, 64, 96),    # 12 -> 9 (4*2+1)
               _entry("e", 100, 60, 80, 128),  # 100 at 60 fps -> 40 -> 17; 80x128 scaled to 61x99 -> 48x96
               _entry("f", 8, 24, 64, 96),     # 8 -> 5 < 9: too few
               _entry("g", 41, 24, 16, 24),    # 384 px < 6144/4: too small
               _entry("h", 41, 24, 40, 120)]   # h/w 1/3: bad aspect
    report = SkipReport()
    kept, keys = assign_buckets(entries, cfg, report)
    assert [e.name for e in kept] == list("abcde")
    assert keys == [(17, 64, 96), (17, 96, 64), (17, 64, 64), (9, 64, 96), (17, 48, 96)]
    assert {s.path: s.reason for s in report.skips} == {"f": "too_few_frames", "g": "too_small", "h": "bad_aspect"}
    assert group(keys) == {(9, 64, 96): [3], (17, 48, 96): [4], (17, 64, 64): [2], (17, 64, 96): [0],
                           (17, 96, 64): [1]}
    _, cp_keys = assign_buckets(entries[:1], cfg.replace(cp=2), SkipReport())
    assert cp_keys == [(13, 64, 96)]  # 5 latent frames -> 4 (divisible by cp 2) -> 13 frames


def _epoch(sampler):
    return [list(b) for b in sampler]


def _all_ranks(world, bs, **kw):
    return [_epoch(BucketSampler(BUCKETS, batch_size=bs, rank=r, world_size=world, **kw)) for r in range(world)]


def test_every_step_has_one_shape_on_every_rank_and_padding_is_counted():
    key_of = {i: k for k, idx in BUCKETS.items() for i in idx}
    runs = _all_ranks(3, 2, seed=5)
    s = BucketSampler(BUCKETS, batch_size=2, world_size=3, seed=5)
    assert len(s) == 5 and all(len(r) == 5 for r in runs)  # ceil(10/6) + ceil(7/6) + ceil(3/6)
    assert s.padded() == {A: 2, B: 5, C: 3}
    for step in zip(*runs):
        assert len({key_of[i] for batch in step for i, _ in batch}) == 1
        assert all(len(batch) == 2 for batch in step)
    seen = Counter(i for r in runs for batch in r for i, _ in batch)
    assert set(seen) == set(range(20)) and sum(seen.values()) == 20 + 10


def test_disjoint_complete_coverage_when_buckets_fill_global_batches():
    buckets = {A: list(range(12)), B: list(range(12, 18))}
    runs = [_epoch(BucketSampler(buckets, batch_size=3, rank=r, world_size=2, seed=1)) for r in range(2)]
    per_rank = [[i for batch in r for i, _ in batch] for r in runs]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(18))
    assert not set(per_rank[0]) & set(per_rank[1])


def test_drop_last_counts_what_it_drops_and_empty_is_fatal():
    s = BucketSampler(BUCKETS, batch_size=2, world_size=3, drop_last=True)
    assert len(s) == 2 and s.dropped == {A: 4, B: 1, C: 3}
    runs = _all_ranks(3, 2, drop_last=True)
    ids = [i for r in runs for batch in r for i, _ in batch]
    assert len(ids) == len(set(ids)) == 20 - 8
    with pytest.raises(ValueError, match="no batch to draw.*17x64x96"):
        BucketSampler(BUCKETS, batch_size=4, world_size=4, drop_last=True)


def test_deterministic_per_seed_and_epoch():
    s1, s2 = (BucketSampler(BUCKETS, batch_size=2, rank=1, world_size=2, seed=7) for _ in range(2))
    assert s1.plan(0) == s2.plan(0) and _epoch(s1) == _epoch(s2)
    assert s1.plan(0) != s1.plan(1)  # epochs reshuffle (and redraw crop seeds)
    assert BucketSampler(BUCKETS, batch_size=2, world_size=2, seed=8).plan(0) != s1.plan(0)
    ordered = BucketSampler(BUCKETS, batch_size=5, shuffle=False)
    # unshuffled: buckets in key order (C < A < B), partial batches filled from their own start
    assert [[i for i, _ in b] for b in ordered.plan(0)] == [[17, 18, 19, 17, 18], list(range(5)),
                                                              list(range(5, 10)), list(range(10, 15)),
                                                              [15, 16, 10, 11, 12]]


def test_resume_mid_epoch_equals_uninterrupted():
    def make():
        return BucketSampler(BUCKETS, batch_size=2, rank=1, world_size=2, seed=3)

    ref = make()
    uninterrupted = _epoch(ref) + _epoch(ref)  # two epochs; the second iter() starts epoch 1
    first = make()
    it = iter(first)
    got = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 4
    resumed = make()
    resumed.load_state_dict(state)
    got += _epoch(resumed) + _epoch(resumed)
    assert got == uninterrupted  # batches and their crop seeds


def test_resume_with_a_changed_plan_is_refused_mid_epoch():
    s = BucketSampler(BUCKETS, batch_size=2, world_size=2)
    state = s.state_dict(position=3)
    with pytest.raises(ValueError, match="global_batch: saved 4, now 8"):
        BucketSampler(BUCKETS, batch_size=2, world_size=4).load_state_dict(state)
    # the same global batch split another way resumes mid-epoch with the same plan
    same = BucketSampler(BUCKETS, batch_size=4, world_size=1)
    same.load_state_dict(state)
    assert same.plan(0) == s.plan(0) and same.position == 3
    with pytest.raises(ValueError, match="fingerprint"):
        BucketSampler({A: BUCKETS[A]}, batch_size=2, world_size=2).load_state_dict(state)
    other = BucketSampler(BUCKETS, batch_size=2, world_size=4)
    other.load_state_dict(s.state_dict(position=0) | {"epoch": 2})  # at an epoch boundary: allowed
    assert other.epoch == 2 and other.position == 0
