"""Every shell command shown in README.md and docs/*.md runs (docs cannot rot; issue 17).

One temporary workspace holds what a user has after docs/weights.md's downloads (tiny random
models at the documented paths, tests/docs_world.py); then every command of the pages, in
docs/README.md's workflow order, runs there on CPU after tests/doc_commands.py's substitution
table, so outputs of one step feed the next (make_dataset -> extract -> train -> export ->
sample). Each must exit 0 and create what its --out / --target names (a train.py run with
--validation.every: also its validation mp4s, one per prompt and due step). A command that is
neither runnable nor in the skip table fails the test, and so does a skip entry that no
longer matches any command. A command that ran already (same text after substitution) is
not run again.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import doc_commands as dc
import docs_world
import pytest

RUNNABLE = re.compile(r"^(python scripts/|torchrun --nproc-per-node \d+ scripts/|ln -s )")
OUTPUT_FLAGS = ("--out", "--target")


def _env(ws: Path) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "HOME": os.environ.get("HOME", str(ws))}


def _outputs(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_FLAGS]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: str, ws: Path) -> tuple[str, str | None]:
    """Its wall seconds and None, or and what went wrong."""
    t0 = time.perf_counter()
    proc = subprocess.run(shlex.split(cmd), cwd=ws, env=_env(ws), capture_output=True, text=True,
                          timeout=600, check=False)
    took = f"{time.perf_counter() - t0:5.1f}s"
    if proc.returncode != 0:
        return took, f"exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}"
    missing = [o for o in _outputs(cmd) if not (ws / o).exists()] + _missing_videos(cmd, ws)
    return took, f"exit 0 but {missing} were not written" if missing else None


def _flag(words: list[str], name: str) -> str | None:
    """The value of a command's last `name` flag (tyro: the last one wins)."""
    return next((words[i + 1] for i in range(len(words) - 2, -1, -1) if words[i] == name), None)


def _missing_videos(cmd: str, ws: Path) -> list[str]:
    """A train.py run with --validation.every N and --steps S owes one mp4 per line of its
    --validation.prompts file in <out>/samples/step-<k, 8 digits>/ for every multiple k of N up to S:
    the sample folders (with their mp4 counts) that fall short."""
    words = shlex.split(cmd)
    every, steps = _flag(words, "--validation.every"), _flag(words, "--steps")
    if "scripts/train.py" not in words or every is None or steps is None:
        return []
    lines = (ws / _flag(words, "--validation.prompts")).read_text().splitlines()
    prompts = sum(1 for x in lines if x.strip())
    folders = [ws / _flag(words, "--out") / "samples" / f"step-{k:08d}"
               for k in range(int(every), int(steps) + 1, int(every))]
    if not folders:
        return [f"any validation video (--validation.every {every} > --steps {steps})"]
    got = {f: len(list(f.glob("*.mp4"))) for f in folders}
    return [f"{f.relative_to(ws)}/*.mp4 ({n} of {prompts})" for f, n in got.items() if n != prompts]


def plan() -> list[tuple[dc.Command, str, str]]:
    """(command, action, detail): action "run" (detail: the substituted command), "skip" (the reason)."""
    out = []
    for page in dc.page_order():
        for c in dc.commands(page):
            reason = dc.skip_reason(c.text)
            out.append((c, "skip", reason) if reason else (c, "run", dc.substitute(c.text)))
    return out


def test_every_documented_command_is_run_or_skipped_with_a_reason():
    steps = plan()
    unknown = [f"{c.page}:{c.line}: {sub}" for c, act, sub in steps
               if act == "run" and (not RUNNABLE.match(sub) or "..." in sub)]
    assert not unknown, ("commands neither runnable here nor in doc_commands.SKIP (add a skip reason, or make "
                         "the command complete: no '...' placeholders):\n" + "\n".join(unknown))
    texts = [c.text for c, _, _ in steps]
    stale = [pat for pat, _ in dc.SKIP if not any(re.search(pat, t) for t in texts)]
    assert not stale, f"SKIP entries that match no documented command: {stale}"


def _paths(cmd: str) -> set[str]:
    """Every word of a command that is not a flag, as a path (a LoRA's :SCALE dropped): what it may read."""
    words = [re.sub(r":[\d.]+$", "", w) for w in shlex.split(cmd)[1:]]
    return {os.path.normpath(w) for w in words if w and not w.startswith("-")}


def _writes(cmd: str) -> set[str] | None:
    """The paths a command writes (its --out / --target, ln's link); None: unknown (a writing script
    without them, e.g. one relying on a default output folder), which runs alone."""
    words = shlex.split(cmd)
    if words[0] == "ln":
        return {os.path.normpath(words[-1])}
    out = {os.path.normpath(o) for o in _outputs(cmd)}
    return out if out or "plan_memory.py" in cmd else None


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _after(cmd: str, earlier: str) -> bool:
    """Must `cmd` wait for `earlier`? When both launch torchrun (one port, the same 2 cores), when
    either writes a path the other names (equal, inside or around it), or when one's writes are unknown."""
    if cmd.startswith("torchrun") and earlier.startswith("torchrun"):
        return True
    w1, w2 = _writes(cmd), _writes(earlier)
    if w1 is None or w2 is None:
        return True
    return any(_related(a, b) for a in w1 for b in _paths(earlier) | w2) or \
        any(_related(a, b) for a in w2 for b in _paths(cmd) | w1)


@pytest.mark.slow
def test_documented_commands_run(tmp_path):
    """Commands in document order, two at a time where neither writes a path the other names."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "scripts").symlink_to(dc.ROOT / "scripts")
    docs_world.build(ws)
    steps = plan()
    todo, log, seen = [], [], set()
    for c, act, sub in steps:
        if act == "skip":
            log.append(f"skip {c.page}:{c.line} ({sub})")
        elif sub in seen:
            log.append(f"same {c.page}:{c.line} (ran above)")
        else:
            seen.add(sub)
            todo.append((c, sub))
    started, failures = [], []
    with ThreadPoolExecutor(2) as pool:
        for c, sub in todo:
            wait([f for s, f in started if _after(sub, s)])
            while sum(not f.done() for _, f in started) >= 2:
                wait([f for _, f in started], return_when=FIRST_COMPLETED)
            failures = [err for _, f in started if f.done() for err in [f.result()[1]] if err]
            if failures:
                break  # later steps read earlier steps' outputs
            started.append((sub, pool.submit(_logged, c, sub, ws)))
    failures = [err for _, f in started for err in [f.result()[1]] if err]
    log += [f.result()[0] for _, f in started]
    print("\n".join(log) + f"\ncommands' CPU time: {_cpu():.0f} s")
    assert not failures, failures[0]


def _logged(c: dc.Command, sub: str, ws: Path) -> tuple[str, str | None]:
    took, err = _run(sub, ws)
    line = f"{took} {c.page}:{c.line} {sub}"
    print(line, flush=True)
    return line, err and f"{c.page}:{c.line}: {sub}\n{err}"
