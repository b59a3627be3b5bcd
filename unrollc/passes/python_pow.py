"""python_pow: the optimizer's powers of Python numbers compute what Python's ``**`` computes (values bit-identical
to eager ``torch.optim``).

Invariant established: no ``aten.pow.Tensor_Scalar`` node of the optimizer's remains on a 0-dim float64 CPU
tensor computed from hyperparameters and step counters alone; each is ``aten.pow.Tensor_Tensor`` with the
exponent as a tensor.

Eager ``torch.optim`` computes its scalar maths in Python floats: Adam's ``bias_correction2 ** 0.5``, RAdam's
rectification, Adafactor's ``step ** 0.5``. unrollc carries hyperparameters and step counters as float64 tensors
so that they can be learned, so the traced step computes those lines with tensors, and ATen's ``pow`` with a
Python exponent has fast paths (``0.5`` is ``sqrt``, ``-0.5`` is ``rsqrt``, small integers are products) that
round differently from C's ``pow``, which Python calls: measured on random inputs, ``x ** 0.5`` differs in 1-2% of
cases (CPU ``sqrt`` here is not correctly rounded either), ``x ** -0.5`` in ~23%. For Adam with
``betas=(0.9, 0.99)`` in float64, that put the parameters one ulp off eager's from step 42 on. ATen's ``pow``
with a tensor exponent calls C's ``pow`` on 0-dim CPU tensors: bit for bit Python's ``**``::

    pow_5 = aten.pow.Tensor_Scalar(rsub_3, 0.5)   ->   full_like = aten.full_like.default(rsub_3, 0.5)
                                                       pow_5 = aten.pow.Tensor_Tensor(rsub_3, full_like)

The derivative is pow's (the exponent is a constant). The user's own ``**`` in ``forward``/``loss_fn``, powers of
tensors that depend on the weights, the batch or other optimizer state, and other dtypes and devices are not
touched. Hyperparameters are rewritten whatever the user gave: with float64 *tensor* ``betas`` eager code computes
these powers with ATen's fast paths, and the step graph with C's ``pow`` (an ulp apart at most, as before the pass,
which the README documents for tensor hyperparameters).
"""

from __future__ import annotations

import numbers

import torch
from torch import fx

from .strip_detach import written_by_user

__all__ = ["python_pow", "pows_of_python_numbers"]


def python_pow(gm: fx.GraphModule) -> fx.GraphModule:
    """Give the optimizer's scalar ``x ** c`` a tensor exponent, so it computes Python's ``**`` (module docstring)."""
    for node in pows_of_python_numbers(gm):
        base, exponent = node.args
        with gm.graph.inserting_before(node):
            full = gm.graph.call_function(torch.ops.aten.full_like.default, (base, float(exponent)))
        full.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        val = node.meta["val"]
        full.meta["val"] = val.new_empty(()) if hasattr(val, "fake_mode") else None
        node.target, node.args = torch.ops.aten.pow.Tensor_Tensor, (base, full)
    gm.graph.lint()
    gm.recompile()
    return gm


def pows_of_python_numbers(gm: fx.GraphModule) -> list[fx.Node]:
    """The optimizer's ``aten.pow.Tensor_Scalar`` nodes on 0-dim float64 CPU tensors computed from hyperparameters,
    step counters and constants alone: what eager ``torch.optim`` computes as ``float ** number``."""
    scalar_side: set[fx.Node] = set()
    found = []
    for node in gm.graph.nodes:
        if not _from_python_numbers(node, scalar_side):
            continue
        scalar_side.add(node)
        if (node.target is torch.ops.aten.pow.Tensor_Scalar and len(node.args) == 2 and not node.kwargs
                and isinstance(node.args[1], numbers.Real) and not isinstance(node.args[1], bool)
                and _is_cpu_float64_scalar(node.meta.get("val"))):
            found.append(node)
    return found


def _from_python_numbers(node: fx.Node, scalar_side: set[fx.Node]) -> bool:
    """Whether ``node`` is a 0-dim tensor computed from hyperparameters, step counters and constants alone: a
    value eager ``torch.optim`` computes as a Python number."""
    if not _is_scalar(node.meta.get("val")):
        return False
    if node.op == "placeholder":
        info = node.meta.get("unrollc")
        role, name = getattr(info, "role", None), getattr(info, "name", "")
        return role == "hyper" or (role == "opt_state" and name.endswith(".step"))
    if node.op == "get_attr":
        return True  # a constant (a fresh optimizer's step counters)
    if node.op != "call_function" or written_by_user(node):
        return False
    inputs = node.all_input_nodes
    return all(n in scalar_side for n in inputs)


def _is_scalar(val: object) -> bool:
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _is_cpu_float64_scalar(val: object) -> bool:
    return _is_scalar(val) and val.dtype == torch.float64 and val.device.type == "cpu"  # type: ignore[union-attr]
