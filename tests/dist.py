"""Run a function on N local CPU processes with the gloo backend (test helper)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` processes; raises if any of them fails."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), fn, args), nprocs=world, join=True)


# warnings attributed to our packages, or to torch.distributed (c10d's deprecated collectives warn
# from its logging wrapper); torch's own internal ones (Dynamo instantiates autograd.Function) are not ours
OURS = r"(parallel|graphs|hvfunc|torch\.distributed)(\.|$)"


@contextlib.contextmanager
def deprecations_are_errors():
    """DeprecationWarning and FutureWarning from our code and torch.distributed raise inside the block
    (a spawned worker does not inherit pytest's -W filters)."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("error", category=category, module=OURS)
        yield
