"""What scripts/plan_memory.py fit prints: one query's settings, docs/memory.md's grid, and the
check of the measuring method against the peaks a GPU measured (docs/benchmarks.md)."""

from __future__ import annotations

from graphs import block_memory as bm
from hvfunc.config import DiTConfig
from hvfunc.dit_spec import dit_spec
from hvfunc.params import count
from parallel.memory_fit import CONTEXT_BYTES, FRAGMENTATION, GiB, WORKLOADS, Answer, Prediction, Query, Shape, fit

DEVICES = (("24 GB", 23.99), ("48 GB", 47.99), ("80 GB", 79.6), ("141 GB", 140.4))
"""Nominal size and the GiB nvidia-smi reports for it (RTX 4090, RTX 6000 Ada / A6000, H100, H200)."""
SHAPES = ("512x512x33", "544x960x65", "720x1280x129")
FULL_RANKS = 8
"""Full finetuning fits no single device (16 bytes per parameter: 191 GiB): the grid adds FSDP over 8."""
MEASURED: dict[tuple[str, str, str], str] = {}
"""(workload, shape, device GB) -> a measured peak of the full 13B (docs/benchmarks.md); none yet."""


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def _label(p: Prediction, q: Query) -> str:
    s = p.setting
    eager = " (eager blocks: compiled ones refuse offload with swap)" if s.recompute == "offload" and s.swap else ""
    return s.flags(q.cfg) + eager


def _row(label: str, p: Prediction, fit_: str) -> str:
    return (f"| {label} | {_gib(p.weights)} | {_gib(p.state)} | {_gib(p.activations)} | {_gib(p.host)} | "
            f"{_gib(p.peak)} | {fit_} |")


def _describe(q: Query) -> str:
    T, H, W = q.shape.grid(q.cfg)
    return (f"{q.workload} at {q.shape} ({T} x {H} x {W} = {T * H * W:,} video + {bm.TEXT_TOKENS} text tokens), "
            f"{q.cfg.mm_double_blocks_depth} + {q.cfg.mm_single_blocks_depth} blocks, {q.ranks} rank(s)")


def report(a: Answer, device_gb: float) -> str:
    """One query: the plain setting, then every (fp8, recompute) choice that fits with its fewest
    swapped blocks, the cheapest first; or, when nothing fits, the setting that comes closest."""
    q = a.query
    head = [f"{_describe(q)}, {device_gb:g} GiB device",
            f"predicted peak = (weights + state + activations) x {FRAGMENTATION:.2f} + {CONTEXT_BYTES // GiB} GiB; "
            "GiB = 2^30 bytes", "",
            "| setting | weights GiB | state GiB | activations GiB | pinned host GiB | predicted peak GiB | fits |",
            "|---|---|---|---|---|---|---|",
            _row(f"plain: {_label(a.plain, q)}", a.plain, "yes" if a.chosen == a.plain else "no")]
    if a.chosen is None:
        return "\n".join(head + [_row(f"smallest: {_label(a.smallest, q)}", a.smallest, "no"), "",
                                 "nothing fits: every setting's predicted peak exceeds the device"])
    return "\n".join(head + [_row(("cheapest: " if p is a.chosen else "") + _label(p, q), p, "yes")
                             for p in a.options])


def _queries(cfg: DiTConfig):
    for w in WORKLOADS:
        for ranks in ((1, FULL_RANKS) if w == "full" else (1,)):
            for sh in SHAPES:
                yield Query(cfg=cfg, workload=w, shape=Shape.parse(sh), ranks=ranks)


def table(cfg: DiTConfig) -> str:
    """docs/memory.md's grid (device x workload x shape: the cheapest setting that fits) and the
    plain settings' breakdown."""
    lines = ["| workload | shape (video tokens) | device (GiB) | cheapest setting that fits | predicted peak GiB | "
             "pinned host GiB | measured peak |", "|---|---|---|---|---|---|---|"]
    plain = ["| workload | shape | weights GiB | state GiB | activations GiB | predicted peak GiB |",
             "|---|---|---|---|---|---|"]
    for q in _queries(cfg):
        T, H, W = q.shape.grid(cfg)
        name = q.workload + (f", {q.ranks} ranks (FSDP)" if q.ranks > 1 else "")
        for name_gb, dev in DEVICES:
            a = fit(q, dev)
            got = (f"`{_label(a.chosen, q)}` | {_gib(a.chosen.peak)} | {_gib(a.chosen.host)}" if a.chosen
                   else f"nothing (closest: {_gib(a.smallest.peak)}) | - | -")
            lines.append(f"| {name} | {q.shape} ({T * H * W:,}) | {name_gb} ({dev:g}) | {got} | "
                         f"{MEASURED.get((q.workload, str(q.shape), name_gb), 'not measured')} |")
        p = a.plain
        plain.append(f"| {name} | {q.shape} | {_gib(p.weights)} | {_gib(p.state)} | {_gib(p.activations)} | "
                     f"{_gib(p.peak)} |")
    return "\n".join(lines + ["", *plain])


# (what, latent T x H x W, backward, measured GiB): docs/benchmarks.md, NVIDIA H100 80GB, torch 2.11,
# graphs.bench_dit eager rows: hidden 3072, 24 heads, 2 double + 4 single blocks, 256 text tokens, bf16
BENCH = (("forward", (9, 68, 120), False, 1.81), ("forward+backward", (9, 68, 120), True, 12.7),
         ("forward", (9, 90, 160), False, 3.18))


def check() -> str:
    """The fake-tensor measurement of graphs.bench_dit's eager rows next to the H100's peaks. The
    bench measures above the level at the call, which holds the weights and the previous repeat's
    gradients (its step frees them first), so the prediction subtracts the bf16 gradients."""
    from graphs.bench_dit import DiTBench

    lines = ["| bench row (eager) | latent | video tokens | predicted peak GiB | measured peak GiB (H100) |",
             "|---|---|---|---|---|"]
    for what, (f, h, w), backward, measured in BENCH:
        cfg = DiTBench(hidden=3072, heads=24, double=2, single=4, text_dim=4096).model()
        peak = bm.bench_step(cfg, (f, h // 2, w // 2), bm.TEXT_TOKENS, backward)
        peak -= 2 * count(dit_spec(cfg)) if backward else 0
        lines.append(f"| {what} | {f}x{h}x{w} | {f * h * w // 4:,} | {peak / GiB:.2f} | {measured} |")
    return "\n".join(lines)
