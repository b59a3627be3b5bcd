"""unrollc's own operators (``torch.ops.unrollc.*``), registered with ``torch.library``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["safe_sqrt"]


@torch.library.custom_op("unrollc::safe_sqrt", mutates_args=())
def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``torch.sqrt(x)`` — the same values — whose derivative is 0 where the result is 0 (not inf).

    Used by the ``safe_sqrt`` pass for the optimizer's square roots: ``d sqrt(v)/dv`` at ``v = 0`` is inf,
    and inf times the zero gradient that flows back there is NaN (Adam's ``exp_avg_sq`` of an
    always-zero gradient entry). The backward is written in differentiable ATen ops; where no result is 0 it is
    exactly ATen's ``grad / (2 * result)``.
    """
    return torch.sqrt(x)


@safe_sqrt.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(output)


def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (out,) = ctx.saved_tensors
    if out.numel() and bool(out.amin() > 0):
        # No zero (nor NaN) anywhere: ATen's own sqrt backward, grad / (2 * result), bit for bit. The masked
        # form below costs ~8x more on large tensors (bool masks, two wheres) and is rarely needed.
        return grad / (out + out)
    positive = out > 0
    # The inner where keeps the division finite where it is masked: the backward itself stays differentiable.
    return torch.where(positive, grad / torch.where(positive, out + out, 1.0), 0.0)


safe_sqrt.register_autograd(_backward, setup_context=_setup_context)
