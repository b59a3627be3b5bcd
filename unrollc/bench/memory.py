"""Measuring one run: peak memory (CPU resident set, CUDA allocator), bytes saved for backward, FLOPs executed.

CPU: glibc keeps freed memory in its arenas, so the worker process is started with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` (large tensors are mmap'ed and returned on free).
The peak is ``VmHWM`` (high-water mark of the resident set) minus ``VmRSS`` just before the run, with the
high-water mark reset through ``/proc/self/clear_refs`` (writing ``5``; Linux >= 4.0); the kernel's counters are
approximate, so the baseline is the smaller of the two just after the reset and a run that frees memory has peak 0. Where that reset is not
available, a thread samples ``VmRSS`` every millisecond instead (it can miss short peaks).

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocated bytes before.

Saved bytes: the peak, over the run, of the bytes held by autograd for backward (``saved_tensors_hooks``),
each storage counted once while any saved reference to it lives. It covers what autograd keeps; checkpoint
states kept by unrollc's executor outside autograd are not in it (the RSS peak covers everything).

FLOPs: every ATen op executed in the run, forward and backward (recomputations included), priced with
``torch.utils.flop_counter``'s formulas (mm, addmm, bmm, convolution, attention; elementwise ops count 0).
Where the matrix products are most of the time (SGD on the default MLP on CPU: 72-78%), the FLOP ratio of two
methods bounds their time ratio.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..analysis.liveness import op_flops

__all__ = ["FlopCount", "PeakMemory", "SavedBytes", "rss_bytes"]

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int | None:
    """The current resident set size of this process (None where /proc is not available)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True if it worked (checked: VmHWM must drop to about VmRSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` is the peak increase in bytes over the start.

    ``m.how`` says how it was measured: ``"cuda max_memory_allocated"``, ``"VmHWM (clear_refs)"`` or
    ``"VmRSS sampled 1 ms"``.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak: int | None = None
        self.how = ""
        self._base = 0
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.how = "cuda max_memory_allocated"
        elif _reset_hwm():
            # the kernel's RSS counters are approximate (per-CPU caches): the high-water mark just reset can read
            # below VmRSS, and the peak of a run that frees memory below the baseline (a peak of 0)
            self._base = min(rss_bytes() or 0, (_status_kib("VmHWM") or 0) * 1024)
            self.how = "VmHWM (clear_refs)"
        else:
            self._base = self._sampled = rss_bytes() or 0
            self.how = "VmRSS sampled 1 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, rss_bytes() or 0)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is None:
            self.peak = max(0, (_status_kib("VmHWM") or 0) * 1024 - self._base)  # never below the start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(0, self._sampled, rss_bytes() or 0) - self._base


class _Saved:
    """A saved tensor's handle; dropping the last handle of a storage releases its bytes from the count."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor: torch.Tensor, key: tuple[Any, int], owner: "SavedBytes") -> None:
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self) -> None:
        self.owner._release(self.key)


class SavedBytes:
    """Counts the bytes autograd saves for backward; ``peak`` is the most alive at once, ``total`` all saved."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.total = 0
        self._refs: dict[tuple[Any, int], list[int]] = {}   # storage key -> [references, bytes]

    def _pack(self, t: torch.Tensor) -> _Saved:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        entry = self._refs.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            self._refs[key] = [1, nbytes]
            self.live += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        return _Saved(t, key, self)

    def _release(self, key: tuple[Any, int]) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    @contextmanager
    def counting(self) -> Iterator["SavedBytes"]:
        """Count inside the block (hooks apply to graphs built in it, including re-runs during backward)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class FlopCount(TorchDispatchMode):
    """``with FlopCount() as f: ...`` then ``f.total`` is the FLOPs of the matrix products (and convolutions,
    attention) executed in the block, the backward included.

    Unlike ``torch.utils.flop_counter.FlopCounterMode`` it does not track modules (whose backward hooks refuse
    ``torch.autograd.grad`` on some graphs); it only prices each op with the same formulas.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if flops := op_flops(func, args, kwargs, out):
            self.total += flops
            name = str(func.overloadpacket)
            self.by_op[name] = self.by_op.get(name, 0) + flops
        return out


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float, PeakMemory]:
    """Run ``fn()`` once: its result, wall seconds (CUDA synchronised) and its :class:`PeakMemory`."""
    dev = torch.device(device)
    with PeakMemory(dev) as mem:
        start = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
    return out, seconds, mem
