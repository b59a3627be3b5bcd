"""safe_sqrt: the optimizer's square roots get derivative 0 at 0 instead of inf (values unchanged).

Invariant established: no ``aten.sqrt`` node outside the user's own code remains; each now calls
``unrollc.safe_sqrt`` or ``unrollc.safe_sqrt_masked`` (:mod:`unrollc.ops`), which compute ``torch.sqrt``
and whose derivative is 0 where the input is 0.

Adam divides by ``sqrt(exp_avg_sq) + eps``. Where a gradient element has been exactly zero so far (a
dead ReLU unit, a padding embedding row), ``exp_avg_sq`` is 0 and autograd's ``d sqrt(x)/dx = 1/(2
sqrt(x))`` is inf; multiplied by the zero that flows back it gives NaN, and one NaN poisons every
meta-gradient. (Eager ``torch.optim`` with ``differentiable=True`` has the same NaN; ``higher`` masks it
by hand.) The rewrite changes the operator, not the graph's shape::

    sqrt = aten.sqrt.default(addcmul)   ->   sqrt = unrollc.safe_sqrt.default(addcmul)

Values are bit-identical; only the derivative differs, at 0 (the subgradient convention). The pass picks
the implementation from the tensor the node computes: ``safe_sqrt`` (one sqrt kernel, a backward that
checks for zeros in Python) for CPU tensors of ``CHECKED_MIN_NUMEL`` elements or more, where extra
elementwise passes would cost more than the Python call; ``safe_sqrt_masked`` (two ``where`` around the
sqrt, ATen's autograd) for smaller tensors and on GPUs, where the check would synchronise the device.
The user's own ``sqrt`` in ``forward``/``loss_fn`` is not touched.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import ops  # noqa: F401 - registers torch.ops.unrollc.safe_sqrt
from .strip_detach import written_by_user

__all__ = ["CHECKED_MIN_NUMEL", "safe_sqrt"]

# Fastest first+second-order sqrt on one CPU thread (forward, backward and double backward): the masked
# composite up to ~8k elements (148 vs 200 us at 64), the checked op from ~16k (254 vs 268 us; 1016 vs 2143 us
# at 262k, where the masked form's extra kernels dominate).
CHECKED_MIN_NUMEL = 16384


def safe_sqrt(gm: fx.GraphModule) -> fx.GraphModule:
    """Point the optimizer's ``sqrt`` nodes at ``unrollc.safe_sqrt`` (see module docstring)."""
    for node in gm.graph.nodes:
        # Nodes of the optimizer's step have no user frame (make_fx may record no stack trace at all for
        # code that lies entirely inside torch); the user's own sqrt has one.
        if node.op == "call_function" and node.target is torch.ops.aten.sqrt.default and not written_by_user(node):
            node.target = _implementation(node.meta.get("val"))
    gm.graph.lint()
    gm.recompile()
    return gm


def _implementation(value: object) -> torch._ops.OpOverload:
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.numel() >= CHECKED_MIN_NUMEL:
        return torch.ops.unrollc.safe_sqrt.default
    return torch.ops.unrollc.safe_sqrt_masked.default
