"""remove_copies: drop copies that functionalization and tracing leave behind.

Invariant established: no ``clone``, ``lift_fresh_copy``, same-shape/same-dtype functional ``copy`` or
transpose of a transpose (``t(t(x))``) remains: in a graph without mutation, each computes the same
value as its source, and autograd gives the same derivative, so every use can read the source instead::

    clone = aten.clone(grad)                    # SGD: torch.clone(grad) as first momentum buffer
    mul = aten.mul.Tensor(clone, 0.9)   ->      mul = aten.mul.Tensor(grad, 0.9)

    t_5 = aten.t(mm_1)                          # the weight gradient of a Linear layer, as traced through
    t_6 = aten.t(t_5)                   ->      #   its forward's t(): two views that undo each other
    mul_1 = aten.mul.Tensor(t_6, rsub)          mul_1 = aten.mul.Tensor(mm_1, rsub)

A ``copy(dst, src)`` whose ``src`` has another shape or dtype broadcasts or converts, and stays; so does a copy or
clone whose result has other strides than its source (a clone of a non-contiguous tensor is contiguous).
Runs after ``functionalize`` (it is only sound on a graph without in-place ops).
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["remove_copies"]

_aten = torch.ops.aten


def _same_layout(a: object, b: object) -> bool:
    """Whether two nodes' values have one shape, dtype and strides: a clone of a non-contiguous tensor
    (``h[:, :2].clone()``) is contiguous, and the ``view``/``as_strided`` after it read that layout (found in
    review: a view error every step, or other memory read silently)."""
    av, bv = getattr(a, "meta", {}).get("val"), getattr(b, "meta", {}).get("val")
    if not isinstance(av, torch.Tensor) or not isinstance(bv, torch.Tensor):
        return False
    return av.shape == bv.shape and av.dtype == bv.dtype and (av.numel() <= 1 or av.stride() == bv.stride())


def _source(node: fx.Node) -> fx.Node | None:
    if node.op != "call_function":
        return None
    if node.target in (_aten.clone.default, _aten.lift_fresh_copy.default) and not node.kwargs.get("memory_format"):
        return node.args[0] if _same_layout(node, node.args[0]) else None
    if node.target is _aten.t.default:
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is _aten.t.default:
            return inner.args[0]
    if node.target is _aten.copy.default:
        dst, src = node.args[0], node.args[1]
        if _same_layout(node, src) and _same_layout(dst, src):
            return src
    return None


def remove_copies(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace needless copies by their source (see module docstring)."""
    for node in list(gm.graph.nodes):
        src = _source(node)
        if isinstance(src, fx.Node):
            inner = node.args[0]
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            if inner is not src and inner.target is _aten.t.default and not inner.users:  # t(t(x)): the inner t()
                gm.graph.erase_node(inner)
    gm.graph.lint()
    gm.recompile()
    return gm
