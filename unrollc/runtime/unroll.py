"""Running n steps: a plain autograd loop, or a checkpointed one (see schedules.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .state import UnrollState

if TYPE_CHECKING:
    from .stepper import Stepper

__all__ = ["run_unroll"]


def run_unroll(stepper: "Stepper", state: UnrollState, batches: list[Any], meta: tuple, checkpoint: Any) -> UnrollState:
    """Apply ``stepper.step`` once per batch; with a checkpoint policy, keep only some states."""
    losses: list[torch.Tensor] = []
    if checkpoint is None:
        for batch in batches:
            state = stepper.step(state, batch, *meta)
            losses.append(state.loss)
        return state.replace(losses=losses)
    raise NotImplementedError("checkpointing arrives with the schedules module")
