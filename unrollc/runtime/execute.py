"""Running a step graph with less Python per op than ``GraphModule.__call__``.

A compiled step or update is a few dozen to a few hundred ATen calls on small tensors, and on a small
model the Python around each call is a large part of its time. FX's generated code calls every op as
``torch.ops.aten.mul.Tensor(a, b)``: four attribute lookups and ``OpOverload.__call__``, a Python frame
whose only statement is ``return self._op(*args, **kwargs)``. :func:`run_graph` runs the same code with
each such call bound to the overload's ``_op`` and without ``nn.Module.__call__``'s hook machinery; unrollc's
own composite ops (``safe_sqrt_masked``) call their Python kernel, which is what the dispatcher would run.
Measured on the CPU (torch 2.13, 1 thread), Adam's update for a width-40 MLP (70 ops): 660 µs -> 545 µs
with autograd recording, 528 µs -> 420 µs without.

The values, and autograd's graph, are exactly those of ``gm(*args)``: the same ops run in the same order
with the same arguments. A graph that is instrumented (module hooks, global or its own, or a patched
``forward``, which tests use to count evaluations) runs through ``gm(*args)`` so that the instrumentation
sees every evaluation.
"""

from __future__ import annotations

import itertools
import linecache
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from ..ops import COMPOSITE_KERNELS

__all__ = ["instrumented", "run_graph"]

_CALL = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.(\w+)\(")
_FILES = itertools.count()
_DIRECT: weakref.WeakKeyDictionary[fx.GraphModule, tuple[str, Callable[..., Any]]] = weakref.WeakKeyDictionary()


def instrumented(gm: fx.GraphModule) -> bool:
    """Whether calling ``gm`` runs something besides its code: its own or global module hooks (forward or
    backward), a patched forward."""
    from torch.nn.modules import module as nn_module

    return bool(
        gm._forward_hooks or gm._forward_pre_hooks or gm._backward_hooks or gm._backward_pre_hooks
        or "forward" in vars(gm) or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks
    )


def run_graph(gm: fx.GraphModule, args: Sequence[Any]) -> Any:
    """``gm(*args)``, with each op called directly (see the module docstring). An error an op raises (an
    embedding index out of range at step 2) gets a note naming the user's line that op was traced from."""
    try:
        if instrumented(gm):
            return gm(*args)
        return _direct(gm)(gm, *args)
    except Exception as exc:
        note = _traced_from(gm, exc)
        if note:
            exc.add_note(note)
        raise


def _traced_from(gm: fx.GraphModule, exc: BaseException) -> str | None:
    """``"unrollc: raised by ... traced from model.py:12 in forward: ..."`` for the step graph's line in ``exc``'s
    traceback (None when the error is not raised by a line of ``gm``'s code)."""
    from ..inspect.source import source_of

    tb, line = exc.__traceback__, None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith(("<unrollc graph", "<eval_with_key")):  # the innermost: a graph may call another
            line = linecache.getline(filename, tb.tb_lineno)
        tb = tb.tb_next
    name = line.strip().split(" = ", 1)[0] if line and " = " in line else None
    node = next((n for n in gm.graph.nodes if n.name == name), None) if name else None
    where = source_of(node) if node is not None else None
    if where is None:
        return None
    return f"unrollc: raised by the step graph's `{node.name}` ({node.target}), traced from {where.short()}"


def _direct(gm: fx.GraphModule) -> Callable[..., Any]:
    """``gm``'s generated ``forward`` with its op calls bound to the overloads' ``_op``; made once per code."""
    _LazyGraphModule.force_recompile(gm)  # a lazy graph's code is generated when first needed
    cached = _DIRECT.get(gm)
    if cached is not None and cached[0] is gm._code:
        return cached[1]
    namespace = dict(gm.forward.__globals__)

    def bind(match: re.Match[str]) -> str:
        try:
            op = getattr(getattr(getattr(torch.ops, match[1]), match[2]), match[3])
        except AttributeError:
            return match[0]
        if type(op) is not torch._ops.OpOverload:  # e.g. a TorchBind overload, whose __call__ does more
            return match[0]
        name = f"_op_{match[1]}_{match[2]}_{match[3]}"
        namespace[name] = COMPOSITE_KERNELS.get(op, op._op)
        return name + "("

    source = _CALL.sub(bind, gm._code)
    filename = f"<unrollc graph {next(_FILES)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)  # tracebacks show the line
    weakref.finalize(gm, linecache.cache.pop, filename, None)  # and it goes with the graph
    exec(compile(source, filename, "exec"), namespace)
    fn = namespace["forward"]
    _DIRECT[gm] = (gm._code, fn)
    return fn
