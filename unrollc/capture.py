"""Capture: trace ONE training step — forward, loss, gradient and the real ``torch.optim`` step — with make_fx.

The traced function closes over private copies of the parameters, buffers, optimizer state and
hyperparameters; ``make_fx`` records them as ``get_attr`` constants (the *raw* graph, which the
``lift_inputs`` pass turns into placeholders). Only the batch and the ``*meta`` inputs are traced as
placeholders from the start. Inside the traced function:

1. the model runs with explicit weights (``_reparametrize_module``: the user's ``loss_fn`` calls the
   model as usual, submodules included) under ``torch.func.grad_and_value``, which differentiates the
   loss with respect to the trainable parameters;
2. a fresh optimizer of the user's class is built around the parameter copies, their ``.grad`` set to
   the traced gradients, its state and hyperparameters set to the copies, and its real ``step()`` runs
   with ``torch.compiler.is_compiling()`` reporting True (so ``torch.optim`` keeps step counts and
   tensor hyperparameters as tensors instead of calling ``.item()``) and with a
   :class:`~unrollc.guards.ScalarTracker` recording every Python value it reads from them;
3. the function returns the updated parameters, buffers, every optimizer-state tensor and the loss.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import random
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten

from .errors import CaptureError, user_stacklevel
from .guards import Guard, ScalarTracker
from .optimizer_spec import OptimizerSpec, option_key, own_attributes
from .reparam import reparametrized
from .traced_functions import DECOMPOSITIONS, TracedFunctions, sdpa_math

__all__ = ["Role", "Signature", "Captured", "capture_step", "NodeInfo", "DETACH_OPS", "NoGradRegions", "ShadowOptimizer", "fill_leaves", "input_layout", "stops_gradient"]


@dataclass(frozen=True)
class NodeInfo:
    """What unrollc knows about a graph input, stored under ``node.meta["unrollc"]``.

    Attributes:
        role: one of ``"param"``, ``"buffer"``, ``"opt_state"``, ``"hyper"``, ``"batch"``, ``"meta"``.
        name: the user-facing name: ``"fc.weight"``, ``"fc.weight.exp_avg"``, ``"lr"``, ``"batch[0]"``.
    """

    role: str
    name: str


Role = str


@dataclass(frozen=True)
class Signature:
    """The flat input and output layout of a step graph.

    Inputs: ``params, buffers, opt_state (in), hyper, batch leaves, meta leaves``.
    Outputs: ``params', buffers', opt_state (out), loss``. The optimizer state's keys may differ between
    input and output: a fresh optimizer has no state before its first step.
    """

    params: tuple[str, ...]
    buffers: tuple[str, ...]
    state_in: tuple[tuple[str, str], ...]
    state_out: tuple[tuple[str, str], ...]
    hyper: tuple[str, ...]
    batch_spec: TreeSpec
    n_batch: int
    meta_spec: TreeSpec
    n_meta: int

    @property
    def input_infos(self) -> list[NodeInfo]:
        """One :class:`NodeInfo` per graph input, in order."""
        infos = [NodeInfo("param", n) for n in self.params]
        infos += [NodeInfo("buffer", n) for n in self.buffers]
        infos += [NodeInfo("opt_state", f"{p}.{k}") for p, k in self.state_in]
        infos += [NodeInfo("hyper", n) for n in self.hyper]
        infos += [NodeInfo("batch", f"batch[{i}]") for i in range(self.n_batch)]
        infos += [NodeInfo("meta", f"meta[{i}]") for i in range(self.n_meta)]
        return infos

    @property
    def n_inputs(self) -> int:
        return len(self.params) + len(self.buffers) + len(self.state_in) + len(self.hyper) + self.n_batch + self.n_meta


@dataclass
class Captured:
    """The raw traced graph and what is needed to lift and check it."""

    gm: fx.GraphModule
    signature: Signature
    guards: list[Guard]
    constants: dict[int, int] = field(default_factory=dict)  # id(constant tensor) -> input position
    example_inputs: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def _compiling() -> Iterator[None]:
    """Make ``torch.compiler.is_compiling()`` report True while the optimizer step is traced."""
    original = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.compiler.is_compiling = original


class _DataAssignments(torch.overrides.TorchFunctionMode):
    """While the optimizer step is traced: ``p.data = new`` (old hand-written optimizers:
    ``p.data = p.data - lr * p.grad.data``) becomes ``p.copy_(new)`` without gradient, the same values in the same
    tensor. The assignment itself swaps the tensor's memory outside the dispatcher, so no op of the step graph
    recorded it, and every step left the weights unchanged (found in review). A new shape, dtype or device is
    refused with the fix."""

    _SET_DATA = torch.Tensor.data.__set__

    def __init__(self, api: str) -> None:
        super().__init__()
        self.api = api

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func != self._SET_DATA or len(args) != 2 or not all(isinstance(a, torch.Tensor) for a in args):
            return func(*args, **kwargs)
        tensor, new = args
        if (new.shape, new.dtype, new.device) != (tensor.shape, tensor.dtype, tensor.device):
            raise CaptureError(
                f"{self.api}: the optimizer's step() assigns `.data` of a {tuple(tensor.shape)} {tensor.dtype} tensor "
                f"a {tuple(new.shape)} {new.dtype} tensor on {new.device}; a step graph updates its tensors in "
                "place. Write the new values into the tensor instead: p.copy_(new) under torch.no_grad()."
            )
        with torch.no_grad():
            tensor.copy_(new)
        return None


class _AveragesAsEager(torch.overrides.TorchFunctionMode):
    """ASGD is traced through its capturable path (``optimizer_spec._CAPTURABLE_ONLY``), whose average is
    ``ax.add_(param.sub(ax).mul_(mu))`` at every step; eager's single-tensor path copies ``ax.copy_(param)`` while
    ``mu`` is 1 (until step ``t0``, 1e6 by default). The sum rounds, so ``ax`` drifted from eager's by an ulp. While
    the step is traced, that ``add_`` becomes ``ax.copy_(where(mu == 1, param, ax + delta))``: eager's values on
    both sides of ``t0`` without a guard on ``mu``, and the same derivative (1 to ``param`` while ``mu`` is 1)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.active = isinstance(optimizer, torch.optim.ASGD) and any(g.get("capturable") for g in optimizer.param_groups)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if self.active and func is torch.Tensor.add_ and len(args) == 2 and not kwargs:
            for param, st in self.optimizer.state.items():
                if st.get("ax") is args[0] and isinstance(st.get("mu"), torch.Tensor):
                    ax, mu = args[0], st["mu"]
                    return ax.copy_(torch.where(mu == 1, param, ax + args[1]))
        return func(*args, **kwargs)


def hyper_leaves(hyper: Sequence[dict[str, Any]], single_group: bool) -> list[tuple[str, torch.Tensor]]:
    """Flatten per-group hyperparameters to ``(name, tensor)`` leaves: ``lr``, ``betas.0``, or ``1.lr``."""
    out = []
    for g, group in enumerate(hyper):
        prefix = "" if single_group else f"{g}."
        for key in sorted(group):
            value = group[key]
            if isinstance(value, tuple):
                out += [(f"{prefix}{key}.{i}", v) for i, v in enumerate(value)]
            else:
                out.append((f"{prefix}{key}", value))
    return out


def state_number_tensor(value: Any) -> torch.Tensor | None:
    """A number (Python or numpy, not a bool) kept in optimizer state as the 0-dim float64 tensor the step graph
    carries (a Python number's precision); None for anything else."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    return None


class ShadowOptimizer:
    """A fresh optimizer of the user's class around private copies of the parameters, optimizer state and
    hyperparameters, whose real ``step()`` is traced: shared by :func:`capture_step` (a whole training step)
    and :class:`unrollc.update.CompiledUpdate` (the update alone, gradients as inputs).

    The copies are closed over by the traced function, so ``make_fx`` records them as constants; their
    positions in the lifted input list are given by :meth:`constants` (see ``passes.lift_inputs``).
    Every Python value ``step()`` reads from a hyperparameter or a 0-dim state tensor is recorded as a
    :class:`~unrollc.guards.Guard` by :attr:`tracker`.

    Args:
        spec: the optimizer's class, parameter names per group and static options.
        params: parameters by name (the ones ``spec`` names, and possibly others that are only carried).
        opt_state: optimizer state by parameter name (empty for a fresh optimizer).
        hyper: per group, the float hyperparameters as 0-dim tensors (or tuples of them).
        api: the entry point named in a :class:`CaptureError` (``unrollc.compile`` or the higher layer).
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        params: Mapping[str, torch.Tensor],
        opt_state: Mapping[str, Mapping[str, torch.Tensor]],
        hyper: Sequence[Mapping[str, Any]],
        api: str = "unrollc.compile",
    ) -> None:
        self.api = api
        self.inputs: frozenset[int] = frozenset()  # ids of the copies lifted into inputs (see capture_step)
        copy = lambda t: t.detach().clone()  # noqa: E731
        learned = frozenset(f"hyper:{n}" for n, t in hyper_leaves(hyper, len(hyper) == 1) if isinstance(t, torch.Tensor) and t.requires_grad)
        _refuse_shared_state(params, opt_state, api)
        self.params = {n: copy(t) for n, t in params.items()}
        self.state = {p: {k: copy(v) for k, v in st.items()} for p, st in opt_state.items()}
        h_copy = [{k: tuple(map(copy, v)) if isinstance(v, tuple) else copy(v) for k, v in g.items()} for g in hyper]
        self.hyper_leaves = hyper_leaves(h_copy, len(h_copy) == 1)
        self.state_in = tuple((p, k) for p in self.state for k in sorted(self.state[p]))
        self.state_out: list[tuple[str, str]] = []  # filled by step()
        # torch.optim's constructors refuse a learning rate that is not one number; a per-element lr
        # (Meta-SGD, from unrollc.higher) is set after construction, where the step broadcasts it.
        scalar = lambda v: v.flatten()[0] if isinstance(v, torch.Tensor) and v.dim() else v  # noqa: E731
        self.optimizer = spec.build(
            [[self.params[n] for n in names] for names in spec.group_params],
            [{k: scalar(v) for k, v in g.items()} for g in h_copy],
        )
        for group, g in zip(self.optimizer.param_groups, h_copy, strict=True):
            # requires_grad selects SGD's tensor-lr path (addcmul_(grad, lr, value=-1)), which broadcasts.
            group.update({k: v.requires_grad_() for k, v in g.items() if isinstance(v, torch.Tensor) and v.dim()})
        for name, st in self.state.items():
            self.optimizer.state[self.params[name]] = dict(st)
        leaves = {f"hyper:{n}": t for n, t in self.hyper_leaves}
        leaves.update({f"state:{p}.{k}": self.state[p][k] for p, k in self.state_in if self.state[p][k].dim() == 0})
        self.tracker = ScalarTracker(leaves, learned)

    def constants(self, after_params: Sequence[torch.Tensor] = ()) -> tuple[dict[int, int], list[torch.Tensor]]:
        """``(id(copy) -> input position, example inputs)`` for the inputs ``params, *after_params, opt_state,
        hyper``, the order of both signatures."""
        ordered = list(self.params.values()) + list(after_params)
        ordered += [self.state[p][k] for p, k in self.state_in] + [t for _, t in self.hyper_leaves]
        return {id(t): i for i, t in enumerate(ordered)}, [t.clone() for t in ordered]

    def step(self, grads: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run the optimizer's real ``step()`` with these gradients (parameters without one are skipped, as
        in torch.optim); return the new state tensors in :attr:`state_out` order."""
        for n, p in self.params.items():
            p.grad = grads.get(n)
        before = _python_values(self.optimizer)
        versions = _tensor_versions(before)
        others = self._state_of_no_parameter()
        with _compiling(), self.tracker, _AveragesAsEager(self.optimizer), _detaches_kept(_IN_OPTIMIZER), \
                _DataAssignments(self.api):
            self.optimizer.step()
        after = _python_values(self.optimizer)
        for name, (version, old) in versions.items():  # group["lr"] *= 0.5 on a tensor lr: same tensor, new version
            if name in after and option_key(after[name]) == option_key(before[name]) and _version(after[name]) != version:
                before[name], after[name] = old, _InPlace(after[name])
        self._refuse_python_changes(before, after)
        self._refuse_state_of_no_parameter(others)
        new = {n: self.optimizer.state.get(p, {}) for n, p in self.params.items()}
        for n, st in new.items():
            for k, v in st.items():
                if not isinstance(v, torch.Tensor):
                    st[k] = self._state_tensor(n, k, v)
        self.state_out[:] = [(n, k) for n in new for k in sorted(new[n])]
        return [new[n][k] for n, k in self.state_out]

    def _refuse_python_changes(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """A step that changes a group option or an attribute of the optimizer (``group["lr"] *= 0.5``,
        ``self.k += 1``) would run every later step with the value it had when traced: refused, with the fix."""
        changed = [name for name in before if option_key(after.get(name)) != option_key(before[name])]
        changed += [name for name in after if name not in before]  # g["k"] = g.get("k", 0) + 1: a key made by step()
        if changed:
            name = changed[0]
            was = repr(before[name]) if name in before else "not set"
            raise CaptureError(
                f"{self.api}: {type(self.optimizer).__name__}.step() changes {name} ({was} -> "
                f"{after.get(name)!r}). A step graph carries parameters, buffers and optimizer state from one step "
                "to the next, and takes options and optimizer attributes as they were when it was traced, so the "
                "change would be lost, and every step would use the first value. Keep a value that changes "
                "per step in the per-parameter state as a tensor (self.state[p]['k'] = torch.tensor(...)), or "
                "change the option between steps from outside (a learning-rate schedule: "
                "stepper.init(hyper={'lr': ...}) or an lr tensor in the group)."
            )

    def _state_of_no_parameter(self) -> dict[Any, tuple[Any, int]]:
        """``{key: (value key, tensor versions)}`` of the optimizer state under keys that are not parameters."""
        ids = {id(p) for p in self.params.values()}
        return {k: (option_key(v), _version(v)) for k, v in self.optimizer.state.items() if id(k) not in ids}

    def _refuse_state_of_no_parameter(self, before: dict[Any, tuple[Any, int]]) -> None:
        """``self.state["global"]["t"] += 1``: optimizer state under a key that is not a parameter is not carried
        by the step graph (which carries each parameter's state), so every step would read its first value.
        State there that the step only reads (``self.state["config"]`` set in ``__init__``) is fine."""
        after = self._state_of_no_parameter()
        extra = [k for k in after if before.get(k) != after[k]]
        if extra:
            raise CaptureError(
                f"{self.api}: {type(self.optimizer).__name__}.step() keeps state under {extra[0]!r}, which is not "
                "one of its parameters. A step graph carries each parameter's optimizer state from one step to the "
                "next (self.state[p] for p in the groups' params), so this state would be frozen at its first "
                "value. Keep it in a parameter's state instead, e.g. self.state[group['params'][0]]['t'] as a "
                "tensor, or per parameter as torch.optim does (state['step'])."
            )

    def _state_tensor(self, name: str, key: str, value: Any) -> torch.Tensor:
        """A number a custom optimizer keeps in its state (``state["k"] += 1``) as a float64 tensor (a Python
        number's precision), as ``Stepper.init`` carries a warm optimizer's: the step graph carries the state
        as tensors."""
        if (t := state_number_tensor(value)) is not None:
            return t
        raise CaptureError(
            f"{self.api}: {type(self.optimizer).__name__}.step() stored {key!r} = {value!r} "
            f"({type(value).__name__}) in the state of parameter {name!r}; the step graph carries optimizer "
            "state as tensors (numbers become float64 tensors), so this value would be frozen at what it was "
            f"when traced. Store it as a tensor, e.g. state[{key!r}] = torch.tensor(...), or keep it in the "
            "parameter group (param_groups entries are hyperparameters and static options)."
        )

    def trace(self, fn: Callable[..., list[torch.Tensor]], inputs: Sequence[torch.Tensor], decompositions: Mapping | None = None) -> fx.GraphModule:
        """``make_fx(fn)(*inputs)``; a failure becomes a :class:`CaptureError` naming the user's (or the
        optimizer's) line, with torch's own exception on ``.trace_failure``."""
        try:
            with _saved_tensors_hooks_suspended(), _warn_if_python_randomness_drawn(self.api):
                with TracedFunctions(self.inputs), _values_in_one_fake_mode():
                    return make_fx(fn, decompositions, record_stack_traces=True)(*inputs)
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the user's line
            if CaptureError.raised_by_user_code(exc):  # the user's own bug (a KeyError in their optimizer's step)
                exc.add_note(f"unrollc: raised by your code while {self.api} traced the training step.")
                raise
            error = CaptureError.from_trace_failure(exc, self.api)
            error.trace_failure = exc  # torch's own traceback, for debugging unrollc itself
            raise error from None
        finally:
            for p in self.params.values():
                p.grad = None


@functools.cache
def fake_mode() -> FakeTensorMode:
    """The fake-tensor mode of the values (``node.meta["val"]``) that tracing records, and of the stand-ins
    :func:`~unrollc.passes.release_examples` puts in place of real tensors: one for the process, holding no
    stack (a ``FakeTensorMode`` keeps the stack it was made in, 5 KB)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode._stack_trace = traceback.StackSummary()
    return mode


@contextlib.contextmanager
def _values_in_one_fake_mode() -> Iterator[None]:
    """Let ``make_fx``'s real-tensor trace record every node's value in :func:`fake_mode`. Left to itself it makes
    a new ``FakeTensorMode`` per node, whose stack extraction was a quarter of the time of a trace (1.6 instead of
    2.2 s of CPU for 50 parameter tensors); it looks for a mode in the tracing context first."""
    with tracing(TracingContext(fake_mode())):
        yield


@contextlib.contextmanager
def _warn_if_python_randomness_drawn(api: str) -> Iterator[None]:
    """Warn when tracing drew from Python's ``random`` or numpy's global generator (mixup's ``np.random.beta``,
    ``if random.random() < p`` augmentation): the value drawn while tracing becomes a constant of the step graph,
    replayed by every step, where eager training draws anew each step (found in review). torch's random ops are
    traced as ops and draw every step. Generators the user holds (``np.random.default_rng()``) are not seen. A
    diagnostic only: a state it cannot read is skipped, never a failed capture."""
    before = _generator_states()
    yield
    after = _generator_states()
    drawn = [name for name, state in before.items() if name in after and not _same_state(state, after[name])]
    if drawn:
        warnings.warn(
            f"{api}: tracing the training step drew from {' and '.join(drawn)}. Such a draw runs once, while the "
            "step is traced; its value is a constant of the step graph that every step replays, where eager training "
            "draws anew each step. Draw with torch instead (`torch.rand(())`, "
            "`torch.distributions.Gamma(a, 1.0).sample()`, `torch.randperm`), which every step draws as eager "
            "PyTorch does under the same seed.",
            UserWarning, stacklevel=user_stacklevel(),
        )


def _generator_states() -> dict[str, Any]:
    states: dict[str, Any] = {"Python's `random`": random.getstate()}
    numpy = sys.modules.get("numpy")  # only if the user's code imported it
    if numpy is not None:
        try:  # legacy=False: a dict for any bit generator (set_bit_generator(PCG64(...)) included)
            states["numpy's global generator (`np.random`)"] = numpy.random.get_state(legacy=False)
        except Exception:  # noqa: BLE001 - an old or unusual numpy: no check
            pass
    return states


def _same_state(a: Any, b: Any) -> bool:
    """Equality of generator states: nested dicts, tuples and numpy arrays."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "shape") and hasattr(b, "shape"):  # numpy arrays
        return a.shape == b.shape and bool((a == b).all())
    return bool(a == b)


def _python_values(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The group options (``param_groups[0]['lr']``) and the subclass's own attributes (``self.k``) of ``opt``, by
    a readable name; tensors are compared by identity (see :func:`option_key`), so in-place updates do not count."""
    values = {f"param_groups[{i}][{k!r}]": v for i, g in enumerate(opt.param_groups) for k, v in g.items() if k != "params"}
    values.update({f"self.{k}": v for k, v in own_attributes(opt).items()})
    return values


def _version(value: Any) -> int:
    """The summed version counters of the tensors in an option or attribute value (``betas``: a tuple)."""
    return sum(t._version for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def _tensor_versions(values: dict[str, Any]) -> dict[str, tuple[int, Any]]:
    """``(version counter, copy of the value)`` of the :func:`_python_values` entries that hold tensors, by the same
    names: a tensor ``lr`` that ``step()`` scales in place (``group["lr"] *= 0.5``) keeps its identity, not its
    version."""
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    def copy(x: Any) -> Any:
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    with disable_proxy_modes_tracing():  # the copies are for the message only, not ops of the step graph
        return {name: (_version(value), tree_map(copy, value)) for name, value in values.items()
                if any(isinstance(t, torch.Tensor) for t in tree_leaves(value))}


class _InPlace:
    """A value changed in place, for :meth:`ShadowOptimizer._refuse_python_changes`'s message."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{self.value!r}, in place"


T = TypeVar("T")


class NoGradRegions(torch.overrides.TorchFunctionMode):
    """While the model and ``loss_fn`` are traced: the results of ops run with grad disabled (a
    ``torch.no_grad()`` block, e.g. spectral_norm's power iteration) are detached in the graph.

    Eager autograd treats them as constants. ``torch.func`` honours the block in the traced inner gradient,
    but the recorded ops carry no trace of it: when the step graph is differentiated again (the meta-gradient),
    autograd would differentiate through them. The ``detach`` nodes added here are kept by ``strip_detach``
    (see :func:`stops_gradient`). A result that *is* one of the op's arguments (``h.contiguous()``,
    ``h.to(h.dtype)``) is left alone: eager returns the tensor itself, gradient and all. An in-place write into a
    tensor that requires grad (``self.weight.clamp_(-c, c)`` in the forward) changes its values and not its
    gradient in eager autograd; here the write becomes ``t.copy_(detach(op(detach(t))) + (t - detach(t)))``: the
    same values, and an identity gradient to ``t`` (the meta-gradient went through the op, e.g. clamp's mask).
    Other in-place ops are left alone (their operands already carry the detach).

    Not covered: a ``torch.func`` transform called inside the block (its body runs with grad enabled); detach
    its result yourself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if (not torch.is_grad_enabled() and _in_place(func) and args and isinstance(args[0], torch.Tensor)
                and args[0].requires_grad and getattr(func, "__name__", "") not in _NOT_VALUE_WRITES):
            return _write_without_gradient(func, args, kwargs)
        out = func(*args, **kwargs)
        if func in _NOT_DIFFERENTIABLE:
            return _stop_gradient(out, set())
        if torch.is_grad_enabled() or _in_place(func):
            return out
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        return _stop_gradient(out, inputs)


# Functions whose result eager autograd never connects to their tensor argument, but whose ATen op, called as the
# step graph calls it, returns a tensor that requires grad with a NotImplemented derivative when the argument
# requires grad (torch 2.13: ``aten.randint_like.*``; the other ``*_like`` factories are fine): detached in the graph.
_NOT_DIFFERENTIABLE = frozenset({torch.randint_like})


# In-place methods that change a tensor's autograd flags, shape or storage rather than its values: left as they are.
_NOT_VALUE_WRITES = frozenset({"requires_grad_", "detach_", "retain_grad", "resize_", "resize_as_", "set_", "share_memory_",
                               "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_", "swapdims_", "swapaxes_"})


def _write_without_gradient(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)``, an in-place write into ``args[0]`` under no_grad, with eager autograd's meaning:
    new values, the old gradient path (see :class:`NoGradRegions`). Returns what ``func`` returns, with
    ``args[0]`` in place of the tensor written (``t.clamp_(...)`` returns ``t``)."""
    target = args[0]
    frozen = _stop_gradient(target, set())
    work = frozen.clone()
    out = func(work, *args[1:], **kwargs)
    target.copy_(_stop_gradient(work, set()) + (target - frozen))
    return target if out is work else out


def _in_place(func: Any) -> bool:
    """``add_``, ``copy_``, ``__setitem__``, ``__iadd__``: ops that write into an argument and return it (not
    ``__getitem__``, ``__rsub__`` or a property's ``__get__``, whose names also end in ``_``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        return name == "__setitem__" or (name.startswith("__i") and name not in ("__init__", "__index__", "__int__", "__invert__", "__iter__"))
    return name.endswith("_")


DETACH_OPS = frozenset({torch.ops.aten.detach.default, torch.ops.aten.alias.default})  # what .detach() records
# node.meta["custom"]["unrollc"] of a detach that strip_detach keeps (passes that re-trace keep "custom", fx's
# _COPY_META_FIELDS): one NoGradRegions added for a no-grad block, or one the user's grad_callback wrote.
_NO_GRAD, _IN_CALLBACK, _IN_OPTIMIZER = "no_grad block", "grad_callback", "optimizer step"


def _keep(node: fx.Node, why: str) -> None:
    node.meta["custom"] = {**node.meta.get("custom", {}), "unrollc": why}


def _stop_gradient(out: Any, inputs: set[int]) -> Any:
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    from torch.utils._pytree import tree_map_only

    mode = get_proxy_mode()

    def detach(t: torch.Tensor) -> torch.Tensor:
        if id(t) in inputs:  # the op returned its argument itself: eager keeps its gradient
            return t
        d = t.detach()  # the mode is off inside its own handler: no recursion
        if mode is not None:  # mark the node make_fx just recorded, so that strip_detach keeps it
            node = next(iter(reversed(mode.tracer.graph.nodes)), None)
            if node is not None and node.target in DETACH_OPS:
                _keep(node, _NO_GRAD)
        return d

    return tree_map_only(torch.Tensor, detach, out)


@contextlib.contextmanager
def _detaches_kept(why: str = _IN_CALLBACK) -> Iterator[None]:
    """Mark every ``detach`` make_fx records in the body: for ``strip_detach`` to keep (``_IN_CALLBACK``) or to
    remove (``_IN_OPTIMIZER``), whichever file the code is in.

    For ``grad_callback``: it runs after the inner gradient, so no detach in it comes from autograd, and
    ``g.detach()`` there is first-order MAML. ``strip_detach`` also keeps a detach whose innermost recorded
    frame is the user's, but make_fx records only the frames :func:`~unrollc.inspect.source.recording_sources`
    anchors; a callback written in another file than ``loss_fn`` would lose its detaches without this mark.

    For the optimizer's ``step()``: its detaches are removed, as torch.optim's own are (``torch.clone(grad).detach()``,
    ``p.data``/``p.grad.data`` in a hand-written optimizer, lucidrains' Lion, transformers' AdamW): they keep eager
    training from building a graph, and the meta-gradient goes through the update. A user's optimizer counts as
    the user's code by its file, and its detaches cut the meta-gradient silently before (found in review)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None:
        yield
        return
    graph = mode.tracer.graph
    before = len(graph.nodes)
    yield
    for node in list(graph.nodes)[before:]:  # make_fx appends what the body records
        if node.op == "call_function" and node.target in DETACH_OPS:
            _keep(node, why)


def keep_stop_gradient(node: fx.Node) -> None:
    """Mark a ``detach`` a pass adds for a no-grad region, so that ``strip_detach`` keeps it (see :func:`stops_gradient`)."""
    _keep(node, _NO_GRAD)


def in_optimizer_step(node: fx.Node) -> bool:
    """Whether ``node`` is a ``detach`` traced in the optimizer's ``step()``, which ``strip_detach`` removes."""
    return node.meta.get("custom", {}).get("unrollc") == _IN_OPTIMIZER


def stops_gradient(node: fx.Node) -> bool:
    """Whether ``node`` is a ``detach`` the user asked for that :func:`~unrollc.passes.strip_detach` must keep:
    one :class:`NoGradRegions` added for a no-grad block, or one traced in the user's ``grad_callback``."""
    return node.meta.get("custom", {}).get("unrollc") in (_NO_GRAD, _IN_CALLBACK)


@contextlib.contextmanager
def _saved_tensors_hooks_suspended() -> Iterator[None]:
    """Run the body without the user's ``torch.autograd.graph.saved_tensors_hooks`` (restored afterwards).

    Tracing differentiates the loss with ``torch.func``, which refuses to run under saved-tensor hooks; the
    hooks would only see tracing's throw-away tensors anyway. The steps that run the traced graph, under the
    same hooks, are seen by them as usual."""
    autograd = torch._C._autograd
    top, pop, push = (getattr(autograd, f"_{n}_saved_tensors_default_hooks", None) for n in ("top", "pop", "push"))
    if top is None or pop is None or push is None:  # a torch without these internals: leave the hooks alone
        yield
        return
    suspended = []
    while (hooks := top(False)) is not None:
        suspended.append(hooks)
        pop()
    try:
        yield
    finally:
        for pack, unpack in reversed(suspended):
            push(pack, unpack)


def trace_with_fallbacks(spec: OptimizerSpec, trace: Callable[[OptimizerSpec], T]) -> tuple[T, OptimizerSpec]:
    """``trace(spec)``, retried with the variants of the optimizer that torch.optim's code needs:
    ``capturable=True`` when its foreach path refuses tensor hyperparameters, and its source rewritten
    (:mod:`unrollc.rewrite`) when it reads data into Python (Adafactor's ``param.norm().item()``).
    Returns the result and the spec that traced, which later traces should start from."""
    while True:
        try:
            return trace(spec), spec
        except CaptureError as error:
            if "capturable=False" in str(error) and not spec.capturable:
                spec = spec.with_capturable()
            elif error.in_optimizer and not spec.rewritten:
                spec = spec.with_rewritten_branches()
            else:
                raise


def capture_step(
    model: nn.Module,
    spec: OptimizerSpec,
    loss_fn: Callable[..., torch.Tensor],
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    opt_state: dict[str, dict[str, torch.Tensor]],
    hyper: list[dict[str, Any]],
    batch: Any,
    meta: tuple[Any, ...],
    trainable: frozenset[str],
    grad_callback: Callable[..., Mapping[str, torch.Tensor]] | None = None,
) -> Captured:
    """Trace one step for these example values (which are copied, never modified); ``grad_callback(grads, *meta)``,
    if given, transforms the gradients before the optimizer's step (see :func:`unrollc.compile`)."""
    shadow = ShadowOptimizer(spec, params, opt_state, hyper)
    b_copy = {n: t.detach().clone() for n, t in buffers.items()}

    batch_all, batch_spec = tree_flatten(batch)
    meta_all, meta_spec = tree_flatten(tuple(meta))
    batch_leaves = [x.detach() for x in batch_all if isinstance(x, torch.Tensor)]
    meta_leaves = [x.detach() for x in meta_all if isinstance(x, torch.Tensor)]
    n_batch, n_meta = len(batch_leaves), len(meta_leaves)
    constants, example_inputs = shadow.constants(after_params=list(b_copy.values()))
    example_inputs += batch_leaves + meta_leaves
    p_copy = shadow.params
    diff_names = [n for n in p_copy if n in trainable]

    def step(*leaves: Any) -> list[torch.Tensor]:
        b = tree_unflatten(fill_leaves(batch_all, leaves[:n_batch]), batch_spec)
        m = tree_unflatten(fill_leaves(meta_all, leaves[n_batch:]), meta_spec)

        def loss_of(diff: dict[str, torch.Tensor], bufs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            weights = {**p_copy, **diff, **bufs}
            with reparametrized(model, weights), NoGradRegions():
                loss = loss_fn(model, b, *m)
                # a buffer the forward re-assigned (self.ema = 0.9 * self.ema + ...) instead of updating it in
                # place: its new value is the step's output for it, as in eager training
                reassigned = {n: model.get_buffer(n) for n in bufs if model.get_buffer(n) is not bufs[n]}
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise CaptureError(
                    "unrollc.compile: loss_fn(model, batch, *meta) must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; "
                    "reduce it, e.g. with .mean()."
                )
            return loss.reshape(()), reassigned

        with sdpa_math():
            grads, (loss, reassigned) = torch.func.grad_and_value(loss_of, has_aux=True)(
                {n: p_copy[n] for n in diff_names}, b_copy
            )
        grads = _run_gradient_hooks(model, _distinct(grads))
        if grad_callback is not None:  # reading the model's weights (adaptive clipping) reads this step's
            with reparametrized(model, {**p_copy, **b_copy, **reassigned}):
                grads = _call_grad_callback(grad_callback, grads, m)
        with reparametrized(model, {**p_copy, **b_copy, **reassigned}):  # optimizer step hooks may read the model
            new_state = shadow.step(grads)
        new_buffers = [reassigned.get(n, t) for n, t in b_copy.items()]
        return list(p_copy.values()) + new_buffers + new_state + [loss]

    shadow.inputs = frozenset(constants)  # the lifted copies: reading their values into Python reads data
    gm = shadow.trace(step, batch_leaves + meta_leaves, DECOMPOSITIONS)

    signature = Signature(
        params=tuple(p_copy),
        buffers=tuple(b_copy),
        state_in=shadow.state_in,
        state_out=tuple(shadow.state_out),
        hyper=tuple(n for n, _ in shadow.hyper_leaves),
        batch_spec=batch_spec,
        n_batch=n_batch,
        meta_spec=meta_spec,
        n_meta=n_meta,
    )
    return Captured(gm, signature, list(shadow.tracker.guards), constants, example_inputs)


def _run_gradient_hooks(model: nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters' ``Tensor.register_hook`` hooks applied to their gradients, in registration order, as eager
    ``loss.backward()`` applies them to a leaf's gradient before accumulating it (a hook returning None keeps the
    gradient). Traced: a hook's tensor ops are in the step graph; its Python side effects (logging) happen once."""
    out = dict(grads)
    for n, g in grads.items():
        hooks = model.get_parameter(n)._backward_hooks
        for hook in (hooks or {}).values():
            with NoGradRegions(), _detaches_kept():
                new = hook(g)
            if new is not None:
                if not isinstance(new, torch.Tensor) or new.shape != g.shape:
                    raise CaptureError(
                        f"unrollc.compile: a gradient hook of parameter {n!r} ({getattr(hook, '__qualname__', hook)}) "
                        f"returned {type(new).__name__ if not isinstance(new, torch.Tensor) else tuple(new.shape)}, "
                        f"expected None or a tensor of the gradient's shape {tuple(g.shape)}."
                    )
                g = new
        out[n] = g
    return out


def _call_grad_callback(
    callback: Callable[..., Mapping[str, torch.Tensor]], grads: dict[str, torch.Tensor], meta: tuple[Any, ...]
) -> dict[str, torch.Tensor]:
    """``callback(grads, *meta)``, traced like the loss (a ``torch.no_grad()`` block in it is a constant for the
    meta-gradient), its result checked: a gradient of the same shape for every parameter it was given."""
    with NoGradRegions(), _detaches_kept():
        out = callback(dict(grads), *meta)
    name = getattr(callback, "__qualname__", type(callback).__name__)
    if not isinstance(out, Mapping) or set(out) != set(grads):
        got = f"a mapping with keys {sorted(out)}" if isinstance(out, Mapping) else type(out).__name__
        raise CaptureError(
            f"unrollc.compile: grad_callback {name}(grads, *meta) must return a mapping from the same parameter names "
            f"to gradients, {sorted(grads)}, got {got}; return e.g. {{name: g * scale for name, g in grads.items()}}."
        )
    for n, g in grads.items():
        new = out[n]
        if not isinstance(new, torch.Tensor) or new.shape != g.shape or new.dtype != g.dtype:
            got = f"a tensor of shape {tuple(new.shape)} and dtype {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
            raise CaptureError(
                f"unrollc.compile: grad_callback {name}(grads, *meta) returned {got} for {n!r}, whose gradient has shape "
                f"{tuple(g.shape)} and dtype {g.dtype}; return a gradient of the parameter's shape and dtype."
            )
    return {n: out[n] for n in grads}


def _refuse_shared_state(params: Mapping[str, torch.Tensor], opt_state: Mapping[str, Mapping[str, Any]], api: str) -> None:
    """One parameter's optimizer state entries sharing memory with each other or with the parameter
    (``st["b"] = st["a"]``, ``st["anchor"] = p``, two rows of one tensor): each is its own input of a step graph, so
    a write into one would not reach the other from the second step on (found in review: 0.13-0.38 off eager,
    silently). The first step, which makes them, is traced with the sharing; refused from there."""
    for name, st in opt_state.items():
        seen: dict[tuple, str] = {}
        entries = [(f"state[{k!r}]", v) for k, v in st.items()] + [("the parameter itself", params.get(name))]
        for label, t in entries:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
                continue
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # a tensor without storage (a wrapper): nothing to compare
                continue
            if not ptr:
                continue
            if (t.device, ptr) in seen:
                raise CaptureError(
                    f"{api}: the optimizer's state of parameter {name!r} keeps {seen[(t.device, ptr)]} and {label} in "
                    "the same memory (the same tensor, or views of one). A step graph carries each state entry as its "
                    "own tensor, so from the second step on a write into one would not reach the other. Keep each "
                    "entry its own tensor (one key, or a .clone()), and read the parameter from the group's params."
                )
            seen[(t.device, ptr)] = label


def _distinct(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``grads`` with one tensor per parameter: autograd may hand two parameters one gradient tensor
    (``y = x * (a + b)``), where eager ``backward()`` gives each its own ``.grad``, so that an optimizer or
    ``grad_callback`` writing into one gradient in place must not change the other's (found in review: 0.08 off
    eager with weight decay added into ``p.grad`` in place)."""
    seen: set[int] = set()
    out = {}
    for name, g in grads.items():
        out[name] = g.clone() if id(g) in seen else g
        seen.add(id(g))
    return out


def fill_leaves(template: list[Any], tensors: Sequence[torch.Tensor]) -> list[Any]:
    """``template`` with its tensor leaves replaced, in order, by ``tensors`` (other leaves kept)."""
    it = iter(tensors)
    return [next(it) if isinstance(x, torch.Tensor) else x for x in template]


def input_layout(x: Any) -> Any:
    """What a traced graph assumes about an input: shape, strides, dtype and device of a tensor, else its
    value (a graph traced on a contiguous batch may ``view`` it, which a channels_last batch cannot take)."""
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.device)  # a torch.Size is a tuple: equal to and hashed as one
    return ("value", x)
