"""Operator properties read from schemas, never from names."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["mutated_args", "is_mutating"]


def mutated_args(target: Any) -> list[str]:
    """Names of the arguments an ATen operator writes to (empty for functional ops and non-ops)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return []
    return [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def is_mutating(target: Any) -> bool:
    """True when the operator's schema marks an argument as written (``Tensor(a!)``)."""
    return bool(mutated_args(target))


def namespace(target: Any) -> str:
    """The operator namespace (``aten``, ``profiler``, ...) or ``""`` for plain Python callables."""
    return getattr(target, "namespace", "") if isinstance(target, torch._ops.OpOverload) else ""
