"""cse: identical pure computations -> one node (common-subexpression elimination).

Invariant established: no two nodes call the same deterministic, non-mutating operator on the same
arguments, and inputs the step receives as one tensor are read through one placeholder. Tracing
``torch.optim``'s per-parameter loop repeats every computation on the hyperparameters once per parameter;
after this pass it runs once per step::

    _to_copy_5 = aten._to_copy(h_betas_1, dtype=float32)      # parameter 0
    mul = aten.mul.Tensor(s_0_weight_exp_avg_sq, _to_copy_5)
    _to_copy_12 = aten._to_copy(h_betas_1, dtype=float32)     # parameter 1   ->  removed
    mul_3 = aten.mul.Tensor(s_0_bias_exp_avg_sq, _to_copy_12)  ->  mul_3 = aten.mul.Tensor(..., _to_copy_5)

(Adam on a 3-layer MLP, 6 parameters: 190 ops -> 149.) A merged node computes the same value with the
same derivative: parameters and optimizer state are bit-identical; meta-gradients are equal up to float
rounding (the backward sums a shared node's contributions in another order). What changes is the number
of ops each step runs and records for the backward, which is what a launch-bound GPU or a small model pays
for.

Never merged: random ops (schema tag ``nondeterministic_seeded``: two dropouts draw two masks); ops whose
schema writes to an argument, and values passed to one (none remain after ``functionalize``); impure
nodes; calls of Python functions other than ``getitem``; a node from the user's code with one from the
optimizer's (the ``safe_sqrt`` pass tells them apart); nodes whose unrollc marks differ (a detach that
ends a ``torch.no_grad()`` block). Scalars are compared with their type (``1``, ``1.0`` and ``True``
promote differently) and floats bit for bit (``0.0`` is not ``-0.0``).

Shared step counters. Each parameter has its own ``step`` tensor, so the bias corrections of Adam and its
relatives (``1 - beta1 ** step``, ...) are per-parameter maths that nothing above can merge. But the
counters are always equal: ``Stepper.init`` hands out one tensor for the equal counters, the graph cache
keys on which optimizer-state inputs are the same tensor (``gm.meta["unrollc"]["aliased_inputs"]``:
``{"0.bias.step": "0.weight.step", ...}``), and this pass reads them all through the first placeholder::

    add = aten.add.Tensor(s_0_weight_step, 1)             add = aten.add.Tensor(s_0_weight_step, 1)
    add_2 = aten.add.Tensor(s_0_bias_step, 1)      ->     # merged: one counter, one bias correction

The merged counter is returned once for every parameter, so the next step receives one tensor again. Small
constant tensors with equal values (the counters a fresh optimizer starts from) are merged the same way. A
checkpointed unroll's taped re-runs keep the shared counter one leaf and credit its gradient to one
position (``runtime/checkpointed.py``), so they run this graph too.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from typing import Any

import torch
from torch import fx

from .schema import mutated_args
from .strip_detach import written_by_user

__all__ = ["cse", "cse_key"]


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


def _merge_aliased_inputs(gm: fx.GraphModule) -> None:
    aliases: dict[str, str] = gm.meta.get("unrollc", {}).get("aliased_inputs", {})
    if not aliases:
        return
    by_name = {info.name: node for node in gm.graph.find_nodes(op="placeholder")
               if (info := node.meta.get("unrollc")) is not None and getattr(info, "role", None) == "opt_state"}
    for name, first in aliases.items():
        if name in by_name and first in by_name:
            by_name[name].replace_all_uses_with(by_name[first])


def _constant_key(gm: fx.GraphModule, node: fx.Node) -> Hashable | None:
    """A ``get_attr`` of a 0-dim constant tensor: keyed by its value (equal constants are one node)."""
    value = getattr(gm, str(node.target), None)
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.requires_grad or value.device.type == "meta":
        return None
    return ("constant", value.dtype, value.device, _freeze(value.item()))


def cse(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each node by the first identical one before it (see module docstring)."""
    _merge_aliased_inputs(gm)
    seen: dict[Hashable, fx.Node] = {}
    for node in list(gm.graph.nodes):  # in order: a merged node's users are rewritten before their turn
        key = cse_key(node) if node.op != "get_attr" else _constant_key(gm, node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
