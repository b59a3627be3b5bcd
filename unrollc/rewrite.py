"""Rewriting an optimizer's Python branches on data into tensor maths (a fallback of capture).

Some ``torch.optim`` code reads tensors back into Python and branches on them, e.g. Adafactor::

    alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t

A value computed from the parameters cannot be part of one step graph as a Python float. When tracing
an optimizer's step fails on such a read, unrollc re-executes the source of the optimizer's module with
two rewrites and traces the rewritten class instead:

1. ``x.item()`` -> ``x``: the value stays a tensor (and differentiable); a float32 (or lower-precision) one is
   widened to float64, as ``.item()`` gives a Python float (a double) and the maths that follows it in eager
   code runs in double precision (Adafactor's ``norm / numel ** 0.5`` in float32 left its float32 trajectory
   1.2e-7 from eager's after 150 steps);
2. ``max(a, b, ...)`` / ``min(...)`` -> ``torch.maximum`` / ``torch.minimum`` when an argument is a
   tensor (the builtins otherwise), so the comparison happens in the graph::

       alpha = _unrollc_max(eps2, _unrollc_item(param.norm(2)) / (param.numel() ** 0.5)) * rho_t

The rewritten module is a private copy: ``torch.optim`` itself is never patched.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
from typing import Any

import torch

__all__ = ["rewritten_optimizer_class"]


def _reduce(op: Any, builtin: Any, *args: Any, **kwargs: Any) -> Any:
    values = args[0] if len(args) == 1 and not isinstance(args[0], torch.Tensor) else args
    values = list(values)
    if kwargs or not any(isinstance(v, torch.Tensor) for v in values):
        return builtin(*args, **kwargs)
    out = values[0]
    for v in values[1:]:
        a = out if isinstance(out, torch.Tensor) else None
        b = v if isinstance(v, torch.Tensor) else None
        if a is not None and b is not None:
            out = op(a, b)
        elif a is not None:
            out = a.clamp_min(v) if op is torch.maximum else a.clamp_max(v)
        else:
            assert b is not None
            out = b.clamp_min(out) if op is torch.maximum else b.clamp_max(out)
    return out


def _item(x: Any) -> Any:
    """``x.item()`` kept a tensor: a Python number's precision (float64 for a lower-precision float)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64 and x.device.type != "mps":
        return x.to(torch.float64)  # (MPS has no float64: there the value keeps its dtype, as before)
    return x.item() if not isinstance(x, torch.Tensor) else x


_HELPERS = {
    "_unrollc_item": _item,
    "_unrollc_max": functools.partial(_reduce, torch.maximum, builtins.max),
    "_unrollc_min": functools.partial(_reduce, torch.minimum, builtins.min),
}


class _KeepTensors(ast.NodeTransformer):
    """Steps 1 and 2 of the module docstring."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in ("max", "min"):
            node.func = ast.copy_location(ast.Name(id=f"_unrollc_{node.func.id}", ctx=ast.Load()), node.func)
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "item" and not node.args and not node.keywords:
            return ast.copy_location(ast.Call(ast.Name(id="_unrollc_item", ctx=ast.Load()), [node.func.value], []), node)
        return node


@functools.lru_cache(maxsize=None)
def rewritten_optimizer_class(cls: type) -> type:
    """``cls`` re-created from its module's source with ``.item()`` and ``max``/``min`` rewritten."""
    # torch re-exports optimizers with __module__ = "torch.optim"; the methods know the defining module.
    module = importlib.import_module(cls.__init__.__module__)
    tree = _KeepTensors().visit(ast.parse(inspect.getsource(module)))
    ast.fix_missing_locations(tree)
    namespace: dict[str, Any] = {
        "__name__": module.__name__,
        "__package__": module.__package__,
        "__file__": module.__file__,
        **_HELPERS,
    }
    exec(compile(tree, module.__file__ or module.__name__, "exec"), namespace)  # noqa: S102
    return namespace[cls.__name__]
