"""unrollc: differentiate through whole training loops, with any nn.Module and any torch.optim optimizer.

The public API::

    stepper = unrollc.compile(model, opt, loss_fn)     # loss_fn(model, batch, *meta) -> scalar
    state = stepper.init()                             # time 0: the model's own parameters
    state = stepper.unroll(state, batches, checkpoint="sqrt")
    meta_loss = loss_on(stepper.forward(state, x_val))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .analysis import CostModel
from .clip import clip_grad_norm, clip_grad_value
from .errors import BatchModifiedError, CaptureError, ModelChangedError
from .optimizer_spec import UnsupportedOptimizerError
from .higher import get_diff_optim, innerloop_ctx, monkeypatch
from .inspect import Report, explain
from .runtime.schedules import Binomial, Budget, EveryK, NoCheckpoint, Sqrt
from .runtime.state import UnrollState
from .runtime.stepper import Stepper

__all__ = [
    "compile",
    "Stepper",
    "UnrollState",
    "NoCheckpoint",
    "EveryK",
    "Sqrt",
    "Binomial",
    "Budget",
    "CostModel",
    "clip_grad_norm",
    "clip_grad_value",
    "explain",
    "Report",
    "innerloop_ctx",
    "monkeypatch",
    "get_diff_optim",
    "BatchModifiedError",
    "ModelChangedError",
    "CaptureError",
    "UnsupportedOptimizerError",
]

__version__ = "0.1.0"


def compile(  # noqa: A001 - the library's verb
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    grad_callback: Callable[..., Mapping[str, torch.Tensor]] | None = None,
    check: bool = False,
) -> Stepper:
    """Compile one training step of ``model`` with ``opt`` on ``loss_fn`` into a differentiable stepper.

    Args:
        model: any ``nn.Module``; never modified (its parameters are the time-0 weights of ``init()``).
        opt: any ``torch.optim`` optimizer over (some of) the model's parameters, possibly already
            stepped (its state is the starting state); never modified. LBFGS (closure) and SparseAdam
            (sparse gradients) are refused.
        loss_fn: ``loss_fn(model, batch, *meta) -> scalar tensor``; it calls the model as usual.
        grad_callback: ``grad_callback(grads, *meta) -> grads``, applied to the gradients (a dict by parameter
            name, of the parameters the optimizer updates) between the loss's backward and ``opt.step()``, where
            eager training clips them: :func:`unrollc.clip_grad_norm` and :func:`unrollc.clip_grad_value` are
            ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``. It is traced into the step graph and
            differentiated like the rest of the step (a ``torch.no_grad()`` block in it is a constant; the weights
            it reads through the model are the step's, ones it holds itself are time-0 constants); the Python values
            it closes over are part of the graph's key, as ``loss_fn``'s are, and its side effects happen while the
            step is traced.
        check: verify each pass's guarantees after it runs (debugging; slower to trace).

    Returns:
        A :class:`Stepper` with ``init``, ``step``, ``unroll``, ``forward`` and ``graph``.
    """
    if not isinstance(check, bool):
        raise TypeError(f"unrollc.compile: expected `check` as True or False, got {check!r}.")
    return Stepper(model, opt, loss_fn, check=check, grad_callback=grad_callback)
