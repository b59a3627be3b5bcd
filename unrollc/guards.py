"""Guarded scalars: hyperparameters and step counters that the optimizer turns into Python values.

``torch.optim`` mixes tensor maths with Python control flow on its hyperparameters and step count
(``if momentum != 0``, ``if rho_t > 5``, ``param.add_(grad, alpha=-lr)``). unrollc lifts those values
to tensor inputs of the step graph, so at trace time they are tensors. :class:`ScalarTracker`, a
``TorchFunctionMode`` active while the optimizer step is traced, makes that work:

1. It tracks every tensor computed only from *leaves* (the lifted hyperparameters and the 0-dim
   optimizer-state tensors such as ``step``) and constants, as a small expression tree.
2. When such a tensor is turned into a Python value (``bool``, ``float``, ``int``, ``.item()``) it
   returns the concrete value and records a :class:`Guard`: the expression and the value seen. A
   traced graph is reused only while all its guards still hold for the current leaf values; otherwise
   the runtime traces again (RAdam's rectification switches on after a few steps, ASGD's averaging
   starts at ``t0``). A branch is never silently baked in.
3. A tensor passed where ATen wants a Python scalar (``alpha=``, ``value=``) is rewritten into tensor
   maths, so the value stays differentiable instead of being frozen by the argument parser's implicit
   ``.item()``: ``add(a, b, alpha=h)`` -> ``addcmul(a, b, h)`` on CPU float32/float64 tensors (one kernel
   and one rounding, bit for bit ATen's ``add`` with a Python alpha), else ``add(a, b * h)``;
   ``addcmul(a, b, c, value=h)`` -> ``addcmul(a, b * h, c)``. Every ``_foreach_*`` call
   (``_foreach_lerp_(exp_avgs, grads, 1 - beta1)``) is unrolled into one call per tensor: most foreach
   overloads only take Python scalars, and the derivatives of some foreach ops are wrong in torch 2.13
   (``_foreach_addcdiv.Scalar`` fails in its backward), while the per-tensor ops are well tested.
4. Arithmetic among tracked 0-dim tensors runs in float64, as ``torch.optim``'s eager path does with
   Python floats (``1 - beta2 ** step``); in-place updates keep the state tensor's own dtype.

Tensors computed from data (parameters, gradients) are not tracked: turning one of them into a
Python value is a data-dependent branch and fails loudly at trace time.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["Guard", "ScalarTracker", "check_guards"]

_CONVERSIONS = {
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "int",
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
}

# ATen functions whose Python-scalar keyword scales one tensor argument (position 1 in all of them).
_SCALED_KWARG = {"alpha": ("add", "sub"), "value": ("addcmul", "addcdiv")}


class _Leaf:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class _Call:
    """``func(*args, **kwargs)`` where tensor arguments are themselves expressions."""

    __slots__ = ("func", "args", "kwargs", "inplace")

    def __init__(self, func: Callable, args: Any, kwargs: Any, inplace: bool) -> None:
        self.func, self.args, self.kwargs, self.inplace = func, args, kwargs, inplace

    def __repr__(self) -> str:
        name = getattr(self.func, "__name__", str(self.func))
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{name}({', '.join(parts)})"


class _Item:
    """Element ``index`` of a list-valued call (foreach ops)."""

    __slots__ = ("call", "index")

    def __init__(self, call: _Call, index: int) -> None:
        self.call, self.index = call, index

    def __repr__(self) -> str:
        return f"{self.call!r}[{self.index}]"


def _is_expr(x: Any) -> bool:
    return isinstance(x, (_Leaf, _Call, _Item))


_Compiled = Callable[[Mapping[str, torch.Tensor], dict[int, Any]], Any]


def _compile(expr: Any) -> _Compiled:
    """``expr`` as a closure ``(env, memo) -> value``: the value of the expression for the leaf values in ``env``
    (subexpressions computed once per ``memo``). The walk over the tree and over each call's argument structure
    is done here, once: RAdam evaluates its guard on the step count at every step."""
    if isinstance(expr, _Leaf):
        name = expr.name
        return lambda env, memo: env[name]
    if isinstance(expr, _Item):
        inner, index = _compile(expr.call), expr.index
        return lambda env, memo: inner(env, memo)[index]
    if not isinstance(expr, _Call):
        return lambda env, memo: expr
    flat, spec = tree_flatten((expr.args, expr.kwargs), is_leaf=_is_expr)
    parts = [_compile(e) if _is_expr(e) else None for e in flat]
    func, inplace, key = expr.func, expr.inplace, id(expr)
    # the common shape: positional arguments and keywords that are plain values or expressions
    plain = tree_flatten((tuple(range(len(expr.args))), {k: 0 for k in expr.kwargs}))[1] == spec
    n_args, names = len(expr.args), list(expr.kwargs)

    def call(env: Mapping[str, torch.Tensor], memo: dict[int, Any]) -> Any:
        if key in memo:
            return memo[key]
        values = [c if f is None else f(env, memo) for c, f in zip(flat, parts)]
        if plain:
            args, kwargs = values[:n_args], dict(zip(names, values[n_args:]))
        else:
            args, kwargs = tree_unflatten(values, spec)
        if inplace:  # never mutate the caller's leaves: work on a copy of the target
            args = [tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, args[0]), *args[1:]]
        out = func(*args, **kwargs)
        memo[key] = args[0] if inplace else out
        return memo[key]

    return call


@dataclass(frozen=True)
class Guard:
    """A Python value the traced optimizer read from guarded scalars: valid while it re-evaluates equal.

    ``learned`` names a hyperparameter leaf whose ``!= 0`` test was answered True although it was 0,
    because it requires grad (see :class:`ScalarTracker`): the guard also holds whenever that leaf
    requires grad. ``plain`` names a leaf whose ``!= 0`` test was answered False, as it did not require
    grad: the guard fails whenever it does (a learned 0 takes the general branch, whatever ran before)."""

    expr: Any
    kind: str
    value: Any
    learned: str | None = None
    plain: str | None = None

    def holds(self, env: Mapping[str, torch.Tensor]) -> bool:
        """Whether the expression gives the same Python value for the leaf values in ``env``."""
        if self.learned is not None and env[self.learned].requires_grad:
            return True
        if self.plain is not None and env[self.plain].requires_grad:
            return False
        with torch.no_grad():
            return _convert(self._compiled(env, {}), self.kind) == self.value

    @functools.cached_property
    def _compiled(self) -> _Compiled:
        return _compile(self.expr)

    def __str__(self) -> str:
        learned = f" or {self.learned} requires grad" if self.learned else ""
        plain = f" and {self.plain} does not require grad" if self.plain else ""
        return f"{self.kind}({self.expr!r}) == {self.value!r}{learned}{plain}"

    @property
    def leaves(self) -> frozenset[str]:
        """Names of the leaves the guard reads."""
        return _leaf_names(self.expr)


def _leaf_names(expr: Any) -> frozenset[str]:
    if isinstance(expr, _Leaf):
        return frozenset((expr.name,))
    if isinstance(expr, _Item):
        return _leaf_names(expr.call)
    if isinstance(expr, _Call):
        flat = tree_flatten((expr.args, expr.kwargs), is_leaf=_is_expr)[0]
        return frozenset().union(*(_leaf_names(e) for e in flat))
    return frozenset()


def check_guards(guards: Sequence[Guard], env: Mapping[str, torch.Tensor]) -> bool:
    """True when every guard holds for ``env`` (leaf name -> current tensor value)."""
    return all(g.holds(env) for g in guards)


# Traces of one input layout before re-tracing is refused (a value the optimizer branches on changes every step).
MAX_TRACES_PER_LAYOUT = 16


def lookup_or_trace(entries: list[Any], env_of: Callable[[Any], Mapping[str, torch.Tensor]], trace: Callable[[], Any], api: str) -> Any:
    """The first of ``entries`` (traced graphs of one input layout, each with a ``guards`` GuardSet) whose
    guards hold, or a new trace appended to ``entries``; warns when re-tracing often and refuses past
    :data:`MAX_TRACES_PER_LAYOUT`. ``env_of(entry)`` gives the current leaf values for an entry."""
    for entry in entries:  # in trace order: guard sets may overlap (a learned weight_decay of 0), and the
        if not entry.guards or entry.guards.holds(env_of(entry)):  # choice must not depend on what ran before
            return entry
    failed = [str(g) for g in entries[-1].guards] if entries else []
    if len(entries) >= MAX_TRACES_PER_LAYOUT:
        numbers = entries and any(getattr(g, "kind", "bool") != "bool" for g in entries[-1].guards)
        fix = (
            " The optimizer reads such a value into a Python number (float(), .item(), math.sqrt(...) of its step "
            "counter, e.g. lr * math.sqrt(1 - beta2 ** state['step'])), which a step graph holds as a constant, so "
            "every new value needs a new graph. Compute it with tensor ops instead (torch.sqrt, tensor arithmetic "
            "on state['step'] kept as a tensor)."
            if numbers else
            " It branches on a value that changes every step (an `if` on the step counter or a hyperparameter), "
            "which a step graph cannot hold; compute both sides and select with torch.where instead."
        )
        raise RuntimeError(
            f"{api}: traced {len(entries)} graphs for the same input layout because values the optimizer "
            f"reads keep changing (guards: {failed}).{fix}"
        )
    if len(entries) >= 4:
        warnings.warn(f"{api}: re-tracing for the {len(entries) + 1}th time with the same input layout; guards that "
                      f"failed: {failed}", stacklevel=4)
    entry = trace()
    entries.append(entry)
    return entry


def _renamed(expr: Any, aliases: Mapping[str, str], memo: dict[int, Any]) -> Any:
    """``expr`` reading each leaf named in ``aliases`` under the name it maps to (shared subexpressions stay shared)."""
    if id(expr) in memo:
        return memo[id(expr)]
    if isinstance(expr, _Leaf):
        out: Any = _Leaf(aliases.get(expr.name, expr.name))
    elif isinstance(expr, _Item):
        out = _Item(_renamed(expr.call, aliases, memo), expr.index)
    elif isinstance(expr, _Call):
        rename = lambda e: _renamed(e, aliases, memo)  # noqa: E731
        out = _Call(expr.func, tree_map(rename, expr.args, is_leaf=_is_expr), tree_map(rename, expr.kwargs, is_leaf=_is_expr), expr.inplace)
    else:
        return expr
    memo[id(expr)] = out
    return out


class GuardSet:
    """The guards of one traced graph, checked cheaply on every step.

    ``aliases`` maps leaves that the graph receives as one tensor to the one it reads them as (the parameters'
    shared step counter: ``{"state:0.bias.step": "state:0.weight.step"}``, see ``passes/cse.py``): a guard read
    once per parameter (RAdam's ``rho_t > 5``) is then one guard, checked once per step.

    Guards that read only values which are the very same tensor objects, unmodified (same ``_version``),
    as at their last successful check are not evaluated again: hyperparameters are carried unchanged from
    step to step, so e.g. SGD's ``momentum != 0`` is evaluated once, while RAdam's guard on the step
    count is evaluated every step. The set holds references to the tensors it compared, so an ``id`` can
    never be reused by a different tensor.
    """

    def __init__(self, guards: Sequence[Guard], aliases: Mapping[str, str] | None = None) -> None:
        unique: dict[str, Guard] = {}
        for g in guards:
            if aliases and not g.leaves.isdisjoint(aliases):
                g = replace(g, expr=_renamed(g.expr, aliases, {}), learned=aliases.get(g.learned, g.learned),  # type: ignore[arg-type]
                            plain=aliases.get(g.plain, g.plain))  # type: ignore[arg-type]
            unique.setdefault(str(g), g)
        self.guards = list(unique.values())
        self.leaves = sorted(frozenset().union(*(g.leaves for g in self.guards))) if self.guards else []
        self._seen: list[tuple[torch.Tensor, int]] | None = None

    def __len__(self) -> int:
        return len(self.guards)

    def __iter__(self):  # noqa: ANN204
        return iter(self.guards)

    def holds(self, env: Mapping[str, torch.Tensor]) -> bool:
        """Whether every guard holds for ``env``, skipping the work when the leaves are unchanged."""
        if not self.guards:
            return True
        seen = [(env[name], env[name]._version, env[name].requires_grad) for name in self.leaves]
        if self._seen is not None and all(a is b and va == vb and ga == gb
                                           for (a, va, ga), (b, vb, gb) in zip(seen, self._seen, strict=True)):
            return True
        ok = check_guards(self.guards, env)
        self._seen = seen if ok else None
        return ok


def _convert(tensor: torch.Tensor, kind: str) -> Any:
    if kind == "bool":
        return bool(tensor)
    if kind == "float":
        return float(tensor)
    if kind == "int":
        return int(tensor)
    if kind == "tolist":
        return tensor.tolist()
    return tensor.item()


def _widened(first: Any, other: Any, index: int | None = None) -> Any:
    """``other`` in the dtype ATen computes ``first + alpha * other`` in, when that is wider than its own (a bfloat16
    update added to a float32 parameter): multiplied by a 0-dim ``alpha`` tensor in its own dtype, it would be
    rounded to that dtype first."""
    if index is not None and isinstance(first, (list, tuple)):
        first = first[index]
    if not (isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor)):
        return other
    if not (first.is_floating_point() and other.is_floating_point()):
        return other
    wide = torch.result_type(first, other)  # a 0-dim first does not widen a dimensioned other, as in ATen
    return other.to(wide) if wide != other.dtype else other


# Per-tensor ops whose scalar argument a foreach overload takes positionally: (position, keyword).
_POSITIONAL_SCALAR = {"add": (2, "alpha"), "sub": (2, "alpha"), "addcmul": (3, "value"), "addcdiv": (3, "value")}


def _full_like_tensor(input: torch.Tensor, fill_value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``torch.full_like(input, fill_value)`` that stays differentiable in a 0-dim tensor ``fill_value``:
    ``0 + fill_value`` rounds to the target dtype exactly as ATen's fill does."""
    return torch.zeros_like(input, **kwargs) + fill_value


def _full_tensor(size: Sequence[int], fill_value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``torch.full(size, fill_value)`` that stays differentiable in a 0-dim tensor ``fill_value``."""
    return torch.zeros(size, **kwargs) + fill_value


# Factories that read a tensor fill value as a Python scalar, and the differentiable twin used instead.
_FILL_TWIN: dict[Callable, Callable] = {torch.full_like: _full_like_tensor, torch.full: _full_tensor}


# Per-tensor ops that take no Python scalar, and the op that does the same with one.
_SCALAR_TWIN = {"maximum": "clamp_min", "minimum": "clamp_max"}


def _per_tensor_op(name: str) -> Callable | None:
    """The per-tensor function a ``_foreach_<op>[_]`` call maps to, or None when there is none."""
    base = name[len("_foreach_") :]
    if base.endswith("_"):
        return getattr(torch.Tensor, base, None) or getattr(torch, base[:-1], None)
    return getattr(torch, base, None)


def _up(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


_TRUE_DIVISIONS = frozenset({torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide, torch.Tensor.true_divide})


def _rtruediv(self: torch.Tensor, other: Any) -> torch.Tensor:
    """``other / self`` as Python divides two numbers: one correctly rounded division (Tensor.__rtruediv__
    computes ``reciprocal(self) * other``, two roundings)."""
    return torch.div(other, self)


_PYTHON_DIVISION = {torch.Tensor.__rtruediv__: _rtruediv}


def _in_float64(func: Callable) -> Callable:
    """``func`` with its 0-dim floating tensor arguments promoted to float64 (step 4)."""

    def promoted(*args: Any, **kwargs: Any) -> Any:
        if any(isinstance(x, (list, tuple, dict)) for x in (*args, *kwargs.values())):
            return func(*tree_map(_up, args), **tree_map(_up, kwargs))
        return func(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})  # the usual case, without pytree

    promoted.__name__ = getattr(func, "__name__", "op")
    return promoted


# Functions that copy or convert a tensor rather than compute with it: their result keeps the dtype they are
# given (ASGD's ``eta = as_tensor(lr, dtype=float32).clone()`` stays float32, as in eager torch.optim).
_DTYPE_KEEPING = frozenset({"clone", "detach", "to", "type", "contiguous", "as_tensor", "zeros_like", "ones_like", "empty_like"})


# Comparisons with 0 that torch.optim uses to skip a term: ``if weight_decay != 0``, ``if momentum > 0``.
_ZERO_TESTS = frozenset({"__ne__", "ne", "__gt__", "gt"})


def _is_arithmetic(func: Callable) -> bool:
    return getattr(func, "__name__", "") not in _DTYPE_KEEPING


def _is_inplace(func: Callable) -> bool:
    # Python-level torch functions carry no schema; in-place methods follow the trailing-underscore rule.
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _warn_learned_read(leaves: list[str], kind: str) -> None:
    """A learned hyperparameter read into a Python number by the optimizer (transformers' legacy AdamW:
    ``lr * math.sqrt(1 - beta2 ** step)``): the number is a constant of the step graph, so the meta-gradient misses
    the path through it, silently before (9.04 where finite differences give 0.0048, found in review)."""
    import traceback

    from .errors import user_frame, user_stacklevel

    frames = traceback.extract_stack()[:-2]
    where = user_frame(frames) or next((f for f in reversed(frames) if f"{os.sep}optim{os.sep}" in f.filename), None)
    at = f" at {where.filename}:{where.lineno} (`{where.line}`)" if where is not None else ""
    names = ", ".join(repr(n.removeprefix("hyper:")) for n in leaves)
    warnings.warn(
        f"unrollc: the optimizer's step reads the learned hyperparameter {names} into a Python {kind}{at} (float(), "
        ".item(), math.sqrt(...)). That number is a constant of the step graph, so the meta-gradient misses the path "
        "through this use (the other uses carry it). Compute with tensor ops instead (torch.sqrt, tensor arithmetic) "
        "to differentiate through it.",
        stacklevel=user_stacklevel(),
    )


class ScalarTracker(TorchFunctionMode):
    """Tracks tensors computed from guarded leaves and records :class:`Guard` s (see module docstring)."""

    def __init__(self, leaves: Mapping[str, torch.Tensor], learned: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.exprs: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.guards: list[Guard] = []
        self.learned = learned  # leaves whose original tensor requires grad (a learned hyperparameter)
        for name, tensor in leaves.items():
            self.exprs[tensor] = _Leaf(name)

    def _expr_of(self, x: Any) -> Any:
        """The expression for a tracked tensor, a constant for a Python value, None for data."""
        if isinstance(x, torch.Tensor):
            return self.exprs.get(x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        kind = _CONVERSIONS.get(func)
        if kind is not None and isinstance(args[0], torch.Tensor) and args[0] in self.exprs:
            with disable_proxy_modes_tracing():
                value = _convert(args[0], kind)
            expr = self.exprs[args[0]]
            tested = self._zero_test_leaf(expr) if kind == "bool" and value is False else None
            learned = tested if tested in self.learned else None
            if learned is not None:
                value = True  # take the branch that uses the learned hyperparameter (see the class docstring)
            elif kind != "bool" and (read := sorted(_leaf_names(expr) & self.learned)):
                _warn_learned_read(read, kind)
            self.guards.append(Guard(expr, kind, value, learned, plain=tested if learned is None else None))
            return value
        name = getattr(func, "__name__", "")
        if name.startswith("_foreach_") and _per_tensor_op(name) is not None:
            return self._unroll_foreach(func, name, args, kwargs)
        func, args, kwargs = self._scalars_to_tensors(func, args, kwargs)
        if func in _TRUE_DIVISIONS and not kwargs.get("rounding_mode") and self._number_over_data(args):
            # eager's ``python_float / tensor`` is Tensor.__rtruediv__: ``tensor.reciprocal() * python_float``,
            # two roundings (RAdam's ``bias_correction2 ** 0.5 / exp_avg_sq_sqrt``), not a division
            return torch.reciprocal(args[1]) * args[0]
        if not _is_inplace(func) and self._all_tracked_scalars((args, kwargs)) and _is_arithmetic(func):
            func = _in_float64(_PYTHON_DIVISION.get(func, func))
        elif _is_inplace(func) and args and isinstance(args[0], torch.Tensor):
            args, kwargs = self._cast_scalars_to(args[0].dtype, args, kwargs)
        out = func(*args, **kwargs)
        if func is torch.Tensor.to and self._python_number_narrowed(args[0], out):
            # Adam casts beta1 to the parameters' dtype (beta1.to(dtype=param.dtype)) when it is a tensor, as the
            # lifted hyperparameter is; eager with a float beta1 computes 1 - beta1 in double and rounds once, as
            # an in-place op's scalar. A float64 scalar (a Python number) therefore keeps its precision here.
            out = args[0].to(device=out.device)
            self.exprs[out] = self.exprs[args[0]]  # the same value: guards re-evaluate it unchanged
            return out
        self._track(func, args, kwargs, out)
        return out

    def _number_over_data(self, args: tuple) -> bool:
        """Whether ``args`` divide a Python number's value (a tracked float64 0-dim tensor that is not a learned
        hyperparameter, whose eager twin is a tensor) by a tensor computed from data."""
        if len(args) != 2 or not all(isinstance(a, torch.Tensor) for a in args):
            return False
        number, data = args
        expr = self.exprs.get(number)
        return (expr is not None and data not in self.exprs and number.dim() == 0 and number.dtype == torch.float64
                and not _leaf_names(expr) & self.learned)

    def _python_number_narrowed(self, x: Any, out: Any) -> bool:
        """Whether ``x.to(...)`` made ``out`` a lower-precision copy of a tracked float64 0-dim tensor (a Python
        number's value, step 4)."""
        return (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x in self.exprs and x.dim() == 0
                and x.dtype == torch.float64 and out.is_floating_point() and out.dtype != torch.float64)

    def _zero_test_leaf(self, expr: Any) -> str | None:
        """The leaf ``h`` if ``expr`` is ``h != 0`` or ``h > 0`` (through dtype conversions), else None.

        ``torch.optim`` skips a term whose coefficient is 0 (``if weight_decay != 0``, ``if momentum != 0``),
        so a learned hyperparameter that starts at 0 would get no gradient. When it requires grad, the
        tracker answers True: the general branch computes the same values at 0 (``grad + 0 * param``) and
        carries the derivative; a graph traced with a plain 0 is not used for a learned one."""
        if not isinstance(expr, _Call) or len(expr.args) != 2 or getattr(expr.func, "__name__", "") not in _ZERO_TESTS:
            return None
        operand, other = expr.args
        if isinstance(other, bool) or not isinstance(other, (int, float)) or other != 0:
            return None
        while isinstance(operand, _Call) and getattr(operand.func, "__name__", "") in _DTYPE_KEEPING and operand.args:
            operand = operand.args[0]
        if isinstance(operand, _Leaf) and operand.name.startswith("hyper:"):
            return operand.name
        return None

    def _any_tracked(self, tree: Any) -> bool:
        return any(isinstance(x, torch.Tensor) and x in self.exprs for x in tree_flatten(tree)[0])

    def _all_tracked_scalars(self, tree: Any) -> bool:
        tensors = [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]
        return bool(tensors) and all(t in self.exprs and t.dim() == 0 and t.is_floating_point() for t in tensors)

    def _cast_scalars_to(self, dtype: torch.dtype, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """In-place ops cast tracked scalars to the target's dtype, as ATen does with a Python scalar (step 4)."""

        def cast(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x in self.exprs and x.dim() == 0 and x.is_floating_point() and x.dtype != dtype:
                y = x.to(dtype)
                self.exprs[y] = _Call(torch.Tensor.to, (self.exprs[x], dtype), {}, False)
                return y
            return x

        return (args[0], *tree_map(cast, args[1:])), tree_map(cast, kwargs)

    def _unroll_foreach(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        """``_foreach_op(lists..., scalar)`` -> ``[op(l0[i], l1[i], ..., scalar) for i]`` (step 3)."""
        base = name[len("_foreach_") :]
        inplace = base.endswith("_")
        n = next(len(a) for a in args if isinstance(a, (list, tuple)))
        pick = lambda a, i: a[i] if isinstance(a, (list, tuple)) else a  # noqa: E731
        positional_kw = _POSITIONAL_SCALAR.get(base.rstrip("_"))
        results = []
        for i in range(n):
            a_i = [pick(a, i) for a in args]
            kw_i = {k: pick(v, i) for k, v in kwargs.items()}
            if positional_kw and len(a_i) > positional_kw[0]:
                kw_i[positional_kw[1]] = a_i.pop(positional_kw[0])
            if base.rstrip("_") in _SCALAR_TWIN and not isinstance(a_i[1], torch.Tensor):
                base = _SCALAR_TWIN[base.rstrip("_")] + ("_" if inplace else "")
            if inplace and not hasattr(torch.Tensor, base):
                out = self.__torch_function__(getattr(torch, base[:-1]), (), tuple(a_i), kw_i)
                self.__torch_function__(torch.Tensor.copy_, (), (a_i[0], out), {})
                continue
            per_tensor = getattr(torch.Tensor, base) if inplace else getattr(torch, base)
            results.append(self.__torch_function__(per_tensor, (), tuple(a_i), kw_i))
        return None if inplace else results

    def _scalars_to_tensors(self, func: Callable, args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict]:
        """Step 3 of the module docstring: ``alpha=``/``value=`` tensors become a multiplication, and a
        tracked fill value of ``full_like``/``full`` an addition (Rprop's first ``step_size`` is
        ``full_like(grad, lr)``: ATen would read ``lr`` once and freeze it into the graph)."""
        fill_twin = _FILL_TWIN.get(func)
        if fill_twin is not None:
            fill = args[1] if len(args) > 1 else kwargs.get("fill_value")
            if isinstance(fill, torch.Tensor) and fill in self.exprs:
                kwargs.pop("fill_value", None)
                return fill_twin, (args[0], fill), kwargs
        name = getattr(func, "__name__", "").lstrip("_").removeprefix("foreach_").rstrip("_")
        fused = self._fused_alpha(func, name, args, kwargs)
        if fused is not None:
            return fused
        for kw, names in _SCALED_KWARG.items():
            scale = kwargs.get(kw)
            if not isinstance(scale, torch.Tensor) or name not in names or len(args) < 2:
                continue
            del kwargs[kw]
            other = args[1]
            if isinstance(other, (list, tuple)):
                scaled = [_widened(args[0], o, i) * scale for i, o in enumerate(other)]
            else:
                scaled = _widened(args[0], other) * scale
            args = (args[0], scaled, *args[2:])
        return func, args, kwargs

    def _fused_alpha(self, func: Callable, name: str, args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict] | None:
        """``add(a, b, alpha=h)`` -> ``addcmul(a, b, h)`` (``sub``: ``-h``) for a CPU float32/float64 ``a`` and a
        ``b`` of its dtype or a narrower one (widened exactly first): one kernel computing ``a + h * b`` with one
        rounding, bit for bit ATen's ``add`` with a Python ``alpha`` (``b * h`` then ``add`` rounds twice), and still
        differentiable in ``h``. Other devices and dtypes keep the multiplication, in the wider dtype
        (:func:`_widened`; ``addcmul`` would round ``h`` to a reduced-precision dtype first)."""
        scale = kwargs.get("alpha")
        if name not in ("add", "sub") or not isinstance(scale, torch.Tensor) or scale.dim() != 0:
            return None
        if len(args) != 2 or set(kwargs) != {"alpha"} or not all(isinstance(t, torch.Tensor) for t in args):
            return None
        a, b = args
        if any(t.device.type != "cpu" or t.dim() == 0 or not t.is_floating_point() for t in (a, b)):
            return None
        if a.dtype not in (torch.float32, torch.float64) or torch.promote_types(a.dtype, b.dtype) != a.dtype:
            return None
        inplace = _is_inplace(func)
        fused = torch.Tensor.addcmul_ if inplace else torch.addcmul
        # A lower-precision b (Muon's bfloat16 Newton-Schulz update) is widened exactly first, as ATen's add does
        # before it scales: ``b * h`` in b's dtype rounded the update to 8 bits (found in review).
        return fused, (a, _widened(a, b), -scale if name == "sub" else scale), {}

    def _track(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        flat, _ = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if any(t not in self.exprs for t in tensors):
            return  # depends on data: not a guarded scalar
        expr_args = tree_map(self._expr_of, args)
        expr_kwargs = tree_map(self._expr_of, kwargs)
        inplace = _is_inplace(func)
        call = _Call(func, expr_args, expr_kwargs, inplace)
        target = args[0] if inplace and args else out
        if isinstance(target, torch.Tensor):
            self.exprs[target] = call
        elif isinstance(target, (list, tuple)):
            for i, t in enumerate(target):
                if isinstance(t, torch.Tensor):
                    self.exprs[t] = _Item(call, i)
