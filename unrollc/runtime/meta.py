"""``nn.Module`` s passed as meta arguments (a learned loss network): their parameters become meta tensors.

``stepper.unroll(state, batches, loss_net)`` with ``loss_fn(model, batch, loss_net)`` should give
``loss_net``'s parameters their meta-gradient under every checkpoint schedule. A module is not a tensor, so
left as it is its parameters would be constants of the step graph, which only a plain unroll differentiates.
:func:`bind_modules` replaces every module in ``meta`` by a :class:`ModuleArg`, a pytree node whose children
are the module's parameters: they are flattened, lifted and differentiated like any meta tensor, and calling
the ``ModuleArg`` runs the module with them (``torch.func.functional_call``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import register_pytree_node, tree_flatten, tree_map

__all__ = ["ModuleArg", "bind_modules", "meta_modules"]


class ModuleArg:
    """A module passed as meta, with its parameters as explicit tensors; call it like the module."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.module = module
        self.params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ..reparam import reparametrized  # functional_call would leave an aliased submodule's tensors swapped

        with reparametrized(self.module, self.params):
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        params = self.__dict__.get("params", {})
        return params[name] if name in params else getattr(self.__dict__["module"], name)

    def __repr__(self) -> str:
        return f"ModuleArg({type(self.module).__name__}, {len(self.params)} parameters)"


def _flatten(arg: ModuleArg) -> tuple[list[torch.Tensor], tuple[nn.Module, tuple[str, ...]]]:
    return list(arg.params.values()), (arg.module, tuple(arg.params))


def _unflatten(values: Any, context: tuple[nn.Module, tuple[str, ...]]) -> ModuleArg:
    module, names = context
    return ModuleArg(module, dict(zip(names, values, strict=True)))


register_pytree_node(ModuleArg, _flatten, _unflatten, serialized_type_name="unrollc.runtime.meta.ModuleArg")


def meta_modules(meta: tuple[Any, ...]) -> list[nn.Module]:
    """The modules bound in ``meta`` (by :func:`bind_modules`), in order."""
    leaves = tree_flatten(tuple(meta), is_leaf=lambda x: isinstance(x, ModuleArg))[0]
    return [x.module for x in leaves if isinstance(x, ModuleArg)]


def bind_modules(meta: tuple[Any, ...]) -> tuple[Any, ...]:
    """``meta`` with every ``nn.Module`` (at any depth) replaced by a :class:`ModuleArg` over its parameters."""
    bind = lambda x: ModuleArg(x, dict(x.named_parameters())) if isinstance(x, nn.Module) else x  # noqa: E731
    return tuple(tree_map(bind, tuple(meta), is_leaf=lambda x: isinstance(x, nn.Module)))
