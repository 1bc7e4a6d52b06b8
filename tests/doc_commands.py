"""The shell commands of README.md and docs/*.md, and how tests/test_docs.py turns them into
tiny CPU runs: the page order, the block parser, the substitution table and the skip table.

Blocks: ```bash / ```sh / ```shell / ```console fences (console: the `$ ` lines), and untagged
fences whose first line starts like a command. Backslash continuations are joined and
comments dropped (shlex, so a `#` inside quotes stays).

Every command is either listed in SKIP (with the reason it cannot run here) or run after
SUBSTITUTIONS: one table, applied in order, that maps the 13B settings to the tiny presets
and the cluster sizes to 2 CPU ranks. Nothing else is changed; a command that fits neither
fails the test, and so does a SKIP entry that no longer matches any command.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "shell", "console"}
COMMAND_START = re.compile(r"^(\$ )?(python|torchrun|scripts/|make |bash |NPROC=|NNODES=|huggingface-cli|ln |pip )")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str
    """The command as the page shows it: continuations joined, comments dropped, shlex-normalised."""


def page_order() -> list[Path]:
    """docs/README.md's links in order (the workflow), then README.md, then any other docs page."""
    index = (ROOT / "docs" / "README.md").read_text()
    linked = [ROOT / "docs" / m for m in re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]*)?\)", index)]
    pages = list(dict.fromkeys(p for p in linked if p.is_file()))
    rest = sorted(p for p in (ROOT / "docs").glob("*.md") if p not in pages and p.name != "README.md")
    return [ROOT / "docs" / "README.md", *pages, ROOT / "README.md", *rest]


def _blocks(text: str):
    """(first line number, lines) of every shell block."""
    lang, start, buf = None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w-]*)\s*$", line)
        if lang is None and fence:
            lang, start, buf = fence.group(1), n + 1, []
        elif lang is not None and fence and not fence.group(1):
            first = next((b.strip() for b in buf if b.strip()), "")
            if lang in SHELL or (lang == "" and COMMAND_START.match(first)):
                yield start, buf, lang == "console"
            lang = None
        elif lang is not None:
            buf.append(line)


def commands(page: Path) -> list[Command]:
    out, rel = [], str(page.relative_to(ROOT))
    for start, lines, console in _blocks(page.read_text()):
        joined, first = "", None
        for n, raw in enumerate(lines, start):
            line = raw.strip()
            if console and not joined:
                if not line.startswith("$ "):
                    continue  # output lines
                line = line[2:]
            first = n if not joined else first
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            joined += line
            words = shlex.split(joined, comments=True)
            if words:
                out.append(Command(rel, first, shlex.join(words)))
            joined = ""
    return out


# (pattern on the page's command, reason). Each entry must match at least one command.
SKIP: list[tuple[str, str]] = [
    (r"^make (setup|demo|test)\b", ("builds .venv from the package index (network) or runs the whole suite; "
                                    "the demo runs in tests/test_demo.py with reduced steps")),
    (r"^python3 -m venv|pip install", "installs packages from the network"),
    (r"^huggingface-cli download", ("downloads the official weights (network, tens of GB); "
                                    "tests/docs_world.py writes tiny models at the same paths")),
    (r"scripts/launch_npu\.sh", "Ascend NPU (torch_npu, hccl): no device here; unverified on hardware"),
    (r"--device cuda|--attention flash-varlen|gpu_check\.sh", "needs a CUDA GPU (or flash_attn)"),
    (r"^NNODES=", "several nodes"),
    (r"^python scripts/bench\.py", ("benchmarks (minutes at these sizes); tests/test_bench.py runs each bench "
                                    "on small shapes")),
]


def _nproc(m: re.Match, cmd: str) -> str:
    """torchrun's rank count: the product of the command's (capped) parallel degrees, at least 2."""
    n = 1
    for flag in ("dp-replicate", "dp-shard", "cp", "tp"):
        d = re.search(rf"--parallel\.{flag} (\d+)", cmd)
        n *= min(int(d.group(1)), 2) if d and int(d.group(1)) > 0 else 1
    return f"--nproc-per-node {max(n, 2)}"


_TINY = {"hunyuan-video-t2v-lora": "tiny-lora", "hunyuan-video-i2v-lora": "tiny-i2v-lora",
         "hunyuan-video-i2v-dynamic": "tiny-i2v", "hunyuan-video-i2v": "tiny-i2v", "hunyuan-video-t2v": "tiny"}

# (pattern, replacement: a string or fn(match, command), why), applied in order.
SUBSTITUTIONS: list[tuple[str, object, str]] = [
    (r"^scripts/launch_cuda\.sh", "torchrun --nproc-per-node 8 scripts/train.py",
     "launch_cuda.sh is torchrun + CUDA environment + --device cuda; the same train.py on CPU ranks"),
    (r"(?<= )/data/raw/data\.txt", "data/synthetic/data.txt", "your dataset -> data.md's synthetic one"),
    (r"(?<= )/data/", "data/", "the cluster's data folder -> the workspace"),
    (r"(?<![\w/.-])hunyuan-video-(t2v|i2v)(-lora|-dynamic)?(?![\w/.-])", lambda m, c: m.group(0) if "plan_memory.py" in c else _TINY[m.group(0)],
     "13B presets -> tiny presets (plan_memory.py keeps the 13B: it plans on meta tensors)"),
    (r"--parallel\.(cp|tp|dp-replicate|dp-shard) ([3-9]|\d\d+)", r"--parallel.\1 2", "parallel degrees -> 2"),
    (r"--nproc-per-node \d+", _nproc, "one rank per unit of the (capped) layout, at least 2"),
    (r"--compile\.backend (inductor|auto|aot_eager)", "--compile.backend none",
     ("a block compile takes 30-130 s on 2 cores (even aot_eager with cp); compiled blocks on every layout "
      "are tests/test_parallel_compile.py's")),
    (r"--memory\.blocks-to-swap \d+", "--memory.blocks-to-swap 2", "the tiny DiT has 4 blocks"),
    (r"--global-batch-size \d+", "--global-batch-size 4", "tiny datasets"),
    (r"scripts/convert\.py (dit (?!.*--preset)|merge-lora (?!.*--preset)(?=.*--to (official|diffusers|hvfunc))).*$",
     lambda m, c: m.group(0) + (" --preset tiny-i2v" if "i2v" in c or "merge-lora" in c else " --preset tiny"),
     "the DiT architecture that convert.py dit / merge-lora --to need (their defaults: the 13B ones)"),
    (r"--validation\.every \d+", "--validation.every 2", "a validation at the last of the 2 steps"),
    (r"--validation\.(height|width) \d+", r"--validation.\1 32", "validation videos at the tiny size"),
    (r"--validation\.frames \d+", "--validation.frames 5", "5 frames: 2 latent frames"),
    (r"(scripts/train\.py .*--validation\.prompts .*)$", r"\1 --validation.sampling.steps 2",
     "2 Euler steps per validation video"),
    (r"(scripts/(train|train_vae)\.py .*)$", r"\1 --steps 2", "2 optimizer steps"),
    (r"(scripts/sample\.py .*)$", r"\1 --steps 2", "2 Euler steps"),
    (r"(scripts/make_dataset\.py .*)$", r"\1 --num-clips 4", "4 clips"),
]


def skip_reason(cmd: str) -> str | None:
    return next((why for pat, why in SKIP if re.search(pat, cmd)), None)


def substitute(cmd: str) -> str:
    for pat, rep, _ in SUBSTITUTIONS:
        cmd = re.sub(pat, (lambda m, r=rep, c=cmd: r(m, c)) if callable(rep) else rep, cmd)
    return cmd
