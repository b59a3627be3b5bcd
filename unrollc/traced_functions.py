"""How some torch functions are traced into a step graph, and run under a meta-gradient.

ATen's kernels for a few functions either hide a mutation from their schema (``native_batch_norm``), read tensor
values into Python (``F.one_hot``), draw in another memory order than eager code under ``torch.func.grad``
(CPU dropout), or have a wrong or missing double backward (``torch._weight_norm``'s fused kernel, the fused CPU
attention kernels). While a step is traced (:mod:`unrollc.capture`) they are computed with formulas that have
eager's values and exact derivatives: :data:`DECOMPOSITIONS` for ``make_fx``, :class:`TracedFunctions` and
:func:`sdpa_math` around the traced function. :class:`RestoredGenerators` keeps the user's generators as they
were, and :class:`CompositeWeightNorm` serves code that runs eagerly (``unrollc.higher``).
"""

from __future__ import annotations

import contextlib
import operator
import traceback
import weakref
from typing import Any

import torch

from .errors import CaptureError, user_frame

__all__ = ["DECOMPOSITIONS", "CompositeWeightNorm", "RestoredGenerators", "TracedFunctions", "sdpa_math"]


def sdpa_math() -> contextlib.AbstractContextManager:
    """Scaled-dot-product attention with the math kernel only (``sdpa_kernel(SDPBackend.MATH)``): the fused CPU
    attention kernels have no double backward; the math kernel does. ``unrollc.higher`` enters it around every
    forward of a functional module, so it sets the five backend flags directly (about 2 us against
    ``sdpa_kernel``'s 20)."""
    return _SdpaMath()


# torch.nn.attention._backend_names: the SDPA backends, each with a getter and a setter of its enabled flag
_SDPA_BACKENDS = ("cudnn", "flash", "mem_efficient", "math", "overrideable")


class _SdpaMath:
    __slots__ = ("_previous",)
    _get = tuple(getattr(torch._C, f"_get_{name}_sdp_enabled") for name in _SDPA_BACKENDS)
    _set = tuple(getattr(torch._C, f"_set_sdp_use_{name}") for name in _SDPA_BACKENDS)
    _math = tuple(name == "math" for name in _SDPA_BACKENDS)

    def __enter__(self) -> None:
        self._previous = tuple(get() for get in self._get)
        for set_enabled, on in zip(self._set, self._math):
            set_enabled(on)

    def __exit__(self, *exc: object) -> None:
        for set_enabled, on in zip(self._set, self._previous):
            set_enabled(on)


def _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):  # noqa: ANN001, ANN202
    # aten.native_batch_norm updates the running stats in place but its schema does not say so; the
    # "legit" variant's schema marks them (Tensor(a!)), so functionalize sees and rewrites the update.
    if running_mean is None:
        return torch.ops.aten._native_batch_norm_legit.no_stats(input, weight, bias, training, momentum, eps)
    if not training:  # reads the stats only: the functional variant (the stats may be constants, e.g. of a meta module)
        return torch.ops.aten._native_batch_norm_legit_no_training.default(
            input, weight, bias, running_mean, running_var, momentum, eps
        )
    return torch.ops.aten._native_batch_norm_legit.default(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )


def _weight_norm(v, g, dim=0):  # noqa: ANN001, ANN202
    # The fused kernel (torch._weight_norm takes it for dim 0 and the last dim) has a wrong double backward
    # on CPU (torch.autograd.gradgradcheck fails in torch 2.13), which made meta-gradients through
    # weight_norm ~0.2% off; torch's own composite path (other dims) is this formula, with exact derivatives.
    norm = torch.norm_except_dim(v, 2, dim)
    return v * (g / norm), norm


def _one_hot(input, num_classes=-1, where=""):  # noqa: ANN001, ANN202
    # F.one_hot reads input.min() and input.max() into Python to check the class values (inside ATen, below any
    # decomposition table), which a step graph cannot do; with num_classes given, the result is this comparison.
    # On the CPU the step checks the values as eager does (an assertion node, which dead-code elimination keeps);
    # on other devices a failed assertion would end the process's device context, so a class value outside
    # [0, num_classes) gives a row of zeros there instead of eager's error.
    if input.device.type == "cpu":
        torch._assert_async(
            ((input >= 0) & (input < num_classes)).all(),
            f"unrollc: F.one_hot(y, {num_classes}){where}: a class value of this batch is outside [0, {num_classes}), "
            "where eager F.one_hot raises too; check the labels, or pass the right num_classes.",
        )
    return (input.unsqueeze(-1) == torch.arange(num_classes, device=input.device)).to(torch.int64)


def _dropout(input, p=0.5, training=True, inplace=False):  # noqa: ANN001, ANN202
    # ATen's CPU dropout draws its mask into empty_like(input), in the input's memory order; under torch.func.grad
    # it draws into a contiguous tensor instead (a composite-compliant path), so the mask of a transposed input
    # (TransformerEncoderLayer(batch_first=True)) differed from eager's under the same seed. Eager's steps, here:
    if not training or not 0 < p < 1 or input.device.type != "cpu":
        return torch.nn.functional.dropout(input, p, training, inplace)  # (the mode is off inside its handler)
    noise = torch.empty_like(input).bernoulli_(1 - p).div_(1 - p)
    return input.mul_(noise) if inplace else input * noise


class RestoredGenerators(torch.overrides.TorchFunctionMode):
    """The user's own generators that torch functions are given (``torch.randn(..., generator=g)``) are put back
    as they were when the mode exits: tracing runs the step for real, and must not draw from them, as
    :func:`unrollc.runtime.rng.fork_rng` keeps the default generators."""

    def __enter__(self) -> "RestoredGenerators":
        self.generators: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        # Latest first: tracing may hand the same generator over as another Python object, seen after it drew.
        for generator, state in reversed(self.generators.values()):
            generator.set_state(state)

    def _record(self, kwargs: dict[str, Any]) -> None:
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and id(generator) not in self.generators:
            self.generators[id(generator)] = (generator, generator.get_state())

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        self._record(kwargs)
        return func(*args, **kwargs)


class TracedFunctions(RestoredGenerators):
    """While a step is traced: torch functions whose ATen kernel reads tensor values into Python, computed with
    tensor ops instead (``F.one_hot(y, num_classes)``), and dropout drawing its mask as eager code does; the
    user's generators are restored (:class:`RestoredGenerators`)."""

    def __init__(self, inputs: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.inputs = inputs  # ids of the tensors the trace lifts into step inputs (see _traced)

    def __enter__(self) -> "TracedFunctions":
        self.sized_by_data: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.data_dim: dict[int, int] = {}  # id -> the dim of a tensor in sized_by_data whose length the data decide
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        self._record(kwargs)
        if func in _DATA_READS and args and isinstance(args[0], torch.Tensor) and _traced(args[0], self.inputs):
            _refuse_data_read(f"{func.__name__}() reads the values of a traced tensor into Python")
        if args and isinstance(args[0], torch.Tensor) and self.sized_by_data.get(id(args[0])) is args[0]:
            if func is torch.Tensor.__len__:
                _refuse_data_read("len() reads the length of a tensor whose size depends on the data (x[mask], "
                                  "nonzero, unique) into Python; count with a tensor instead: mask.sum()")
            dim = self.data_dim.get(id(args[0]), 0)
            if _reads_data_length(func, args, kwargs, dim):
                mark_size_read(args[0])
            elif _reads_shape(func, args, kwargs) and _called_by_user():  # x[mask].shape: its data dim if read
                return _DataShape(func(*args, **kwargs), args[0], dim)
        for arg in (*args, *kwargs.values()):  # torch.zeros(h.shape): torch reads every dim, without __getitem__
            for shape in (arg if isinstance(arg, (list, tuple)) and not isinstance(arg, _DataShape) else (arg,)):
                if isinstance(shape, _DataShape):
                    shape._read()
        if func is torch.Tensor.__setitem__ and _is_masked_fill(*args):
            # t[mask] = v with a mask of t's own shape: masked_fill_, the same values without the data-dependent
            # count of the mask (torch.optim.Rprop's sign[sign.gt(0)] = etaplus on a 0-dim parameter failed).
            args[0].masked_fill_(args[1], args[2])
            return None
        if func is torch.nn.functional.dropout:
            return _dropout(*args, **kwargs)
        if func is torch.nn.functional.one_hot:
            bound = dict(zip(("input", "num_classes"), args), **kwargs)
            where = user_frame(traceback.extract_stack())
            at = f" at {where.filename}:{where.lineno} (`{where.line}`)" if where else ""
            if bound.get("num_classes", -1) >= 0:
                return _one_hot(**bound, where=at)
            raise CaptureError(
                f"unrollc.compile: F.one_hot without num_classes{at} takes the number of classes from the data "
                "(the largest class value + 1), which cannot be part of a step graph; pass it: F.one_hot(y, num_classes)."
            )
        out = func(*args, **kwargs)
        if _sized_by_data(func, args):
            for t in out if isinstance(out, tuple) else (out,):  # torch.where(mask): one index tensor per dim
                if isinstance(t, torch.Tensor):
                    self.sized_by_data[id(t)] = t
                    self.data_dim[id(t)] = 0
        elif (isinstance(out, torch.Tensor) and out.dim() and args and isinstance(args[0], torch.Tensor)
              and args[0].dim() and self.sized_by_data.get(id(args[0])) is args[0]):
            d = self.data_dim.get(id(args[0]), 0)
            moved = _moved_dim(func, args, kwargs, d)  # h.T, h.permute(1, 0), h.unsqueeze(0): the data dim moves
            if moved is None and d == 0 and _keeps_dim0(func, args, kwargs):
                moved = 0  # nonzero(m).squeeze(1), x[mask] * 2: dim 0 is still the data's
            if moved is not None and moved < out.dim() and out.shape[moved] == args[0].shape[d]:
                self.sized_by_data[id(out)] = out
                self.data_dim[id(out)] = moved
        return out


# Ops that copy a tensor's values into Python objects without a dispatcher op that make_fx refuses (as it does
# ``aten._local_scalar_dense`` for .item()): in a step they would keep the traced step's values for every step.
_DATA_READS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__})
SIZE_READ = "unrollc size read"  # in node.meta["custom"]: see mark_size_read
_SIZED_BY_DATA = frozenset({torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
                            torch.unique, torch.Tensor.unique, torch.argwhere, torch.Tensor.argwhere})


def _sized_by_data(func: Any, args: tuple) -> bool:
    """Whether ``func(*args)`` returns a tensor (or tensors) whose size depends on the values of its inputs."""
    if func in _SIZED_BY_DATA or (func is torch.where and len(args) == 1):
        return True
    if func is torch.Tensor.__getitem__ and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _reads_data_length(func: Any, args: tuple, kwargs: dict[str, Any], data_dim: int = 0) -> bool:
    """Whether ``func(*args, **kwargs)`` reads into Python the length of dim ``data_dim`` of ``args[0]``, a tensor
    sized by the data (the dim whose length the data decide: ``x[mask]``, ``nonzero``, ``unique``): ``.numel()``,
    ``.size(data_dim)``, and ``.shape`` / ``.size()`` of a 1-D tensor. (The ``.shape`` of an N-D one is a
    :class:`_DataShape`, which sees which dims are read.)"""
    t = args[0]
    if func is torch.Tensor.numel:
        return True
    if func is torch.Tensor.size and (len(args) > 1 or "dim" in kwargs):
        dim = args[1] if len(args) > 1 else kwargs["dim"]
        return isinstance(dim, int) and dim % max(t.dim(), 1) == data_dim
    return (func is torch.Tensor.size or func == torch.Tensor.shape.__get__) and t.dim() == 1


# Functions whose result keeps their first argument's dim 0 as its own (elementwise maths, conversions, squeeze):
# a data-dependent length stays data-dependent through them. Others (mean(0), h[0], .T) are not followed, even when
# a length happens to be equal (found in review: a (D,) mean read as D refused the next batch's other count).
_KEEPS_DIM0 = frozenset({
    "squeeze", "view", "reshape", "flatten", "float", "double", "half", "bfloat16", "long", "int", "bool", "to",
    "type", "type_as", "contiguous", "clone", "detach", "abs", "neg", "exp", "log", "sqrt", "square", "sigmoid",
    "tanh", "relu", "sin", "cos", "clamp", "pow", "mul", "add", "sub", "div", "__mul__", "__rmul__", "__add__",
    "__radd__", "__sub__", "__rsub__", "__truediv__", "__rtruediv__", "__pow__", "__neg__", "__abs__",
})


def _moved_dim(func: Any, args: tuple, kwargs: dict[str, Any], d: int) -> int | None:
    """Where dim ``d`` of ``args[0]`` is in the result of a transposing or dim-inserting function (``.T``, ``t``,
    ``transpose``, ``permute``, ``unsqueeze``); None for other functions (found in review: ``x[mask].T.shape[1]``
    kept its traced count, silently)."""
    name, n = getattr(func, "__name__", ""), args[0].dim()
    if func == torch.Tensor.T.__get__ or (name == "t" and n == 2) or func == torch.Tensor.mT.__get__:
        return n - 1 - d if func == torch.Tensor.T.__get__ else ({n - 2: n - 1, n - 1: n - 2}.get(d, d))
    try:
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = (int(x) % n for x in (list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2])
            return {a: b, b: a}.get(d, d)
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            return [int(x) % n for x in dims].index(d)
        if name == "unsqueeze":
            k = (args[1] if len(args) > 1 else kwargs["dim"]) % (n + 1)
            return d + 1 if k <= d else d
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    return None


def _keeps_dim0(func: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__getitem__":  # h[:, 0], h[..., :2]: dim 0 untouched
        index = args[1] if len(args) > 1 and isinstance(args[1], tuple) else (args[1] if len(args) > 1 else None,)
        return bool(index) and (index[0] is Ellipsis or (isinstance(index[0], slice) and index[0] == slice(None)))
    return name in _KEEPS_DIM0


def _reads_shape(func: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """``t.shape`` or ``t.size()`` of an N-D tensor (the whole size; which dims are read is seen later)."""
    return ((func == torch.Tensor.shape.__get__ or (func is torch.Tensor.size and len(args) == 1 and not kwargs))
            and args[0].dim() > 1)


def _called_by_user() -> bool:
    """Whether the torch function being handled was called from outside torch (torch's own code gets real sizes)."""
    import os
    import sys

    here = os.path.dirname(__file__)
    frame = sys._getframe(2)  # past the torch function modes (unrollc's, make_fx's) to the code that called
    while frame is not None and (frame.f_code.co_name == "__torch_function__" or frame.f_code.co_filename.startswith(here)):
        frame = frame.f_back
    return frame is not None and not frame.f_code.co_filename.startswith(os.path.dirname(torch.__file__))


class _DataShape(tuple):
    """``x.shape`` of a tensor one of whose dims the data decide (dim 0 of ``x[mask]`` or ``nonzero``, dim 1 of
    ``x[mask].T``), as the user's code gets it while the step is traced: reading that dim into Python
    (``x[mask].shape[0]`` as a divisor, unpacking ``n, d =``) marks it as read (:func:`mark_size_read`), so each step
    checks it; ``x[mask].shape[1]`` does not (the count may change freely). It was frozen at its traced value
    without a check (found in review). A tuple with torch.Size's ``numel``; torch's functions take it as a size."""

    def __new__(cls, size: torch.Size, tensor: torch.Tensor, data_dim: int = 0) -> "_DataShape":
        shape = super().__new__(cls, size)
        shape._tensor, shape._data_dim = tensor, data_dim
        return shape

    def _read(self) -> None:
        mark_size_read(self._tensor)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            if self._data_dim in range(len(self))[index]:
                self._read()
            return torch.Size(tuple.__getitem__(self, index))
        if operator.index(index) % len(self) == self._data_dim:
            self._read()
        return tuple.__getitem__(self, index)

    def __iter__(self) -> Any:
        self._read()
        return tuple.__iter__(self)

    def __eq__(self, other: object) -> bool:
        self._read()
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._read()
        return tuple.__ne__(self, other)

    __hash__ = tuple.__hash__

    def numel(self) -> int:
        """The number of elements, as ``torch.Size.numel`` (reads dim 0)."""
        self._read()
        return torch.Size(self).numel()

    def __repr__(self) -> str:
        return f"torch.Size({list(tuple.__iter__(self))})"

    def __reduce__(self) -> tuple:  # copy, deepcopy and pickle give a torch.Size
        return torch.Size, (tuple(tuple.__iter__(self)),)


def mark_size_read(t: torch.Tensor) -> None:
    """Marks the traced node of ``t`` (a tensor whose size depends on the data) as having its size read into Python
    (``x[mask].shape[0]``, ``.size(0)``, ``.numel()``): whatever the int became (a divisor, a shape) is a constant of
    the step graph, so the step checks that each batch gives ``t`` its traced size (``functionalize``, step 4)."""
    node = _data_dependent_origin(_traced_node(t))
    if node is not None:
        node.meta["custom"] = {**node.meta.get("custom", {}), SIZE_READ: True}


def _data_dependent_origin(node: Any, depth: int = 12) -> Any:
    """The op whose output size the data decide (tagged ``dynamic_output_shape``) that ``node`` computes from, the
    nearest first (``node`` itself; the op of a ``unique`` output; ``nonzero`` under ``squeeze``), or None."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        following = []
        for n in frontier:
            if n is None or n in seen or getattr(n, "op", None) != "call_function":
                continue
            seen.add(n)
            if torch.Tag.dynamic_output_shape in getattr(n.target, "tags", ()):
                return n
            following += [a for a in n.all_input_nodes]
        frontier = following
    return None


def _traced_node(t: torch.Tensor) -> Any:
    """The node of the graph being traced that computed ``t`` (under ``torch.func.grad``'s wrappers), or None."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot, has_proxy_slot

    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    mode = get_proxy_mode()
    if mode is None or not has_proxy_slot(t, mode.tracer):
        return None
    return get_proxy_slot(t, mode.tracer).proxy.node


def _is_masked_fill(*args: Any) -> bool:
    """Whether ``tensor.__setitem__(*args)`` is ``tensor[mask] = value`` with a boolean mask of the tensor's shape
    and one value (a number or a 0-dim tensor)."""
    if len(args) != 3 or not isinstance(args[0], torch.Tensor) or not isinstance(args[1], torch.Tensor):
        return False
    target, mask, value = args
    one_value = isinstance(value, (int, float, bool)) or (isinstance(value, torch.Tensor) and value.dim() == 0)
    return mask.dtype == torch.bool and mask.shape == target.shape and one_value


def _traced(t: torch.Tensor, inputs: frozenset[int]) -> bool:
    """Whether ``t`` depends on the step's data: the batch and meta inputs (placeholders) or the tensors it
    lifts into inputs (``inputs``: ids of the parameter, buffer, state and hyperparameter copies). A tensor
    built from constants alone (``torch.arange(n)``, a closed-over tensor) has the same values every step."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    start = _traced_node(t)
    if start is None:
        return False
    root = get_proxy_mode().tracer.root
    todo, seen = [start], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return True
        if node.op == "get_attr" and id(getattr(root, str(node.target), None)) in inputs:
            return True
        todo.extend(node.all_input_nodes)
    return False


def _refuse_data_read(what: str) -> None:
    # Raised inside the user's call, so that CaptureError.from_trace_failure names their line ("data-dependent"
    # selects its hint).
    raise RuntimeError(f"data-dependent read: {what}")


class CompositeWeightNorm(torch.overrides.TorchFunctionMode):
    """While active, ``torch._weight_norm`` (``weight_norm``'s hook and parametrization) computes torch's
    composite formula instead of the fused kernel, whose double backward is wrong (see :func:`_weight_norm`):
    for code that runs eagerly under a meta-gradient, like ``unrollc.higher``'s functional module."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            return _weight_norm(*args, **kwargs)[0]
        return func(*args, **kwargs)


DECOMPOSITIONS = {
    torch.ops.aten.native_batch_norm.default: _batch_norm,
    torch.ops.aten._weight_norm_interface.default: _weight_norm,
}
