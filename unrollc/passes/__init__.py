"""The pass pipeline: each pass is a plain ``GraphModule -> GraphModule`` function.

Read in order, it is the whole compiler after capture::

    lift_inputs          get_attr copies of params/buffers/state/hyper -> placeholders
    functionalize        in-place updates -> functional ones, no input mutation
    strip_detach         autograd/optimizer detaches that cut second-order paths -> removed
    strip_profiler       record_function ranges of Optimizer.step -> removed
    remove_copies        clone / lift_fresh_copy / same-shape copy -> their source
    eliminate_dead_code  unused nodes -> removed
    python_pow           the optimizer's powers of Python numbers (bias_correction2 ** 0.5) -> C's pow, as Python's **
    cse                  identical pure computations (the optimizer's per-parameter hyperparameter maths) -> one
    safe_sqrt            the optimizer's sqrt -> same values, derivative 0 at 0 (no NaN meta-gradients);
                         last, so "after cse" is the graph for steps that need no gradient

``run_pipeline`` keeps the graph after each pass (``"after lift_inputs"``, ...) for inspection, and with
``check=True`` verifies after each pass the guarantees stated above (:mod:`unrollc.inspect.lint`).
"""

from __future__ import annotations

import copy
import linecache
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.graph_module import _loader as _fx_sources
from torch.utils._pytree import tree_leaves

from ..capture import fake_mode
from .cse import cse
from .dead_code import eliminate_dead_code
from .functionalize import functionalize
from .lift_inputs import lift_inputs
from .python_pow import python_pow
from .remove_copies import remove_copies
from .safe_sqrt import safe_sqrt
from .strip_detach import strip_detach
from .strip_profiler import strip_profiler

__all__ = ["PIPELINE", "run_pipeline", "release_examples", "forget_sources", "LazyGraphModule", "Pass"]

Pass = Callable[[fx.GraphModule], fx.GraphModule]

PIPELINE: tuple[Pass, ...] = (
    lift_inputs,
    functionalize,
    strip_detach,
    strip_profiler,
    remove_copies,
    eliminate_dead_code,
    python_pow,
    cse,
    safe_sqrt,
)


def run_pipeline(
    gm: fx.GraphModule, *, keep: bool = False, check: bool = False, passes: Sequence[Pass] | None = None
) -> tuple[fx.GraphModule, dict[str, fx.GraphModule]]:
    """Run every pass of :data:`PIPELINE` (or ``passes``) in order.

    Args:
        gm: the captured graph (``gm.meta["unrollc"]`` holds what ``lift_inputs`` needs).
        keep: also return a copy of the graph before the first pass (``"captured"``) and after each pass
            (``"after lift_inputs"``, ``"after functionalize"``, ...), in order.
        check: after each pass, lint the graph and verify the guarantees of the passes run so far
            (:mod:`unrollc.inspect.lint`); a violation raises ``PassCheckError`` naming the pass.
        passes: the passes to run instead of :data:`PIPELINE` (testing, experiments).
    """
    passes = PIPELINE if passes is None else tuple(passes)
    graphs: dict[str, fx.GraphModule] = {}
    if keep:
        graphs["captured"] = _snapshot(gm)
    done: list[str] = []
    for p in passes:
        n_outputs = _n_outputs(gm) if done else None  # lift_inputs may not change it either, but checks start after it
        gm = p(_lazy(gm))  # a pass's recompile() then only marks the code stale: it is generated once, at the end
        done.append(p.__name__)
        if check:
            from ..inspect.lint import check_after

            check_after(gm, done, n_outputs)
        if keep:
            graphs[f"after {p.__name__}"] = _snapshot(gm)
    if isinstance(gm, _LazyGraphModule):
        gm.real_recompile()
    return gm, graphs


def _n_outputs(gm: fx.GraphModule) -> int:
    output = next(iter(gm.graph.find_nodes(op="output")))
    return len(output.args[0])


class LazyGraphModule(_LazyGraphModule):
    """A ``GraphModule`` whose Python code is generated when it is first run or read (torch's
    ``_LazyGraphModule``), and whose generated source torch.fx's process-wide caches forget when it is collected.

    The pipeline's graphs are made of it: each pass used to generate the code of the whole graph again, and each
    kept pass graph its own, which no one reads unless inspecting (a fifth of a trace's time for 50 parameter
    tensors)."""

    def _real_recompile(self) -> Any:
        code = super()._real_recompile()
        key = self.forward.__code__.co_filename  # torch.fx's key of the source (linecache, its loader)
        weakref.finalize(self, forget_sources, (key,))
        return code


def forget_sources(keys: Iterable[str]) -> None:
    """Drop the generated sources torch.fx keeps process-wide (its loader, ``linecache``) for graphs now gone."""
    for key in keys:
        _fx_sources.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)


def _lazy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as a :class:`LazyGraphModule` sharing its graph, attributes and metadata (``gm`` itself if it is one)."""
    if isinstance(gm, LazyGraphModule):
        return gm
    new = LazyGraphModule(gm, gm.graph)
    new.meta = gm.meta
    return new


def _snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    new = LazyGraphModule(gm, copy.deepcopy(gm.graph))
    # Own copy of unrollc's metadata: the runtime drops capture-only entries from the live graph's dict
    # later, while explain reads ``constants`` of the "captured" snapshot (which get_attr became which input).
    # The example inputs are only needed by lift_inputs and are not kept.
    new.meta.update(gm.meta)
    if isinstance(gm.meta.get("unrollc"), dict):
        new.meta["unrollc"] = {k: v for k, v in gm.meta["unrollc"].items() if k != "example_inputs"}
    return new


def release_examples(gm: fx.GraphModule) -> None:
    """Replace the real tensors ``gm`` keeps from its trace by fake tensors of the same layout, dtype and device,
    which hold no memory: its placeholders' ``meta["val"]`` (the example inputs, copies of the weights and
    optimizer state at trace time) and, in the ``"captured"`` graph, the closed-over tensors that ``lift_inputs``
    makes inputs (``meta["unrollc"]["constants"]`` is re-keyed to them). A cached step graph then holds no copy of
    the model. The graph runs as before: it reads its inputs, not these (``"captured"`` is for reading only).
    Other graph constants (small tensors the graph computes with) are left as they are."""
    mode = fake_mode()

    def fake(t: torch.Tensor) -> torch.Tensor:
        return t if isinstance(t, FakeTensor) or t.device.type == "meta" else mode.from_tensor(t)

    for node in gm.graph.find_nodes(op="placeholder"):
        if isinstance(val := node.meta.get("val"), torch.Tensor):
            node.meta["val"] = fake(val)
    for node in gm.graph.nodes:  # a FakeTensorMode keeps the stack it was made in (functionalize's re-trace)
        for val in tree_leaves(node.meta.get("val")):
            if isinstance(val, FakeTensor) and val.fake_mode._stack_trace:
                val.fake_mode._stack_trace = traceback.StackSummary()  # debugging text only: 5 KB a node
    info = gm.meta.get("unrollc")
    constants = info.get("constants") if isinstance(info, dict) else None
    if not constants:
        return
    stand_ins: dict[int, torch.Tensor] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        owner, _, name = str(node.target).rpartition(".")
        module = gm.get_submodule(owner)
        value = getattr(module, name, None)
        if not isinstance(value, torch.Tensor) or id(value) not in constants:
            continue
        stand_in = stand_ins.setdefault(id(value), fake(value.detach()))
        for slot in (module._parameters, module._buffers, module.__dict__):
            slot.pop(name, None)
        module.register_buffer(name, stand_in)
    info["constants"] = {id(stand_ins[k]) if k in stand_ins else k: v for k, v in constants.items()}


