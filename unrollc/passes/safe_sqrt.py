"""safe_sqrt: the optimizer's square roots get derivative 0 at 0 instead of inf (values unchanged).

Invariant established: no ``aten.sqrt`` node outside the user's own code remains; each now calls
``unrollc.safe_sqrt`` (:mod:`unrollc.ops`), which computes ``torch.sqrt`` and whose derivative is 0 where
the result is 0.

Adam divides by ``sqrt(exp_avg_sq) + eps``. Where a gradient element has been exactly zero so far (a
dead ReLU unit, a padding embedding row), ``exp_avg_sq`` is 0 and autograd's ``d sqrt(x)/dx = 1/(2
sqrt(x))`` is inf; multiplied by the zero that flows back it gives NaN, and one NaN poisons every
meta-gradient. (Eager ``torch.optim`` with ``differentiable=True`` has the same NaN; ``higher`` masks it
by hand.) The rewrite changes the operator, not the graph's shape::

    sqrt = aten.sqrt.default(addcmul)   ->   sqrt = unrollc.safe_sqrt.default(addcmul)

The forward runs the same kernel (bit-identical values, no extra ops); only the backward differs, at 0
(the subgradient convention). The user's own ``sqrt`` in ``forward``/``loss_fn`` is not touched.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import ops  # noqa: F401 - registers torch.ops.unrollc.safe_sqrt
from .strip_detach import written_by_user

__all__ = ["safe_sqrt"]


def safe_sqrt(gm: fx.GraphModule) -> fx.GraphModule:
    """Point the optimizer's ``sqrt`` nodes at ``unrollc.safe_sqrt`` (see module docstring)."""
    for node in gm.graph.nodes:
        # Nodes of the optimizer's step have no user frame (make_fx may record no stack trace at all for
        # code that lies entirely inside torch); the user's own sqrt has one.
        if node.op == "call_function" and node.target is torch.ops.aten.sqrt.default and not written_by_user(node):
            node.target = torch.ops.unrollc.safe_sqrt.default
    gm.graph.lint()
    gm.recompile()
    return gm
