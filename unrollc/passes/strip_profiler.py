"""strip_profiler: remove ``torch.optim``'s profiler ranges.

Invariant established: no node of the ``profiler`` namespace remains (``Optimizer.step`` opens a
``record_function`` range, which make_fx records as ``profiler._record_function_enter_new`` /
``_record_function_exit``; they carry no data and would keep their operands alive).
"""

from __future__ import annotations

from torch import fx

from .schema import namespace

__all__ = ["strip_profiler"]


def strip_profiler(gm: fx.GraphModule) -> fx.GraphModule:
    """Erase profiler nodes (exits first, since they use the enter node)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and namespace(n.target) == "profiler"]
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
