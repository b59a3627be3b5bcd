"""cse: identical pure computations -> one node (common-subexpression elimination).

Invariant established: no two nodes call the same deterministic, non-mutating operator on the same
arguments (step outputs excepted, below). Tracing ``torch.optim``'s per-parameter loop repeats every computation on the
hyperparameters once per parameter; after this pass it runs once per step::

    _to_copy_5 = aten._to_copy(h_betas_1, dtype=float32)      # parameter 0
    mul = aten.mul.Tensor(s_0_weight_exp_avg_sq, _to_copy_5)
    _to_copy_12 = aten._to_copy(h_betas_1, dtype=float32)     # parameter 1   ->  removed
    mul_3 = aten.mul.Tensor(s_0_bias_exp_avg_sq, _to_copy_12)  ->  mul_3 = aten.mul.Tensor(..., _to_copy_5)

(Adam on a 3-layer MLP, 6 parameters: 190 ops -> 149.) A merged node computes the same value with the
same derivative: parameters and optimizer state are bit-identical; a meta-gradient w.r.t. a hyperparameter
sums its per-parameter contributions in another order (equal up to rounding). What changes is the number
of ops each step runs and records for the backward, which is what a launch-bound GPU or a small model pays
for.

Never merged: random ops (schema tag ``nondeterministic_seeded``: two dropouts draw two masks); ops whose
schema writes to an argument, and values passed to one (none remain after ``functionalize``); impure
nodes; calls of Python functions other than ``getitem``; a node from the user's code with one from the
optimizer's (the ``safe_sqrt`` pass tells them apart); a step output (two state entries stay two tensors:
``write_back`` may hand them to ``torch.optim``, which updates them in place); nodes whose unrollc marks
differ (a detach that ends a ``torch.no_grad()`` block). Scalars are compared with their type (``1``,
``1.0`` and ``True`` promote differently) and floats bit for bit (``0.0`` is not ``-0.0``).
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from typing import Any

import torch
from torch import fx

from .schema import mutated_args
from .strip_detach import written_by_user

__all__ = ["cse", "cse_key", "is_step_output"]


class _Unhashable(Exception):
    """An argument the pass cannot compare by value: the node is kept as it is."""


def _freeze(value: Any) -> Hashable:
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, (bool, int, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(value).__name__, value)
    raise _Unhashable(type(value).__name__)


def _mergeable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    if any(mutated_args(user.target) for user in node.users):
        return False  # a value written in place (possible only before functionalize) is no longer a value
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    return torch.Tag.nondeterministic_seeded not in node.target.tags and not mutated_args(node.target)


def cse_key(node: fx.Node) -> Hashable | None:
    """What makes ``node`` identical to another node of its graph (None: never merged with any)."""
    if not _mergeable(node):
        return None
    try:
        custom = _freeze(node.meta.get("custom") or {})
        return (node.target, _freeze(node.args), _freeze(node.kwargs), written_by_user(node), custom)
    except _Unhashable:
        return None


def is_step_output(node: fx.Node) -> bool:
    """Whether the step returns ``node`` itself: such a node is kept even when an identical one exists (two
    state entries stay two tensors), while later duplicates may still read it."""
    return any(user.op == "output" for user in node.users)


def cse(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each node by the first identical one before it (see module docstring)."""
    seen: dict[Hashable, fx.Node] = {}
    for node in list(gm.graph.nodes):  # in order: a merged node's users are rewritten before their turn
        key = cse_key(node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node and not is_step_output(node):
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
