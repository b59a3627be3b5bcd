"""safe_sqrt: the optimizer's square roots get derivative 0 at 0 instead of inf (values unchanged).

Invariant established: no ``aten.sqrt`` node that comes from ``torch.optim`` code remains; each became a
``where`` pair that computes the same values and whose derivative at 0 is 0.

Adam divides by ``sqrt(exp_avg_sq) + eps``. Where a gradient element has been exactly zero so far (a
dead ReLU unit, a padding embedding row), ``exp_avg_sq`` is 0 and autograd's ``d sqrt(x)/dx = 1/(2
sqrt(x))`` is inf; multiplied by the zero that flows back it gives NaN, and one NaN poisons every
meta-gradient. (Eager ``torch.optim`` with ``differentiable=True`` has the same NaN; ``higher`` masks it
by hand.) The rewrite, on the optimizer's nodes only::

    sqrt = aten.sqrt(v)
        ->
    pos = aten.gt.Scalar(v, 0);  safe = aten.where.self(pos, v, 1.0)
    sqrt = aten.where.self(pos, aten.sqrt(safe), 0.0)

For ``v > 0`` both value and derivative are sqrt's; for ``v == 0`` the value is 0 as before and the
derivative is 0 (the subgradient convention). The user's own ``sqrt`` in ``forward``/``loss_fn`` is
not touched.
"""

from __future__ import annotations

import torch
from torch import fx

from .strip_detach import written_by_user

__all__ = ["safe_sqrt"]

_aten = torch.ops.aten


def _from_optimizer(node: fx.Node) -> bool:
    # Nodes of the optimizer's step have no user frame (make_fx may record no stack trace at all for
    # code that lies entirely inside torch); the user's own sqrt has one.
    return not written_by_user(node)


def safe_sqrt(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the optimizer's ``sqrt`` nodes (see module docstring)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.sqrt.default or not _from_optimizer(node):
            continue
        (v,) = node.args
        if isinstance(v, fx.Node) and v.target is _aten.where.ScalarOther and v.args[2] == 1.0:
            continue  # already rewritten: the pass is idempotent
        with graph.inserting_before(node):
            pos = graph.call_function(_aten.gt.Scalar, (v, 0))
            safe = graph.call_function(_aten.where.ScalarOther, (pos, v, 1.0))
            root = graph.call_function(_aten.sqrt.default, (safe,))
            out = graph.call_function(_aten.where.ScalarOther, (pos, root, 0.0))
        for new in (pos, safe, root, out):
            new.meta.update({k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta})
        if "val" in node.meta:
            root.meta["val"] = out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
