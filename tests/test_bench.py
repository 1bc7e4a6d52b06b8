"""Benchmark measurement helpers count what the analytic model says is there."""

import torch
import torch.nn.functional as F
from conftest import dit_inputs, random_params

from graphs.bench import count_flops
from hvfunc import dit
from hvfunc.config import DIT_PRESETS
from hvfunc.flops import forward_flops


def test_cpu_attention_flops_equal_explicit_matmuls():
    """SDPA on CPU runs a kernel torch's counter has no formula for (it counted 0)."""
    q, k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(3))
    explicit = count_flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert explicit == 2 * (2 * 2 * 3 * 40 * 40 * 16)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == explicit
    # backward: dQ, dK, dV, dP plus the recomputed scores = 2.5x the forward (flash-style count)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == explicit * 7 // 2


def test_vae_conv_flops_are_counted_on_cpu():
    """The VAE's CPU conv (oneDNN, called directly) counts like F.conv3d: 2 x out voxels x
    Cout x Cin x k^3 (torch's counter had no formula for it: a VAE decode counted ~0)."""
    from hvfunc.vae.blocks import conv3d

    x, w = torch.randn(1, 8, 5, 16, 16), torch.randn(6, 8, 3, 3, 3)
    want = 2 * (3 * 14 * 14) * 6 * 8 * 27
    assert count_flops(lambda: F.conv3d(x, w)) == want
    assert count_flops(lambda: conv3d(x, w, None)) == want


def test_dit_forward_flops_match_the_analytic_count():
    cfg = DIT_PRESETS["tiny"]
    params = random_params(cfg)
    inp = dit_inputs(cfg, B=1, lens=(12,), T=2, H=8, W=8)
    counted = count_flops(lambda: dit.forward(params, **inp, cfg=cfg))
    video = 2 * 4 * 4
    expected = forward_flops(cfg, batch=1, video_tokens=video, text_tokens=12)
    # the analytic count leaves out per-sample work (modulation, embedders): a few percent here
    assert expected <= counted <= 1.1 * expected, (counted, expected)


def test_train_bench_credits_model_flops_for_every_recompute_mode():
    """The train bench counts FLOPs on an eager step without recompute (FlopCounterMode is a
    dispatch mode, which a compiled selective-checkpoint block refuses), so every recompute
    mode is credited the same model FLOPs as the plain forward+backward."""
    from graphs.bench_dit import DiTBench, TrainBench, bench_dit

    shapes = dict(hidden=64, heads=2, double=1, single=1, frames=2, height=8, width=8, text_len=8, text_dim=32,
                  repeats=1)

    def flops(rows, impl):
        (r,) = [r for r in rows if r["impl"] == impl and r["bench"].endswith("forward+backward")]
        return round(r["tflops"] * r["seconds"] * 1e12)

    plain = flops(bench_dit(DiTBench(**shapes)), "hvfunc")
    for mode in ("full", "selective"):
        rows = bench_dit(TrainBench(**shapes, compile="aot_eager", recompute_mode=mode))
        assert flops(rows, f"hvfunc+recompute ({mode})") == plain
        assert flops(rows, "diffusers+checkpointing") == plain


def test_bench_cli_prints_the_table_and_writes_json(tmp, capfd):
    """scripts/bench.py: rows for ours (eager, compiled) and diffusers, printed and saved; no profiler
    log lines (kineto's USDT/STAGE lines of the CPU peak-memory reads) on the file descriptors."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_cli", Path(__file__).resolve().parents[1] / "scripts/bench.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    out = tmp / "sub" / "dit.json"
    rows = cli.main(["dit", "--hidden", "64", "--heads", "2", "--double", "1", "--single", "1", "--text-len", "8",
                     "--text-dim", "32", "--frames", "2", "--height", "8", "--width", "8", "--repeats", "1",
                     "--compile", "aot_eager", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["impl"] for r in saved["rows"]] == [r["impl"] for r in rows] == \
        ["hvfunc", "hvfunc+compile", "diffusers"] * 2
    assert saved["config"]["hidden"] == 64 and saved["machine"] and rows[0]["ratio"] > 0
    assert all(r["tflops"] > 0 and r["peak_mem_gb"] > 0 for r in rows)
    table, err = capfd.readouterr()
    assert "| dit forward+backward | hvfunc+compile |" in table and "| dit forward | diffusers |" in table
    noise = [x for x in (table + err).splitlines() if "profiler_st" in x or x.startswith(("USDT:", "STAGE:"))]
    assert noise == []


def test_lora_bench_rows(tmp_path):
    """bench.py lora: a full-finetune row and a LoRA row at the same shapes; the LoRA's trainable
    parameters are exactly the adapters of hvfunc.lora's spec and it holds less state."""
    import json

    from graphs.bench_lora import LoraBench
    from hvfunc import lora

    argv = ["lora", "--hidden", "64", "--heads", "2", "--double", "1", "--single", "1", "--frames", "2",
            "--height", "4", "--width", "4", "--text-len", "4", "--text-dim", "32", "--repeats", "1", "--rank", "4",
            "--json", str(tmp_path / "lora.json")]
    import importlib.util
    import math
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_cli", Path(__file__).resolve().parents[1] / "scripts/bench.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rows = cli.main(argv)
    assert [r["impl"] for r in rows] == ["full finetune", "lora r4"]
    cfg = LoraBench(hidden=64, heads=2, double=1, single=1, text_dim=32).model()
    want = sum(math.prod(s.shape) for s in lora.lora_spec(cfg, lora.LoraConfig(rank=4, alpha=4.0)).values())
    assert rows[1]["trainable_params"] == want and rows[0]["trainable_params"] > want
    assert rows[1]["state_gb"] < rows[0]["state_gb"] and 0 < rows[1]["mem_ratio"] and rows[1]["ratio"] > 0
    assert [r["impl"] for r in json.loads((tmp_path / "lora.json").read_text())["rows"]] == ["full finetune", "lora r4"]
