"""Peak live tensor bytes of a computation, measured without running it: trace it on the meta device.

`PeakLiveBytes` is a `TorchDispatchMode` that counts every tensor storage an operator returns
until Python frees it (a weak reference per storage), and keeps the maximum. Run on "meta"
tensors the computation does no arithmetic and allocates nothing, so the activation peak of a
14B-model component at full size is known on any machine in about a second. What it counts is
what the code holds: the storages created inside the mode (inputs made outside it are not
counted), each once however many views share it. What it does not count: the CUDA caching
allocator's rounding (512 bytes, 2 MiB segments), cuDNN / cuBLAS workspaces and fragmentation;
`runtime.offload_plan` keeps a reserve for those.

The offload plan's VAE terms are checked against these traces (tests/test_offload_plan.py).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakLiveBytes", "peak_live_bytes"]


class PeakLiveBytes(TorchDispatchMode):
    """Inside `with PeakLiveBytes() as m:` every storage made by an operator counts from its creation
    until it is freed; `m.peak` is the largest sum seen, `m.now` the sum alive now."""

    def __init__(self):
        super().__init__()
        self._live: "weakref.WeakKeyDictionary[torch.UntypedStorage, int]" = weakref.WeakKeyDictionary()
        self.now = 0
        self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._live:
                    nbytes = storage.nbytes()
                    self._live[storage] = nbytes
                    weakref.finalize(storage, self._freed, nbytes)
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
        return out


def peak_live_bytes(fn: Callable[[], object]) -> int:
    """The peak live bytes while `fn()` runs (its result is dropped before returning)."""
    with PeakLiveBytes() as mode:
        result = fn()
        del result
    return mode.peak
