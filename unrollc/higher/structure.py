"""The functional module's structural copy of the user's module (:mod:`unrollc.higher.patch`): new module
objects that share, rather than copy, every tensor and every module the user's module uses without owning it,
and what the copy must know about the original (tied names, ``weight_norm``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["module_tree_copy", "shared_objects", "tied_names", "uses_weight_norm"]


def uses_weight_norm(module: nn.Module) -> bool:
    """Whether ``module`` has a ``weight_norm`` (hook or parametrization), whose fused kernel the forward must
    not use under a meta-gradient (:class:`unrollc.traced_functions.CompositeWeightNorm`)."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for m in module.modules():
        if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            return True
        if isinstance(m, _WeightNorm):  # a parametrization is a module in the tree
            return True
    return False


def tied_names(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(name, alias)`` for every further name of a parameter or buffer the module holds under several names
    (tied weights): read once from the user's module, as the fast weights of the names may later be anything."""
    first: dict[int, str] = {}
    pairs = []
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if first.setdefault(id(t), name) != name:
            pairs.append((first[id(t)], name))
    return tuple(pairs)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, the hook dicts, training


def shared_objects(module: nn.Module) -> dict[int, Any]:
    """What the structural copy shares with ``module`` instead of copying (a ``deepcopy`` memo): parameters and
    buffers; every tensor the modules keep in other attributes, public or private, also inside lists, tuples and
    dicts (a meta-learned temperature, a pruning mask: gradients reach them and later in-place changes are seen,
    as in higher); modules kept in attributes without being registered (a teacher network); and the values of
    public attributes (a config dict). Containers in private attributes are copied (an RNN's ``_flat_weights``
    list must follow the copy's weights)."""
    tree = {id(m) for m in module.modules()}
    shared: dict[int, Any] = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    for sub in module.modules():
        for attr, value in vars(sub).items():
            if attr not in _MODULE_INTERNALS:
                _share(value, not attr.startswith("_"), tree, shared)
    return shared


def _share(value: Any, public: bool, tree: set[int], shared: dict[int, Any]) -> None:
    """Add to ``shared`` what :func:`shared_objects` shares of one attribute value (not a closure: a recursive
    one is a reference cycle, which would keep the memo, and the copy in it, alive until a garbage collection)."""
    if isinstance(value, torch.Tensor) or (isinstance(value, nn.Module) and id(value) not in tree):
        shared[id(value)] = value
    elif isinstance(value, nn.Module):
        return  # a module of the tree, reached another way (``self._head = self.layers[-1]``): copied with it
    elif public:
        shared[id(value)] = value
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _share(v, False, tree, shared)
    elif isinstance(value, dict):
        for v in value.values():
            _share(v, False, tree, shared)


def module_tree_copy(module: nn.Module) -> nn.Module:
    """New module objects with the structure of ``module``, sharing every attribute value (parameters, buffers,
    private attributes that :func:`copy.deepcopy` refuses): ``train()``/``eval()``, attribute assignment and
    reparametrization on the copy leave the user's module as it is, as a deep copy would."""
    copies: dict[int, nn.Module] = {}

    def tree(m: nn.Module) -> nn.Module:
        if id(m) not in copies:  # a submodule registered twice stays one module
            # not copy.copy: parametrized modules (and others) refuse to be pickled, which copy.copy relies on
            new = copies[id(m)] = object.__new__(type(m))
            new.__dict__.update(m.__dict__)
            new._parameters = dict(m._parameters)
            new._buffers = dict(m._buffers)
            new._modules = {k: None if c is None else tree(c) for k, c in m._modules.items()}
        return copies[id(m)]

    return tree(module)
