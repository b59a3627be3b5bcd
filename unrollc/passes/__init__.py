"""The pass pipeline: each pass is a plain ``GraphModule -> GraphModule`` function.

Read in order, it is the whole compiler after capture::

    lift_inputs          get_attr copies of params/buffers/state/hyper -> placeholders
    functionalize        in-place updates -> functional ones, no input mutation
    strip_detach         autograd/optimizer detaches that cut second-order paths -> removed
    strip_profiler       record_function ranges of Optimizer.step -> removed
    remove_copies        clone / lift_fresh_copy / same-shape copy -> their source
    eliminate_dead_code  unused nodes -> removed

``run_pipeline`` keeps the graph after each pass (``"after lift_inputs"``, ...) for inspection.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import fx

from .dead_code import eliminate_dead_code
from .functionalize import functionalize
from .lift_inputs import lift_inputs
from .remove_copies import remove_copies
from .strip_detach import strip_detach
from .strip_profiler import strip_profiler

__all__ = ["PIPELINE", "run_pipeline", "Pass"]

Pass = Callable[[fx.GraphModule], fx.GraphModule]

PIPELINE: tuple[Pass, ...] = (
    lift_inputs,
    functionalize,
    strip_detach,
    strip_profiler,
    remove_copies,
    eliminate_dead_code,
)


def run_pipeline(gm: fx.GraphModule, *, keep: bool = False, check: bool = False) -> tuple[fx.GraphModule, dict[str, fx.GraphModule]]:
    """Run every pass of :data:`PIPELINE` in order; with ``keep`` also return a copy after each pass."""
    graphs: dict[str, fx.GraphModule] = {}
    if keep:
        graphs["captured"] = _snapshot(gm)
    for p in PIPELINE:
        gm = p(gm)
        if keep:
            graphs[f"after {p.__name__}"] = _snapshot(gm)
    return gm, graphs


def _snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    return new
