"""``higher.utils``: the helpers ``higher`` 0.2.1 exposes, with the same names and behaviour."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["flatten", "get_func_params"]


def _copy_tensor(t: torch.Tensor, safe_copy: bool, device: torch.device | None = None) -> torch.Tensor:
    """A detached copy (``safe_copy``) or alias of ``t`` that requires grad iff ``t`` does."""
    copy = t.clone().detach() if safe_copy else t.detach()
    copy = copy.requires_grad_(t.requires_grad)
    return copy if device is None else copy.to(device)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """``map_fn`` applied to the leaves of nested lists, tuples, dicts and sets (types kept)."""
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(x, map_fn) for x in target)
    if isinstance(target, dict):
        return type(target)({k: _recursive_map(v, map_fn) for k, v in target.items()})
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | None) -> Any:
    return _recursive_map(target, lambda x: _copy_tensor(x, True, device) if torch.is_tensor(x) else x)


def _is_container(target: Any) -> bool:
    return isinstance(target, (list, tuple, dict, set))


def _find_param_in_list(param: torch.Tensor, seq: Iterable[torch.Tensor]) -> int | None:
    """The index of ``param`` (by identity) in ``seq``, or None."""
    for i, p in enumerate(seq):
        if p is param:
            return i
    return None


def _get_param_mapping(module: torch.nn.Module, seen: list[torch.Tensor], mapping: list[int]) -> list[int]:
    """higher's helper: for every parameter slot of ``module`` (depth first, shared ones repeated), its index in
    the list of distinct parameters ``seen`` (both lists are filled in place and ``mapping`` is returned)."""
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(param)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def flatten(x: Any) -> list[Any]:
    r"""Returns a flattened list of objects from a nested structure."""
    out: list[Any] = []
    if isinstance(x, dict):
        for y in x.values():
            out.extend(flatten(y))
    elif isinstance(x, (list, set, tuple)):
        for y in x:
            out.extend(flatten(y))
    else:
        out.append(x)
    return out


def get_func_params(module: torch.nn.Module, device: torch.device | None = None, safe_copy: bool = True) -> list[torch.Tensor]:
    r"""Returns a detached copy of module parameters which requires gradient."""
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
