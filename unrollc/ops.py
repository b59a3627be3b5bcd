"""unrollc's own operators (``torch.ops.unrollc.*``), registered with ``torch.library``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["bernoulli_like", "copy_into", "safe_sqrt", "safe_sqrt_masked"]


@torch.library.custom_op("unrollc::safe_sqrt", mutates_args=())
def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``torch.sqrt(x)`` — the same values — whose derivative is 0 where the result is 0 (not inf).

    Used by the ``safe_sqrt`` pass for the optimizer's square roots on large CPU tensors: ``d sqrt(v)/dv`` at
    ``v = 0`` is inf, and inf times the zero gradient that flows back there is NaN (Adam's ``exp_avg_sq`` of an
    always-zero gradient entry). The forward is one ``sqrt`` kernel; the backward, written in differentiable
    ATen ops, checks for zeros and where there are none is exactly ATen's ``grad / (2 * result)``. That check
    reads a value (free on a CPU, a synchronisation on a GPU), and the Python autograd costs ~90 us per call,
    so small tensors and GPU tensors use :func:`safe_sqrt_masked` instead.
    """
    return torch.sqrt(x)


@safe_sqrt.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(output)


def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (out,) = ctx.saved_tensors
    if out.numel() and (out.device.type == "meta" or bool(out.amin() > 0)):
        # No zero (nor NaN) anywhere: ATen's own sqrt backward, grad / (2 * result), bit for bit. The masked
        # form below costs ~8x more on large tensors (bool masks, two wheres) and is rarely needed.
        return grad / (out + out)
    positive = out > 0
    # The inner where keeps the division finite where it is masked: the backward itself stays differentiable.
    return torch.where(positive, grad / torch.where(positive, out + out, 1.0), 0.0)


safe_sqrt.register_autograd(_backward, setup_context=_setup_context)


# ``safe_sqrt_masked``: the same function as a composite of ATen ops, whose autograd (first and second order)
# is ATen's own: no Python in the backward and nothing read back from the device, at three more elementwise
# kernels than sqrt. Registered as CompositeImplicitAutograd, so graphs show one named op while tracing
# (fake tensors, make_fx) sees its ATen ops.
_lib = torch.library.Library("unrollc", "FRAGMENT")  # kept alive: the registration lives as long as it
_lib.define("safe_sqrt_masked(Tensor x) -> Tensor")


def _safe_sqrt_masked(x: torch.Tensor) -> torch.Tensor:
    zero = x == 0
    # The inner where keeps sqrt (and its backward, grad / (2 * result)) away from 0; the outer one puts the
    # 0 back. Where x != 0 the result is sqrt(x) and its gradient ATen's, bit for bit; at 0 both derivatives
    # are 0 (NaN and negative inputs give sqrt's NaN, as torch.sqrt does).
    return torch.where(zero, 0.0, torch.where(zero, 1.0, x).sqrt())


_lib.impl("safe_sqrt_masked", _safe_sqrt_masked, "CompositeImplicitAutograd")
safe_sqrt_masked = torch.ops.unrollc.safe_sqrt_masked.default
safe_sqrt_masked.__doc__ = """``torch.sqrt(x)`` with derivative 0 where ``x == 0``, as a composite of ATen ops (see :func:`safe_sqrt`)."""

# unrollc's CompositeImplicitAutograd ops and their Python kernels: what the dispatcher runs for any tensor
# (autograd sees the kernel's ATen ops either way), so the runtime may call the kernel without the dispatcher's
# round trip into Python (unrollc/runtime/execute.py).

# ``copy_into``: what a functionalized ``dst.copy_(src)`` computes (``aten.copy(dst, src)``: src converted to dst's
# dtype, broadcast to its shape, in its layout), with a derivative: ATen has none for the functional ``copy``
# (found in review: a float32 optimizer buffer copied from a float64 gradient, ``torch.empty(n, 4).copy_(h[0])``),
# while eager's in-place ``copy_`` sends the gradient to ``src`` (summed over broadcast dims, in src's dtype).
_lib.define("copy_into(Tensor dst, Tensor src) -> Tensor")


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(dst.shape, dst.stride(), dtype=dst.dtype, device=dst.device).copy_(src)


_lib.impl("copy_into", _copy_into, "CompositeImplicitAutograd")
copy_into = torch.ops.unrollc.copy_into.default
copy_into.__doc__ = """``aten.copy(dst, src)`` with eager ``copy_``'s derivative (to ``src``; none to ``dst``)."""

COMPOSITE_KERNELS: dict[torch._ops.OpOverload, Any] = {safe_sqrt_masked: _safe_sqrt_masked, copy_into: _copy_into}


@torch.library.custom_op("unrollc::bernoulli_like", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def bernoulli_like(x: torch.Tensor, p: float) -> torch.Tensor:
    """``torch.empty_like(x).bernoulli_(p)``: 0/1 draws laid out like ``x`` and drawn in the order eager code draws
    them in place into such a tensor (CPU dropout: ``empty_like(input).bernoulli_(1 - p)``). ``aten.bernoulli.p``,
    which ``functionalize`` makes of that in-place draw, fills a contiguous tensor instead: for a non-contiguous
    ``x`` (a transposed activation) its mask differs from eager's under the same seed. Not differentiable (the
    draws do not depend on ``x``'s values), and never merged with another draw (``nondeterministic_seeded``)."""
    return torch.empty_like(x).bernoulli_(p)


@bernoulli_like.register_fake
def _(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x)
