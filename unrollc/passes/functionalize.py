"""functionalize: every in-place update becomes a functional one.

Invariant established: no node calls an operator whose schema writes to an argument
(``alias_info.is_write``), and no input is mutated; outputs carry the updated values.

1. Re-trace the graph through ``torch.func.functionalize(remove="mutations")`` on fake tensors,
   keeping each node's metadata (stack trace, module stack) on the nodes it turns into::

       add_ = aten.add_.Tensor(p_fc_weight, mul)       # optimizer: param.add_(...)
       return [p_fc_weight, ...]

   becomes::

       add = aten.add.Tensor(p_fc_weight, mul)
       copy_ = aten.copy_.default(p_fc_weight, add)    # epilogue: write the result back into the input
       return [add, ...]

   Views stay views (``remove="mutations"``, not ``"mutations_and_views"``, which would turn every
   view into a copy and make the graph slower than eager code).
2. Drop the epilogue ``copy_`` into inputs: the step graph returns new values and never writes to its
   inputs (which may be leaf tensors that require grad).
3. A random draw into a fresh non-contiguous CPU tensor (``empty_like(x).bernoulli_(p)``, CPU dropout of a
   transposed activation) became ``aten.bernoulli.p``, which fills a contiguous tensor; it becomes
   ``unrollc.bernoulli_like``, which draws in the tensor's own memory order, as the eager in-place draw does.
"""

from __future__ import annotations

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from .. import ops  # noqa: F401 - registers torch.ops.unrollc.bernoulli_like
from ..errors import CaptureError, InternalError
from .schema import mutated_args

__all__ = ["functionalize"]


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite in-place ops into functional ones (see module docstring)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = [n.meta.get("val") for n in placeholders]
    if any(not isinstance(e, torch.Tensor) for e in examples):
        raise InternalError("functionalize: every placeholder needs a tensor example in meta['val']")

    def run(*args: torch.Tensor) -> object:
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(gm).run(*args)

    # Tensors the user's code closes over (a loss's class weights, a plain tensor attribute of the model) stay
    # constants of the graph: real tensors, which the fake-mode re-trace must accept.
    new = make_fx(
        torch.func.functionalize(run, remove="mutations"), tracing_mode="fake", record_stack_traces=True,
        _allow_non_fake_inputs=True,
    )(*examples)
    # Step 2: drop the copy-back epilogue into inputs.
    for node in list(new.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder":
            if node.users:
                raise InternalError("functionalize: an input copy-back has users")
            new.graph.erase_node(node)
    # Step 3: random draws keep eager's order.
    for node in new.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.bernoulli.p and not node.kwargs:
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if isinstance(val, torch.Tensor) and val.device.type == "cpu" and not val.is_contiguous():
                node.target = torch.ops.unrollc.bernoulli_like.default
                node.args = (node.args[0], node.args[1] if len(node.args) > 1 else 0.5)
    for old, node in zip(placeholders, (n for n in new.graph.nodes if n.op == "placeholder"), strict=True):
        node.name = old.name
        node.target = old.target
        node.meta.update({k: v for k, v in old.meta.items() if k in ("unrollc", "val")})
    for node in new.graph.nodes:
        if node.op == "call_function" and mutated_args(node.target):
            names = [a.name for a in node.target._schema.arguments]
            bound = {**dict(zip(names, node.args)), **node.kwargs}
            written = [bound.get(name) for name in mutated_args(node.target)]
            if any(isinstance(a, fx.Node) and a.op == "get_attr" for a in written):
                raise _constant_mutated(node)
            raise InternalError(f"functionalize: {node.format_node()} still mutates an argument")
    new.meta.update(gm.meta)
    new.graph.lint()
    new.recompile()
    return new


def _constant_mutated(node: fx.Node) -> CaptureError:
    """The step writes in place into a tensor it closes over (not a parameter, buffer or optimizer state):
    the step graph cannot carry that write from one step to the next."""
    from ..inspect.source import source_of

    where = source_of(node)
    at = f" at {where.short()}" if where is not None and where.kind != "autograd" else ""
    return CaptureError(
        f"unrollc.compile: the step writes in place ({node.target}) into a tensor it closes over{at}: a tensor "
        "that is not a parameter, a buffer or optimizer state (a class attribute of the optimizer, a global, a "
        "plain tensor attribute of the model). A step graph carries only those three from one step to the next, "
        "so the write would be lost. Keep such a tensor in the optimizer's per-parameter state "
        "(self.state[p][...]) or register it as a buffer of the model (module.register_buffer), or compute it "
        "out of place."
    )
