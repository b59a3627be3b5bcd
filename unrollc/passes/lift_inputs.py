"""lift_inputs: parameters, buffers, optimizer state and hyperparameters become graph inputs.

Invariant established: no ``get_attr`` node refers to a tensor the user owns; the placeholders are, in
order, ``params, buffers, opt_state, hyper, batch, meta`` (see :class:`unrollc.capture.Signature`), each
with a :class:`unrollc.capture.NodeInfo` under ``node.meta["unrollc"]``.

1. For every ``get_attr`` node whose tensor is one of the closed-over copies made by capture, find its
   input position (``gm.meta["unrollc"]["constants"]``)::

       _tensor_constant0 = self._tensor_constant0        # the copy of fc.weight
       t = aten.t(_tensor_constant0)

2. create one placeholder per position (all ``get_attr`` nodes of the same tensor share it), named
   after the role and the user's name, and move the traced batch/meta placeholders behind them::

       def forward(self, p_fc_weight, ..., batch_0, batch_1):
           t = aten.t(p_fc_weight)

3. delete the ``get_attr`` nodes and the attributes they read.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from ..errors import InternalError

__all__ = ["lift_inputs"]

_PREFIX = {"param": "p", "buffer": "b", "opt_state": "s", "hyper": "h", "batch": "batch", "meta": "meta", "grad": "g"}


def placeholder_name(role: str, name: str) -> str:
    """A valid Python identifier for an input: ``p_fc_weight``, ``s_fc_weight_exp_avg``, ``h_lr``."""
    return f"{_PREFIX[role]}_{re.sub(r'[^0-9a-zA-Z_]', '_', name).strip('_')}"


def lift_inputs(gm: fx.GraphModule) -> fx.GraphModule:
    """Lift the closed-over tensors of a raw step graph to placeholders (see module docstring)."""
    info = gm.meta["unrollc"]
    signature, constants, examples = info["signature"], info["constants"], info["example_inputs"]
    graph = gm.graph
    old_placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    n_lifted = signature.n_inputs - len(old_placeholders)
    if n_lifted < 0:
        raise InternalError("lift_inputs: the raw graph has more placeholders than the signature")
    infos = signature.input_infos
    first = next(iter(graph.nodes))
    new_inputs = []
    with graph.inserting_before(first):
        for i, node_info in enumerate(infos):
            ph = graph.placeholder(placeholder_name(node_info.role, node_info.name))
            ph.meta["unrollc"] = node_info
            example = examples[i]
            if isinstance(example, torch.Tensor):
                ph.meta["val"] = example
            new_inputs.append(ph)
    for old, new in zip(old_placeholders, new_inputs[n_lifted:], strict=True):
        old.replace_all_uses_with(new)
        graph.erase_node(old)
    lifted_attrs = set()
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target)
        position = constants.get(id(value))
        if position is None:
            continue  # a constant made inside the step (e.g. torch.tensor(1.0)): stays a constant
        node.replace_all_uses_with(new_inputs[position])
        graph.erase_node(node)
        lifted_attrs.add(node.target)
    for attr in lifted_attrs:
        delattr(gm, attr)
    graph.lint()
    gm.recompile()
    return gm
