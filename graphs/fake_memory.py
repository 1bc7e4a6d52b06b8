"""Live device bytes of a call, counted on tensor storages: works under FakeTensorMode.

`LiveBytes` is a dispatch mode that sees every aten op's outputs. An output whose storage
is new (not one of the op's inputs' storages, not seen before) is an allocation of
`storage.nbytes()`; a weak reference to the storage subtracts those bytes when torch frees
it (tensors kept by autograd for the backward, or by a checkpoint, stay alive and stay
counted). `level` is what is live now among the storages created under the mode, `peak`
its maximum. Views and in-place ops allocate nothing. Allocations inside a kernel that do
not pass the dispatcher as ops (scratch buffers of attention or matmul kernels) are not
seen; tests/test_memory_fit.py measures how close this comes to the CPU allocator's own
events (graphs.memory) on a real block.

Under `torch._subclasses.fake_tensor.FakeTensorMode` every op runs on metadata only, so a
full-width 13B block at 118,800 tokens is "run" in a fraction of a second without memory.
"""

from __future__ import annotations

import weakref

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(obj) -> list:
    return [t.untyped_storage() for t in tree_leaves(obj) if isinstance(t, Tensor)]


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under this mode that are still alive (`level`) and
    their maximum (`peak`); `reset_peak` starts a new maximum at the current level."""

    def __init__(self) -> None:
        super().__init__()
        self.level = 0
        self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # storage impl -> (bytes, weak ref)

    def _freed(self, key: int) -> None:
        n, _ = self._live.pop(key)
        self.level -= n

    def reset_peak(self) -> None:
        self.peak = self.level

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {st._cdata for st in _storages((args, kwargs))}
        for st in _storages(out):
            key = st._cdata
            if key in given or key in self._live:
                continue
            n = st.nbytes()
            self._live[key] = (n, weakref.ref(st, lambda _r, key=key: self._freed(key)))
            self.level += n
            self.peak = max(self.peak, self.level)
        return out


def fake_mode():
    """A FakeTensorMode in which plain factory calls (torch.empty, ...) make fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False)

