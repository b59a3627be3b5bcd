"""The working set of one step's backward: what autograd allocates beyond the step's tape while it backpropagates.

The checkpointed backward backpropagates one taped step at a time. Besides the tape (``taped_step_bytes``) and
the states around it (``unrollc.runtime.schedules.working_states``), the step's own backward needs memory for the
gradients it computes inside: the gradients of every intermediate, the double-backward's temporaries. How much
depends on the ops: about one parameter's worth per layer for an MLP with SGD, far less than the tape for an
LSTM (whose gates are saved, but whose backward is one fused kernel per layer), and about 1.5 times the tape for
a small CNN with BatchNorm, whose convolution double-backward runs several convolutions at once.

``backward_working_bytes(gm, requires_grad)`` measures it without real data: the step graph runs on ``meta``
tensors (shapes, strides and dtypes only; no memory, no arithmetic) with the taped inputs requiring grad, then
``torch.autograd.grad`` backpropagates it from gradients shaped like its outputs. A ``TorchDispatchMode`` sees
every op autograd runs, forward and backward, and records when an op returns a storage it has not seen (the
inputs' storages are known from the start: a view of an input is not an allocation); a weak reference to the
storage itself (not to the tensor: autograd keeps saved outputs alive through its own tensors) says when it is
freed. The working set is the peak of the live bytes during the backward minus the live bytes when it starts
(the tape), not counting the step's outputs, the incoming gradients and the gradients it returns, which the
schedule's working states count. The measurement was checked against the same tracker on real CPU tensors
(equal on an MLP, a CNN with BatchNorm and an LSTM) and against peak RSS of whole unrolls.

A graph that cannot run on meta tensors (an op without a meta kernel, a value read into Python) has no
measurement: the function returns None and the cost model falls back to one taped step, its estimate before.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .liveness import _NOT_DIFFERENTIABLE, _leaves_of_argument

__all__ = ["backward_working_bytes"]

_META = torch.device("meta")


class _StorageLifetimes(TorchDispatchMode):
    """Records ``(+1 | -1, serial, nbytes)`` when a storage an op returns is first seen and when it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int, int]] = []
        self._alive: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (weakref, serial)

    def seed(self, tensors: list[torch.Tensor]) -> None:
        """Storages that exist before the run (the graph's inputs): alive, and never counted as made by an op (a
        view of an input taken in the backward would otherwise count the input's storage as new)."""
        for t in tensors:
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self._alive:
                self._alive[key] = (weakref.ref(storage, self._freed(key, -1, 0)), -1)

    def serial(self, t: torch.Tensor) -> int | None:
        """The serial number of ``t``'s storage, if an op made it and it is alive."""
        entry = self._alive.get(id(t.untyped_storage()))
        return entry[1] if entry is not None else None

    def _freed(self, key: int, serial: int, nbytes: int) -> Any:
        def callback(_: Any) -> None:
            self._alive.pop(key, None)
            self.events.append((-1, serial, nbytes))
        return callback

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)  # unique while the storage lives; its weakref callback frees the id
                if key not in self._alive:
                    serial, nbytes = len(self.events), storage.nbytes()
                    self._alive[key] = (weakref.ref(storage, self._freed(key, serial, nbytes)), serial)
                    self.events.append((1, serial, nbytes))
        return out


class _OnMeta(fx.Interpreter):
    """Runs a step graph on meta tensors: constants and factory ops move to ``meta``; an argument autograd has no
    derivative for (batch norm's running statistics, taped as state) is detached, as eager autograd would need."""

    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _META}
        while True:  # autograd names one such argument per error
            try:
                return target(*args, **kwargs)
            except RuntimeError as e:
                names = _NOT_DIFFERENTIABLE.findall(str(e))
                leaves = {i for name in names for i in _leaves_of_argument(target, args, kwargs, name)}
                flat, spec = tree_flatten((args, kwargs))
                if not any(i in leaves and isinstance(a, torch.Tensor) and a.requires_grad for i, a in enumerate(flat)):
                    raise
                flat = [a.detach() if i in leaves and isinstance(a, torch.Tensor) else a for i, a in enumerate(flat)]
                args, kwargs = tree_unflatten(flat, spec)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device != _META:
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=_META)
    return x


def backward_working_bytes(gm: fx.GraphModule, requires_grad: frozenset[str]) -> int | None:
    """Peak bytes the backward of one run of ``gm`` allocates beyond the tape it starts from (see the module
    docstring); ``requires_grad``: the placeholders taped as requiring grad. None when the graph cannot run on
    meta tensors."""
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        t = _to_meta(val)
        inputs.append(t.requires_grad_(node.name in requires_grad and (t.is_floating_point() or t.is_complex())))
    track = _StorageLifetimes()
    track.seed(inputs)
    try:
        with torch.random.fork_rng(devices=[]), track, torch.enable_grad():
            outputs = [o for o in tree_leaves(_OnMeta(gm).run(*inputs)) if isinstance(o, torch.Tensor)]
            start = len(track.events)
            differentiable = [o for o in outputs if o.requires_grad]
            wrt = [t for t in inputs if t.requires_grad]
            if not differentiable or not wrt:
                return 0
            incoming = [torch.ones_like(o) for o in differentiable]
            grads = torch.autograd.grad(differentiable, wrt, incoming, allow_unused=True)
    except Exception:  # noqa: BLE001 - no meta kernel, a value read into Python, ...: no measurement
        return None
    counted_elsewhere = {track.serial(t) for t in (*outputs, *incoming, *(g for g in grads if g is not None))}
    live = at_start = peak = 0
    for i, (sign, serial, nbytes) in enumerate(track.events):
        if serial not in counted_elsewhere:
            live += sign * nbytes
        if i == start - 1:
            at_start = live
        if i >= start:
            peak = max(peak, live)
    return max(0, peak - at_start)
