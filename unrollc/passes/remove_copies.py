"""remove_copies: drop copies that functionalization and tracing leave behind.

Invariant established: no ``clone``, ``lift_fresh_copy`` or same-shape/same-dtype functional ``copy``
remains: in a graph without mutation, a copy computes the same value as its source, and autograd
gives the same derivative, so every use of the copy can read the source instead::

    clone = aten.clone(grad)                    # SGD: torch.clone(grad) as first momentum buffer
    mul = aten.mul.Tensor(clone, 0.9)   ->      mul = aten.mul.Tensor(grad, 0.9)

A ``copy(dst, src)`` whose ``src`` has another shape or dtype broadcasts or converts, and stays.
Runs after ``functionalize`` (it is only sound on a graph without in-place ops).
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["remove_copies"]

_aten = torch.ops.aten


def _source(node: fx.Node) -> fx.Node | None:
    if node.op != "call_function":
        return None
    if node.target in (_aten.clone.default, _aten.lift_fresh_copy.default) and not node.kwargs.get("memory_format"):
        return node.args[0]
    if node.target is _aten.copy.default:
        dst, src = node.args[0], node.args[1]
        dv, sv = dst.meta.get("val"), getattr(src, "meta", {}).get("val")
        if isinstance(dv, torch.Tensor) and isinstance(sv, torch.Tensor) and dv.shape == sv.shape and dv.dtype == sv.dtype:
            return src
    return None


def remove_copies(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace needless copies by their source (see module docstring)."""
    for node in list(gm.graph.nodes):
        src = _source(node)
        if isinstance(src, fx.Node):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
