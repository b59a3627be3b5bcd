"""Errors that point at the user's code instead of torch's internals."""

from __future__ import annotations

import os
import sys
import traceback

import torch

__all__ = ["ArgumentError", "BatchModifiedError", "CaptureError", "InternalError", "LossError", "ModelChangedError", "user_frame", "user_stacklevel"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_UNROLLC_DIR = os.path.dirname(__file__)
# Generated code (fx's "<eval_with_key>", make_fx wrappers compiled from "<string>") is nobody's source.
_IGNORED = (_TORCH_DIR, _UNROLLC_DIR, "<frozen ", "<string>", "<eval_with_key", "contextlib.py", "functools.py")


def user_frame(tb: traceback.StackSummary | list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame that belongs to the user's code (not torch, not unrollc, not the stdlib)."""
    for frame in reversed(list(tb)):
        if not any(part in frame.filename for part in _IGNORED):
            return frame
    return None


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning, raised by this function's caller, at the innermost caller
    outside unrollc (the user's line, however deep inside unrollc the warning is raised)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(_UNROLLC_DIR)
                                        or frame.f_code.co_filename.endswith(("contextlib.py", "functools.py"))):
        frame, level = frame.f_back, level + 1  # unrollc's frames, and the stdlib's around innerloop_ctx
    return level


class CaptureError(RuntimeError):
    """Tracing one step failed; the message names the user's file and line and suggests a fix.

    Attributes:
        location: the frame the message points at (the user's line, else the optimizer's), or None.
        in_optimizer: the failure is a data-dependent read inside ``torch.optim`` code, not the user's,
            which :mod:`unrollc.rewrite` may be able to rewrite.
        trace_failure: the exception tracing raised; the error is raised ``from None`` so that the user
            sees their own line instead of torch's internal traceback.
    """

    location: traceback.FrameSummary | None = None
    in_optimizer: bool = False
    trace_failure: BaseException | None = None  # the tracing exception (its traceback is torch-internal)

    @staticmethod
    def raised_by_user_code(exc: BaseException) -> bool:
        """Whether tracing failed because the user's own code raised (a ``KeyError`` in a custom optimizer's
        ``step``): its innermost frame is the user's and it is none of the failures :meth:`from_trace_failure`
        explains (data-dependent reads, autograd inside the step, writes into closed-over tensors). Such an
        exception is re-raised as it is, type and traceback kept."""
        frames = traceback.extract_tb(exc.__traceback__)
        text = str(exc)
        explained = ("_local_scalar_dense", "data-dependent", "functorch transform", "mutate a captured Tensor")
        return bool(frames) and user_frame(frames) is frames[-1] and not any(e in text for e in explained)

    @classmethod
    def from_trace_failure(cls, exc: BaseException, api: str = "unrollc.compile") -> "CaptureError":
        """Turn a tracing exception into a message about the user's code; ``api`` names the entry point
        that traced (``unrollc.compile``, or the ``unrollc.higher`` update)."""
        frames = traceback.extract_tb(exc.__traceback__)
        user = user_frame(frames)
        where = user or _optimizer_frame(frames)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        location = f" at {where.filename}:{where.lineno} (`{where.line}`)" if where else ""
        if where is not None and where.name and where.name != "<module>":
            location += f" in {where.name}"
        data_dependent = "_local_scalar_dense" in str(exc) or "data-dependent" in str(exc)
        inner = _nn_frame(frames)  # torch.nn code that failed (the user's line called it, or code run by exec)
        if inner is not None and user is not None:
            location += f", inside torch.nn at {os.path.relpath(inner.filename, _TORCH_DIR)}:{inner.lineno} (`{inner.line}`)"
        if data_dependent and inner is not None and "num_batches_tracked" in (inner.line or ""):
            hint = (
                "BatchNorm with momentum=None (a cumulative average) reads its batch count into Python on every "
                "step, which cannot be part of one step graph; give it a fixed momentum (e.g. momentum=0.1), or "
                "unroll with the model in eval() mode"
            )
        elif data_dependent and _frame_in(frames, "distributions") is not None:
            hint = (
                "torch.distributions read a value into Python, most likely its argument checks (validate_args, on by "
                "default: a Python `if` on the values), which cannot be part of one step graph; pass "
                "validate_args=False to the distribution, or "
                "call torch.distributions.Distribution.set_default_validate_args(False) once (sampling and log_prob "
                "are traced and draw every step)"
            )
        elif data_dependent and inner is not None and inner.filename.endswith(os.path.join("modules", "rnn.py")):
            hint = (
                "an RNN over a PackedSequence (pack_padded_sequence) reads the sequence lengths (its batch_sizes) "
                "into Python, which cannot "
                "be part of one step graph; run the RNN on the padded batch and mask instead (e.g. take each "
                "sequence's last valid output with out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, "
                "out.shape[2])), and mask padded positions out of the loss)"
            )
        elif data_dependent:
            hint = _data_dependent_hint((where.line or "") if where else "")
        elif "inside of a function being transformed by a functorch transform" in text:
            hint = (
                "loss_fn differentiates inside the step with torch.autograd (requires_grad_() or "
                "torch.autograd.grad, e.g. a gradient penalty), which cannot be traced inside the step's own "
                "torch.func gradient; write that inner derivative with torch.func, e.g. "
                "gx = torch.func.grad(lambda x: model(x).sum())(x)"
            )
        elif "mutate a captured Tensor" in text:
            hint = (
                "the code updates in place a tensor that is not the model's parameter or buffer: a tensor of the "
                "batch or a meta argument (`x.mul_(2)` on the batch's x), a buffer of a module passed as a meta "
                "argument (BatchNorm's running statistics), or a plain tensor attribute; a step graph carries only "
                "the model's parameters and buffers and the optimizer state from one step to the next. Compute a new "
                "tensor instead of changing the batch (x = x * 2, or x = x.clone() first); put a module passed as a "
                "meta argument in eval() mode (or build its BatchNorm with track_running_stats=False); register a "
                "tensor the model updates as a buffer (module.register_buffer)"
            )
        elif "saved tensor hooks" in text:
            hint = (
                "a saved-tensor hook ran in the step, which the step's torch.func gradient does not support: "
                "activation checkpointing (torch.utils.checkpoint.checkpoint, non-reentrant), "
                "torch.autograd.graph.save_on_cpu or a hook of your own; remove it from the forward and loss_fn: "
                "the unroll's own checkpoint= schedules (\"sqrt\", \"binomial\", unrollc.Budget) bound the memory of "
                "long unrolls, and recompute whole steps instead"
            )
        elif "setup_context" in text and _frame_in(frames, "distributions") is not None:
            hint = (
                "this torch.distributions sampler is an autograd.Function without setup_context (Dirichlet's, which "
                "Beta samples through), which the step's torch.func gradient cannot trace; sample from Gamma instead: "
                "Beta(a, b) is x / (x + y) for x ~ Gamma(a, 1), y ~ Gamma(b, 1), and Dirichlet(c) is g / g.sum(-1) "
                "for g ~ Gamma(c, 1)"
            )
        elif "setup_context" in text:
            hint = (
                "an autograd.Function without a setup_context staticmethod ran in the step (a custom Function written "
                "as forward(ctx, ...), or a module's full backward hook: register_full_backward_hook and "
                "register_full_backward_pre_hook wrap the module in one), and the step's gradient is computed with torch.func, "
                "which needs setup_context. Write the Function as forward(...) plus setup_context(ctx, inputs, "
                "output) (https://pytorch.org/docs/stable/notes/extending.func.html), or remove the backward hook; "
                "to change the parameters' gradients, pass unrollc.compile(..., grad_callback=...)"
            )
        elif user is None and where is not None and isinstance(exc, KeyError) and "state[" in (where.line or ""):
            hint = (
                f"the optimizer's step reads its state entry {text} (KeyError), which torch.optim creates at a "
                "parameter's first step only if an option then asks for it (RMSprop's momentum_buffer when "
                "momentum > 0): an option switched on later by the per-step hyperparameters (or by init(hyper=...) "
                "on a state that has stepped) finds no entry, and eager torch.optim raises the same KeyError. Give "
                "the option its nonzero value from the first step, or a learned value (a tensor requiring grad, "
                "0 included), which creates the entry"
            )
        elif user is None and where is not None:
            hint = (
                f"the optimizer's step could not be traced ({type(exc).__name__}: {text}); try the optimizer with "
                "differentiable=True, or one that unrollc supports (see unrollc.optimizer_spec)"
            )
        else:
            hint = f"{type(exc).__name__}: {text}"
        error = cls(f"{api}: could not capture the training step{location}: {hint}.")
        error.location = where
        error.in_optimizer = data_dependent and user is None and where is not None
        return error


def _data_dependent_hint(line: str) -> str:
    stripped = line.strip()
    what = (
        "branches on the value of a traced tensor" if stripped.startswith(("if ", "elif ", "while ", "assert "))
        else "turns a traced tensor into a Python value (.item(), .tolist(), .numpy(), bool(), float(), int(), len() "
        "of a masked tensor, or an `if` on a tensor)"
    )
    return (
        f"the code {what}, which depends on the data and cannot be part of one step graph; compute it with "
        "tensor ops instead, e.g. torch.where(cond, a, b) for a branch, or keep the value a tensor "
        "(x / y.abs().max() instead of x / float(y.abs().max())); a value read only to log it (loss.item()) "
        "or check it (assert torch.isfinite(h).all()) belongs outside loss_fn: log state.loss / state.losses"
    )


def _nn_frame(frames: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame in ``torch.nn``'s modules or functional code (not its Module.__call__ plumbing)."""
    nn_dir = os.path.join(_TORCH_DIR, "nn") + os.sep
    for frame in reversed(frames):
        if frame.filename.startswith(nn_dir) and not frame.filename.endswith(os.path.join("modules", "module.py")):
            return frame
    return None


def _frame_in(frames: list[traceback.FrameSummary], package: str) -> traceback.FrameSummary | None:
    """The innermost frame in ``torch.<package>``'s code."""
    directory = os.path.join(_TORCH_DIR, package) + os.sep
    return next((frame for frame in reversed(frames) if frame.filename.startswith(directory)), None)


def _optimizer_frame(frames: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    for frame in reversed(frames):
        if f"{os.sep}optim{os.sep}" in frame.filename:
            return frame
    return None


class BatchModifiedError(ValueError, RuntimeError):
    """A tensor of a batch was changed in place after the batches yielded it, which a checkpointed unroll would
    read as the later values (a ``ValueError``: the batches are wrong; and a ``RuntimeError``, as eager autograd
    raises for a tensor saved for backward and then changed in place)."""


class ModelChangedError(ValueError, RuntimeError):
    """The ``batches`` iterable of a checkpointed unroll changed the model (or what ``loss_fn`` reads) while the
    unroll read it ahead of its first step, so every step would run with the last value (a ``ValueError``: the
    batches are wrong for this schedule; and a ``RuntimeError``, as :class:`BatchModifiedError`)."""


class LossError(ValueError, RuntimeError):
    """``diffopt.step(loss)`` got a loss it cannot differentiate (not a scalar, or not requiring grad): a
    ``ValueError``, and a ``RuntimeError`` as ``higher`` raises there (its ``torch.autograd.grad`` call does), so
    ``except RuntimeError`` written for ``higher`` still catches it."""


class ArgumentError(TypeError, ValueError):
    """An argument a public API refuses where earlier releases raised the other of ``TypeError`` and ``ValueError``
    (``EveryK(2.5)`` was a ValueError, ``clip_grad_norm(-1)`` a TypeError): ``except`` clauses for either catch it.
    Raised for the wrong type of argument, as a ``TypeError``, and for a wrong value, as a ``ValueError``."""


class InternalError(AssertionError):
    """An invariant of unrollc broke: this is an unrollc bug."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message} — this is a bug in unrollc, not in your code; please report it with the model, "
            "optimizer and loss_fn that triggered it."
        )
