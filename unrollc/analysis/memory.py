"""Bytes saved for backward by one step, measured with ``saved_tensors_hooks``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..runtime.state import UnrollState
    from ..runtime.stepper import Stepper

__all__ = ["saved_bytes_per_step"]


def saved_bytes_per_step(stepper: "Stepper", state: "UnrollState", batch: Any, *meta: Any) -> int:
    """Bytes autograd saves for the backward pass of one step from ``state`` (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    leaves = {n: p.detach().requires_grad_(p.is_floating_point()) for n, p in state.params.items()}
    probe = state.replace(params=leaves)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stepper.step(probe, batch, *meta)
    return sum(seen.values())
