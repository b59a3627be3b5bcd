"""What a traced step graph bakes in besides its inputs, which the :class:`~unrollc.runtime.stepper.Stepper`'s
graph cache therefore keys on: ``module.training`` of every module (:data:`Modes`) and the plain Python values
the model and ``loss_fn`` read (:func:`python_values`: ``self.scale = 3.0``, a dropout's ``p``, a closure's
temperature). A change of any of them traces a new graph, as torch.compile's guards would."""

from __future__ import annotations

import contextlib
import dataclasses
import dis
import enum
import functools
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import user_stacklevel
from ..optimizer_spec import Same

__all__ = ["Modes", "autocast_state", "forward_hooks", "gradient_hooks", "module_code", "module_modes", "module_state", "module_values", "python_values", "restored_attributes", "training_modes", "warn_numbers", "warn_written"]


# (module.training per module, trainable params, values, torch's default dtype: factory calls and Python scalars in the
# model and in torch.optim, e.g. ASGD's eta and mu, take it, so a graph traced under one dtype is not the other's;
# the parameters' gradient hooks, see gradient_hooks, the modules' forward hooks, see forward_hooks, and code, see
# module_code; the same for each module passed as a meta argument, see module_modes)
Modes = tuple[tuple[bool, ...], frozenset[str], tuple, torch.dtype, tuple, tuple]
_SKIP = object()


def _value_key(v: Any, depth: int = 0) -> Any:
    """A comparable stand-in for a value a traced graph may have baked in, or _SKIP for what is not one."""
    if v is None or isinstance(v, (bool, int, str, enum.Enum)):
        return v  # an Enum member is a singleton: compared by identity
    if isinstance(v, float):
        return v.hex()  # NaN equals itself
    if isinstance(v, (torch.Tensor, torch.Generator)):
        return Same(v)  # read by reference: re-binding the name to another tensor or generator re-traces
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
        return Same(v)  # self.act = torch.sigmoid: the code the forward calls
    if isinstance(v, types.MethodType):
        return ("method", Same(v.__func__), Same(v.__self__))
    if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "shape", None) == ():
        return ("numpy", type(v).__name__, _value_key(v.item()))  # np.float32(0.5), np.int64(3)
    if depth >= 3:
        return _SKIP
    if isinstance(v, (tuple, list)) and len(v) <= _LONGEST:
        keys = tuple(_value_key(x, depth + 1) for x in v)
        return _SKIP if any(k is _SKIP for k in keys) else keys
    if isinstance(v, dict) and len(v) <= _LONGEST:  # a config dict of numbers
        items = tuple((k, _value_key(x, depth + 1)) for k, x in v.items() if isinstance(k, (str, int)))
        return _SKIP if len(items) != len(v) or any(k is _SKIP for _, k in items) else ("dict", items)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # a config object: its fields
        items = tuple((f.name, _value_key(getattr(v, f.name), depth + 1)) for f in dataclasses.fields(v))
        return _SKIP if any(k is _SKIP for _, k in items) else ("dataclass", type(v), items)
    return _SKIP


_LONGEST = 64  # longer lists and dicts are not compared every step (README: baked in)


@functools.lru_cache(maxsize=256)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The globals ``code`` reads (LOAD_GLOBAL, in nested comprehensions and lambdas too), not the attribute
    names that share ``co_names`` with them."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def gradient_hooks(named_params: Iterable[tuple[str, torch.Tensor]], api: str) -> tuple:
    """``(name, hook ids)`` of the parameters with ``Tensor.register_hook`` hooks: the step graph applies them to
    the parameter's gradient, as eager ``loss.backward()`` does, so adding or removing one traces a new graph.
    A post-accumulate-grad hook (``register_post_accumulate_grad_hook``: it reads ``p.grad``, or steps an
    optimizer, after accumulation) has no place in a functional step: refused, with the fix."""
    hooks = []
    for name, p in named_params:
        if getattr(p, "_post_accumulate_grad_hooks", None):
            raise TypeError(
                f"{api}: parameter {name!r} has a hook registered with register_post_accumulate_grad_hook; a "
                "compiled step computes gradients as values and never accumulates them into .grad, so the hook "
                "would not run. Remove it (handle.remove()) and transform the gradients with "
                "unrollc.compile(..., grad_callback=lambda grads, *meta: {...}) instead."
            )
        if p._backward_hooks:
            hooks.append((name, tuple(p._backward_hooks)))
    return tuple(hooks)


def forward_hooks(modules: Iterable[nn.Module]) -> tuple:
    """The hooks (their handle ids) of each of ``modules``: forward hooks and pre-hooks, which
    tracing runs, so the step graph has what they do baked in, and module backward hooks, which tracing refuses
    (with the fix); adding or removing one traces a new graph."""
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    per_module = tuple((i, *(tuple(getattr(m, k)) for k in kinds))
                       for i, m in enumerate(modules) if any(getattr(m, k) for k in kinds))
    # torch's global module hooks are left out: tools register them for a moment around each call
    # (FlopCounterMode's module tracker), which would trace every step anew
    return per_module


def autocast_state() -> tuple:
    """Whether ``torch.autocast`` is on, and in which dtype, for the CPU and CUDA: tracing records the casts it
    inserts, so a graph traced under autocast is another graph."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


def module_code(modules: Iterable[nn.Module]) -> tuple:
    """Which code each of ``modules`` runs: the module object (``model[1] = nn.Sigmoid()`` replaces a layer without
    parameters), its class and a ``forward`` set on the instance, compared by identity."""
    return tuple((Same(m), type(m), Same(vars(m).get("forward"))) for m in modules)


def module_state(module: nn.Module) -> tuple:
    """What a step graph bakes in of a module it calls without carrying its tensors (one passed as a meta argument,
    an ``nn.Module`` loss_fn), besides its Python values: the ``training`` flags of its submodules, their hooks and
    code, and its buffers (the graph reads them by reference)."""
    modules = list(module.modules())
    return (tuple(m.training for m in modules), forward_hooks(modules), module_code(modules),
            tuple(map(Same, module.buffers())))


def module_modes(modules: Iterable[nn.Module], values: Callable[[int, nn.Module], tuple]) -> tuple:
    """What a step graph bakes in of the modules passed as meta arguments (a learned loss network), one entry per
    module: :func:`module_state` (the ``training`` flags first) and its Python values (``values(j, module)``, see
    :func:`module_values`)."""
    return tuple((*module_state(module), values(j, module)) for j, module in enumerate(modules))


def module_values(j: int, module: nn.Module) -> tuple:
    """The public attributes (``self.temperature = 2.0``) of the ``j``-th module passed as a meta argument."""
    return tuple(item for prefix, m in module.named_modules() for item in _public_values(f"meta{j}.{prefix}", m))


def python_values(model: nn.Module, loss_fn: Callable[..., Any], grad_callback: Callable[..., Any] | None = None,
                  meta_modules: Iterable[nn.Module] = ()) -> tuple:
    """The plain values a step graph bakes in when it is traced: public attributes of the model's modules
    (``self.scale = 3.0``, a dropout ``p``, a plain tensor attribute), of the modules passed as meta arguments, and
    the variables ``loss_fn`` (and ``grad_callback``, if any) closes over or reads as globals. A change re-traces, as
    torch.compile's guards would; values read elsewhere (a helper function's globals, attributes of other objects)
    stay as traced."""
    out = [item for prefix, module in model.named_modules() for item in _public_values(prefix, module)]
    out += [item for j, module in enumerate(meta_modules) for item in module_values(j, module)]
    out += _function_values("loss_fn", loss_fn)
    if grad_callback is not None:
        out += _function_values("grad_callback", grad_callback)
    return tuple(out)


def _function_values(label: str, fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """``(label, name, key)`` for the code of the user's function ``fn`` (another function assigned to the stepper's
    attribute re-traces; a new but identical one, such as a lambda made again, does not) and for what it reads: its
    closure variables and globals, a
    ``functools.partial``'s bound arguments, and the public attributes of the object whose method or ``__call__``
    it is (a loss class's ``self.alpha``)."""
    out: list[tuple[str, Any, Any]] = [(label, "<code>", _code_identity(fn))]  # stepper.loss_fn = another function
    extra: tuple = ()
    if isinstance(fn, functools.partial):
        fn, extra = fn.func, (*fn.args, *fn.keywords.values())
    owner = getattr(fn, "__self__", None)  # a bound method's object: its config (self.alpha) is read too
    if owner is None and not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType)):
        owner, fn = fn, getattr(type(fn), "__call__", fn)  # a callable object (a loss class)
        if isinstance(owner, nn.Module):
            fn = getattr(type(owner), "forward", fn)
    if isinstance(owner, nn.Module):  # a loss module: its layers' modes, hooks and code, its buffers, its values
        out.append((label, "<module>", module_state(owner)))
        out += [item for prefix, m in owner.named_modules() for item in _public_values(f"{label}.self.{prefix}".rstrip("."), m)]
    elif owner is not None and not isinstance(owner, types.ModuleType):
        out += _public_values(f"{label}.self", owner)
    code = getattr(fn, "__code__", None)
    if code is not None:
        cells = zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False)
        found = [(n, c.cell_contents) for n, c in cells if _cell_has_value(c)]
        scope = getattr(fn, "__globals__", {})
        found += [(n, scope[n]) for n in _global_names(code) if n in scope]
        out += [(label, n, k) for n, v in found if (k := _value_key(v)) is not _SKIP]
    out += [(label, i, k) for i, v in enumerate(extra) if (k := _value_key(v)) is not _SKIP]
    return out


def _code_identity(fn: Any) -> Any:
    """What decides which code ``fn`` runs: the code object of a function or lambda (of the underlying function for
    a bound method or a ``functools.partial``), or the class of a callable object; compared by identity."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)  # a bound method: its function (the object's values are keyed apart)
    code = getattr(fn, "__code__", None)
    return Same(code if code is not None else (fn if isinstance(fn, types.BuiltinFunctionType) else type(fn)))


def _public_values(where: str, obj: Any) -> list[tuple[str, str, Any]]:
    """``(where, attribute, key)`` for the public attributes of ``obj`` that :func:`_value_key` can key on."""
    return [(where, name, key) for name, v in _public_attributes(obj).items() if (key := _value_key(v)) is not _SKIP]


def _public_attributes(obj: Any, hook_assigned: bool = False) -> dict[str, Any]:
    """The attributes of ``obj`` a user sets and a traced graph may read: public, and not a module's ``training``
    flag (the modes are keyed separately) nor, unless ``hook_assigned``, what a hook-based weight_norm /
    spectral_norm assigns before every call (recomputed from the parameters: re-bound by every eager forward)."""
    hooked = _hook_assigned(obj) if isinstance(obj, nn.Module) and not hook_assigned else set()
    return {name: v for name, v in getattr(obj, "__dict__", {}).items()
            if name[0] != "_" and name != "training" and name not in hooked}


def _hook_assigned(module: nn.Module) -> set[str]:
    """Names that forward pre-hooks with a ``name`` (torch's WeightNorm, SpectralNorm) assign on ``module``."""
    return {h.name for h in module._forward_pre_hooks.values() if isinstance(getattr(h, "name", None), str)}


def _cell_has_value(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an unfilled cell raises
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def training_modes(model: nn.Module, modes: Modes | None, meta_modules: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Set every module's ``training`` flag (the model's, and those of the modules passed as meta arguments) and
    torch's default dtype to ``modes`` for the body (nothing if None); restored after."""
    if modes is None:
        yield
        return
    modules = list(model.modules())
    flags = list(modes[0])
    for module, entry in zip(meta_modules, modes[5], strict=True):
        modules += module.modules()
        flags += entry[0]
    saved, saved_dtype = [m.training for m in modules], torch.get_default_dtype()
    try:
        for m, mode in zip(modules, flags, strict=True):
            m.training = mode
        torch.set_default_dtype(modes[3])
        yield
    finally:
        for m, mode in zip(modules, saved, strict=True):
            m.training = mode
        torch.set_default_dtype(saved_dtype)


def warn_numbers(batch: Any, meta: tuple, count: int, traced: list[list[Any]] | None = None) -> None:
    """A Python number in the batch or the meta arguments is a constant of the step graph: each new value traces
    a new one (a learned-loss temperature annealed as a float re-traced every meta-iteration). ``traced``: the
    leaves of the traces so far; a value that was the same in all of them (``"split": "train"``) is not the cause."""
    leaves = tree_flatten((batch, meta))[0]
    def differs(a: Any, b: Any) -> bool:
        if type(a) is not type(b):
            return True
        if isinstance(a, torch.Tensor):
            return False
        try:
            return bool(a != b)
        except Exception:  # noqa: BLE001 - a value without a plain comparison (a numpy array): count it as changed
            return True

    varied = [i for i, x in enumerate(leaves)
              if traced is None or any(len(t) != len(leaves) or differs(t[i], x) for t in traced)]
    leaves = [leaves[i] for i in varied]
    numbers = [x for x in leaves if isinstance(x, (int, float)) and not isinstance(x, bool)]
    others = [x for x in leaves if not isinstance(x, (torch.Tensor, int, float, bool, type(None), nn.Module))]
    if numbers:
        warnings.warn(
            f"Stepper.step: {count} step graphs traced so far. The Python numbers among the batch and meta arguments "
            f"({', '.join(map(repr, numbers[:4]))}{', ...' if len(numbers) > 4 else ''}) are constants of a step graph, "
            "so every new value traces a new one (about a second each); pass them as tensors (torch.tensor(value)) "
            "to make them inputs of one graph.", stacklevel=user_stacklevel())
    elif others:  # a string id per batch ({"x": ..., "id": "shard-3"}): a new graph every step, 0.25 s each
        shown = ", ".join(repr(x) if isinstance(x, str) else type(x).__name__ for x in others[:4])
        warnings.warn(
            f"Stepper.step: {count} step graphs traced so far. The batch and meta arguments hold values that are not "
            f"tensors ({shown}{', ...' if len(others) > 4 else ''}); each is a constant of a step graph, so every new "
            "value traces a new one (about a second each). Keep what loss_fn does not need out of the batch (ids, "
            "file names), and pass numbers as tensors.", stacklevel=user_stacklevel())


_MISSING = object()


@contextlib.contextmanager
def restored_attributes(model: nn.Module) -> Iterator[set[str]]:
    """Put back the public attributes of ``model``'s modules that the body assigns (tracing runs the forward,
    which may count its calls, carry a hidden state or keep its last attention map): the user's model is not
    changed by tracing. Their names (``"encoder.calls"``) are added to the set the context yields, except the
    tensors that hook-based weight_norm and spectral_norm assign (recomputed from the parameters every call)."""
    modules = dict(model.named_modules())
    saved = {prefix: _public_attributes(m, hook_assigned=True) for prefix, m in modules.items()}
    # what hook-based weight_norm / spectral_norm assign (module.weight, recomputed by a pre-hook every call)
    hooked = {prefix: _hook_assigned(m) for prefix, m in modules.items()}
    written: set[str] = set()
    try:
        yield written
    finally:
        for prefix, m in modules.items():
            before, current = saved[prefix], _public_attributes(m, hook_assigned=True)
            for name in set(current) | set(before):
                old = before.get(name, _MISSING)
                if current.get(name, _MISSING) is old:
                    continue
                if not (isinstance(current.get(name), torch.Tensor) and name in hooked[prefix]):
                    written.add(f"{prefix}.{name}" if prefix else name)
                if old is _MISSING:
                    delattr(m, name)
                else:
                    setattr(m, name, old)


def warn_written(names: set[str]) -> None:
    """Point out attributes the forward assigns: a step runs the traced graph, not the forward."""
    if names:
        warnings.warn(
            f"unrollc: the model's forward assigns {', '.join(sorted(names))} (a Python attribute). Steps run the "
            "traced step graph, not your forward: the attribute keeps the value it had before tracing, and a value "
            "it carries from one step to the next (a counter) stays what it was when traced. Keep state the forward "
            "updates in a buffer (self.register_buffer('calls', torch.zeros(()))), which every step carries, or "
            "compute it from the step count.", stacklevel=user_stacklevel())
