"""eliminate_dead_code: remove nodes whose values nothing uses.

Invariant established: every node feeds the output (placeholders excepted: the step signature is
fixed). Random ops stay only if used; there are no side-effecting ops left after ``functionalize``
and ``strip_profiler``.
"""

from __future__ import annotations

from torch import fx

__all__ = ["eliminate_dead_code"]


def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """Erase unused nodes and the constants only they referred to."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k in list(gm._buffers) + list(vars(gm)) if k.startswith("_tensor_constant")]:
        if name not in used and hasattr(gm, name):
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return gm
