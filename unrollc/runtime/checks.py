"""Checks of what the user hands a Stepper that a step graph cannot hold, refused early with the fix, and the
user's tensors put back when a capture is refused (all found in review, where they failed deep inside torch,
or silently)."""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves

__all__ = ["check_model", "check_opaque_leaves", "meta_buffers_restored_on_failure"]


def check_model(model: nn.Module) -> None:
    """Refuse at compile time a lazy module's parameters or buffers before its first forward (a bare RuntimeError at
    the first step), and an embedding whose trainable weight gets sparse gradients (a dispatcher error)."""
    if type(model).__name__ == "OptimizedModule" and type(model).__module__.startswith("torch._dynamo"):
        raise TypeError(
            "unrollc.compile: the model is a torch.compile wrapper (OptimizedModule); unrollc traces the step itself "
            "and cannot trace through TorchDynamo. Pass the module it wraps, unrollc.compile(model._orig_mod, opt, "
            "loss_fn) (the same parameters, so the same optimizer), and torch.compile the eager model for eager use."
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "unrollc.compile: the model is a torch.jit.ScriptModule (torch.jit.script/trace of the whole model), whose "
            "submodules and parameters unrollc cannot re-bind to a step's weights. Pass the nn.Module before "
            "scripting it; scripted submodules inside an ordinary module work."
        )
    tensors = [("parameter", n, t) for n, t in model.named_parameters()] + [("buffer", n, t) for n, t in model.named_buffers()]
    for kind, name, t in tensors:
        if nn.parameter.is_lazy(t):
            raise ValueError(
                f"unrollc.compile: {kind} {name!r} is not initialized yet (a lazy module such as nn.LazyLinear "
                "creates its tensors in its first forward). Run the model once on an example batch before "
                "compiling it (model(x)), which gives every parameter and buffer its shape."
            )
    for name, m in model.named_modules():
        if m._backward_pre_hooks or (m._backward_hooks and m._is_full_backward_hook):
            where = f"model.{name}" if name else "the model"
            raise ValueError(
                f"unrollc.compile: {where} ({type(m).__name__}) has a backward hook (register_full_backward_hook or "
                "register_full_backward_pre_hook), which wraps the module in an autograd.Function that the step's "
                "torch.func gradient cannot trace. Remove the hook; to change the parameters' gradients pass "
                "unrollc.compile(..., grad_callback=...), or register a tensor hook (p.register_hook), which each "
                "step applies."
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad:
            where = f"model.{name}" if name else "the model"
            raise ValueError(
                f"unrollc.compile: {where} is {type(m).__name__}(sparse=True): its gradient is a sparse tensor, and a "
                "step graph carries dense tensors only. Build it with sparse=False (the same values and the same "
                "updates for SGD, with a dense gradient), or freeze it (weight.requires_grad_(False))."
            )


def check_opaque_leaves(leaves: list[Any], where: str) -> None:
    """Refuse a leaf of the batch or of the meta arguments (``where``) that hides tensors from the step graph, which
    reads them as pytrees: the tensors inside a dataclass or another object are constants of the graph. Refused
    when that matters: a tensor inside requires grad (no gradient would reach it), or the object is unhashable
    (step graphs are keyed on such values; a dataclass failed with a bare "unhashable type"). A hashable object
    holding constant tensors (a fixed prior distribution) is a constant, as before."""
    api = "Stepper.step/Stepper.unroll"
    for leaf in leaves:
        if isinstance(leaf, (torch.Tensor, numbers.Number, str, bytes, type(None), torch.dtype, torch.device)):
            continue
        name = type(leaf).__qualname__
        fields = ({f.name: getattr(leaf, f.name, None) for f in dataclasses.fields(leaf)} if dataclasses.is_dataclass(leaf)
                  else vars(leaf) if hasattr(leaf, "__dict__") else {})
        inside = [t for t in tree_leaves(list(fields.values())) if isinstance(t, torch.Tensor)]
        try:
            hash(leaf)
            hashable = True
        except TypeError:
            hashable = False
        if inside and (not hashable or any(t.requires_grad for t in inside)):
            fix = (f"torch.utils._pytree.register_dataclass({name}) once" if dataclasses.is_dataclass(leaf) else
                   f"torch.utils._pytree.register_pytree_node({name}, flatten, unflatten) once")
            raise TypeError(
                f"{api}: {where} holds an instance of {name}; unrollc reads batches and meta arguments as pytrees of "
                "tensors (tuples, lists, dicts, namedtuples) and cannot see the tensors inside it: they would be "
                "constants of the step graph, which no gradient reaches and which every new object traces anew. "
                f"Pass its tensors as a tuple or dict, or register the class with {fix}."
            )
        if not hashable:
            raise TypeError(
                f"{api}: {where} holds an instance of {name}, which is not a tensor, a number, a string or a pytree "
                "(tuple, list, dict, namedtuple), and is not hashable: unrollc keys its step graphs on such values. "
                "Pass tensors in a tuple or dict, make the class hashable (a frozen dataclass), or register it with "
                "torch.utils._pytree.register_pytree_node."
            )


@contextlib.contextmanager
def meta_buffers_restored_on_failure(meta: tuple) -> Iterator[None]:
    """Tracing runs the loss for real: a module passed as a meta argument with BatchNorm in train mode updates its
    running statistics in place before the capture refuses that write. Put them back, so that the refused step
    leaves the user's module as it was and a retry after the fix starts from the same statistics. Only submodules in
    training mode are copied (eval-mode modules do not update their buffers). A write into the batch
    (``x.mul_(2)`` in ``loss_fn``) stays, as in eager code."""
    from .meta import ModuleArg

    modules = [leaf.module for leaf in tree_flatten(meta, is_leaf=lambda x: isinstance(x, ModuleArg))[0]
               if isinstance(leaf, ModuleArg)]
    saved = [(b, b.detach().clone()) for m in modules for sub in m.modules() if sub.training
             for b in sub.buffers(recurse=False)]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        raise
