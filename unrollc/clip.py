"""Gradient clipping inside the step: ``unrollc.compile(model, opt, loss_fn, grad_callback=unrollc.clip_grad_norm(1.0))``.

Eager training clips between ``loss.backward()`` and ``opt.step()``::

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

:func:`clip_grad_norm` and :func:`clip_grad_value` are those two torch functions as ``grad_callback`` s: they
compute the same values with the same ops (so trajectories equal eager ones bit for bit), on the dict of
gradients the step graph holds, out of place and with grad enabled, so that the unroll's meta-gradient includes
the clipping (torch's versions run under ``torch.no_grad()`` on ``p.grad`` in place, which a step graph
cannot carry).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ArgumentError

__all__ = ["ClipGradNorm", "ClipGradValue", "clip_grad_norm", "clip_grad_value"]

# torch's norm without its no_grad wrapper: the same grouping by device and dtype and the same kernels
# (_foreach_norm where torch uses it), so the total norm is eager's to the bit, and differentiable.
_total_norm = inspect.unwrap(torch.nn.utils.get_total_norm)


def _positive(api: str, name: str, value: Any) -> float:
    """``value`` as a float if it is a number > 0, else an error naming the API (``ArgumentError``: a TypeError
    for a wrong type, a ValueError for a wrong value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ArgumentError(f"{api}: expected `{name}` as a positive number, got {value!r}.")
    return float(value)


class ClipGradNorm:
    """``grad_callback`` that scales the gradients as ``torch.nn.utils.clip_grad_norm_(params, max_norm,
    norm_type)`` does: by ``min(max_norm / (total_norm + 1e-6), 1)``, the total norm taken over every gradient
    the optimizer gets. Build it with :func:`clip_grad_norm`; its public attributes are part of the step graph's
    key (``clip.max_norm = 0.5`` traces a new graph)."""

    def __init__(self, max_norm: float, norm_type: float = 2.0, foreach: bool | None = None) -> None:
        self.max_norm = _positive("unrollc.clip_grad_norm", "max_norm", max_norm)
        self.norm_type = _positive("unrollc.clip_grad_norm", "norm_type", norm_type)
        self.foreach = foreach

    def __call__(self, grads: Mapping[str, torch.Tensor], *meta: Any) -> dict[str, torch.Tensor]:
        """The clipped gradients (``meta`` is ignored: the callback is called as ``grad_callback(grads, *meta)``)."""
        if not grads:
            return dict(grads)
        total = _total_norm(list(grads.values()), self.norm_type, False, self.foreach)
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        return {n: g * coef.to(g.device) for n, g in grads.items()}

    def __repr__(self) -> str:
        return f"clip_grad_norm(max_norm={self.max_norm}, norm_type={self.norm_type})"


class ClipGradValue:
    """``grad_callback`` that clamps every gradient entry to ``[-clip_value, clip_value]``, as
    ``torch.nn.utils.clip_grad_value_(params, clip_value)`` does. Build it with :func:`clip_grad_value`."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = _positive("unrollc.clip_grad_value", "clip_value", clip_value)  # a negative one sets every entry to it

    def __call__(self, grads: Mapping[str, torch.Tensor], *meta: Any) -> dict[str, torch.Tensor]:
        """The clamped gradients (``meta`` is ignored)."""
        return {n: g.clamp(min=-self.clip_value, max=self.clip_value) for n, g in grads.items()}

    def __repr__(self) -> str:
        return f"clip_grad_value(clip_value={self.clip_value})"


def clip_grad_norm(max_norm: float, norm_type: float = 2.0, foreach: bool | None = None) -> ClipGradNorm:
    """A ``grad_callback`` for :func:`unrollc.compile` equal to ``torch.nn.utils.clip_grad_norm_(params, max_norm,
    norm_type, foreach=foreach)`` called between the backward and ``opt.step()``.

    Args:
        max_norm: the largest total norm the gradients keep.
        norm_type: the p of the p-norm (``float("inf")`` for the max norm).
        foreach: as in torch: None uses the foreach kernels where torch does.

    Returns:
        The callback; ``unrollc.compile(model, opt, loss_fn, grad_callback=unrollc.clip_grad_norm(1.0))``.
    """
    return ClipGradNorm(max_norm, norm_type, foreach)


def clip_grad_value(clip_value: float) -> ClipGradValue:
    """A ``grad_callback`` for :func:`unrollc.compile` equal to ``torch.nn.utils.clip_grad_value_(params,
    clip_value)`` called between the backward and ``opt.step()``.

    Args:
        clip_value: every gradient entry is clamped to ``[-clip_value, clip_value]``; a positive number (torch
            accepts a negative one and sets every entry to it).

    Returns:
        The callback; ``unrollc.compile(model, opt, loss_fn, grad_callback=unrollc.clip_grad_value(0.1))``.
    """
    return ClipGradValue(clip_value)
