"""A frozen description of the user's optimizer: its class, options per group, and its state by name.

unrollc never steps the user's optimizer. It reads the class and the options of every parameter group,
splits the options into *hyperparameters* (floats, which become tensor inputs of the step graph) and
*static options* (bools, ints, strings, None, which select code paths and are part of the trace key),
and rebuilds a private optimizer of the same class around traced tensors when it captures a step.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["OptimizerSpec", "UnsupportedOptimizerError", "is_hyper_value", "own_attributes"]

_REFUSED = {
    "LBFGS": "re-evaluates the loss inside step() through a closure, which cannot be captured as one "
    "step graph; use an optimizer without a closure, e.g. torch.optim.Adam",
    "SparseAdam": "needs sparse gradients, and the step graph differentiates dense tensors only; "
    "use torch.optim.Adam or torch.optim.AdamW",
}


# Optimizers whose non-capturable path reads a value that changes every step with .item() (ASGD's
# ``mu.item() != 1``), which would pin a guard to one step; their capturable path is branch-free.
_CAPTURABLE_ONLY = frozenset({"ASGD"})

# Optimizers whose capturable path selects with torch.where between a branch and a value that is NaN where
# the branch is not taken (RAdam's rectification term before step 5): the NaN reaches the meta-gradient
# through where's backward. Their non-capturable path computes the same numbers with a Python branch,
# which a guard handles exactly, so a user's capturable=True is traced as capturable=False.
_NOT_CAPTURABLE = frozenset({"RAdam"})


class UnsupportedOptimizerError(TypeError, ValueError):
    """The optimizer cannot be captured as one differentiable step graph (a ``TypeError``, and a ``ValueError``
    as ``higher`` raises for an optimizer it does not support)."""


def is_hyper_value(value: Any) -> bool:
    """A group option that becomes a differentiable hyperparameter: a number (``momentum=0`` is an int in
    torch's signatures, and a user may learn it), a 0-dim float tensor, or a tuple of those (``betas``).
    Booleans, strings and None are static options."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (float, int)):
        return True
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and value.is_floating_point()
    if isinstance(value, tuple) and value:
        return all(is_hyper_value(v) for v in value)
    return False


@dataclass(frozen=True)
class OptimizerSpec:
    """What unrollc needs of the user's optimizer.

    Attributes:
        cls: the optimizer class, e.g. ``torch.optim.Adam``.
        group_params: per group, the names (as in ``model.named_parameters()``) of its parameters.
        static: per group, the options that are not hyperparameters (``foreach``, ``nesterov``, ...).
        hyper: per group, the hyperparameters as Python floats or tensors (``lr``, ``betas``, ...).
        attributes: what the optimizer's own ``__init__`` stored on the instance besides torch.optim.Optimizer's
            attributes (a custom optimizer's ``self.scale = scale``): static, as the static options.
        step_hooks: the optimizer's own step hooks (``opt.register_step_pre_hook`` and ``..._post_hook``: WGAN
            weight clipping), which its step runs and so the step graph does; static, as the static options.
    """

    cls: type
    group_params: tuple[tuple[str, ...], ...]
    static: tuple[tuple[tuple[str, Any], ...], ...]
    hyper: tuple[dict[str, Any], ...]
    rewritten: bool = False
    attributes: tuple[tuple[str, Any], ...] = ()  # a custom optimizer's own instance attributes (self.scale)
    step_hooks: tuple[tuple[Callable, ...], tuple[Callable, ...]] = ((), ())  # (pre, post)

    def with_capturable(self) -> "OptimizerSpec":
        """The same optimizer with ``capturable=True`` in every group that has the option: its foreach
        path takes tensor hyperparameters only then (``torch.optim.Adam`` raises otherwise)."""
        static = tuple(tuple((k, True if k == "capturable" else v) for k, v in group) for group in self.static)
        return replace(self, static=static)

    @functools.cached_property
    def static_key(self) -> Any:
        """The static options as a hashable key that compares safely with ``==`` (see :func:`option_key`);
        computed once per spec (the fields are immutable: a changed option makes a new spec)."""
        return option_key((self.static, self.attributes, self.step_hooks))

    @property
    def capturable(self) -> bool:
        """Whether every group that has a ``capturable`` option has it on."""
        return all(v for group in self.static for k, v in group if k == "capturable")

    def with_rewritten_branches(self) -> "OptimizerSpec":
        """The same optimizer, built from its module's source with data reads kept as tensors
        (see :mod:`unrollc.rewrite`)."""
        from .rewrite import rewritten_optimizer_class

        return replace(self, cls=rewritten_optimizer_class(self.cls), rewritten=True)

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer, param_names: Mapping[int, str]) -> "OptimizerSpec":
        """Read ``opt`` (never modified). ``param_names`` maps ``id(parameter)`` to its name."""
        kind = type(opt)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"unrollc.compile: expected a torch.optim.Optimizer as `opt`, got {kind.__name__}; "
                "pass the optimizer built over model.parameters()."
            )
        for base in kind.__mro__:
            if base.__name__ in _REFUSED and base.__module__.startswith("torch.optim"):
                raise UnsupportedOptimizerError(
                    f"unrollc.compile: torch.optim.{base.__name__} {_REFUSED[base.__name__]}."
                )
        group_params, static, hyper = [], [], []
        for i, group in enumerate(opt.param_groups):
            names = []
            for p in group["params"]:
                if id(p) not in param_names:
                    raise ValueError(
                        f"unrollc.compile: parameter group {i} of the optimizer holds a tensor of shape "
                        f"{tuple(p.shape)} that is not a parameter of the model; build the optimizer over "
                        "model.parameters() (or a subset of them)."
                    )
                names.append(param_names[id(p)])
            opts = {k: v for k, v in group.items() if k != "params"}
            # foreach and fused are execution strategies of the same maths. The step graph is traced from
            # the single-tensor implementation: it keeps Python-scalar semantics that guards handle
            # exactly (foreach paths pass tensor lists where ATen wants scalars, and RAdam's capturable
            # foreach path masks a NaN with torch.where, which poisons meta-gradients).
            if opts.get("fused"):
                opts["fused"] = False
            if "foreach" in opts:
                opts["foreach"] = False
            if opts.get("capturable") and any(b.__name__ in _NOT_CAPTURABLE for b in kind.__mro__):
                opts["capturable"] = False
            if "capturable" in opts and kind.__name__ in _CAPTURABLE_ONLY:
                # torch.optim's foreach paths accept tensor hyperparameters only when capturable. The
                # single-tensor paths keep Python branches (RAdam's rectification), which guards handle
                # exactly, where the capturable rewrite with torch.where yields NaN meta-gradients.
                opts["capturable"] = True
            group_params.append(tuple(names))
            hyper.append({k: v for k, v in opts.items() if is_hyper_value(v)})
            static.append(tuple(sorted((k, _freeze(v)) for k, v in opts.items() if not is_hyper_value(v))))
        attributes = tuple(sorted(own_attributes(opt).items()))
        def own(hook: Callable) -> Callable:  # a method of this optimizer: bound to the rebuilt one in build()
            return _OwnMethod(hook.__func__) if inspect.ismethod(hook) and hook.__self__ is opt else hook

        hooks = (tuple(map(own, opt._optimizer_step_pre_hooks.values())), tuple(map(own, opt._optimizer_step_post_hooks.values())))
        return cls(kind, tuple(group_params), tuple(static), tuple(hyper), attributes=attributes, step_hooks=hooks)

    def build(self, params_per_group: list[list[torch.Tensor]], hyper: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """A fresh optimizer of the same class over ``params_per_group`` with the given hyperparameters."""
        groups = []
        for params, static, hyp in zip(params_per_group, self.static, hyper, strict=True):
            groups.append({"params": params, **dict(static), **hyp})
        first = groups[0]
        rest = groups[1:]
        opt = self.cls([first], **_required_options(self.cls, first))
        for g in rest:
            opt.add_param_group(g)
        for name, value in self.attributes:  # the user's values, not the constructor's defaults
            setattr(opt, name, value if isinstance(value, torch.Tensor) else _copied(value))
        pre, post = self.step_hooks
        for hooks, register in ((pre, opt.register_step_pre_hook), (post, opt.register_step_post_hook)):
            own = {_hook_identity(h) for h in (opt._optimizer_step_pre_hooks if hooks is pre else opt._optimizer_step_post_hooks).values()}
            for hook in hooks:
                if _hook_identity(hook) in own:
                    continue  # the constructor registered it again (self.register_step_post_hook(self._decay))
                if isinstance(hook, _OwnMethod):
                    hook = types.MethodType(hook.func, opt)  # a method of the user's optimizer: of this one
                register(hook)
        return opt


@dataclass(frozen=True)
class _OwnMethod:
    """A step hook that is a method of the user's optimizer itself (``self.register_step_post_hook(self._clip)``)."""

    func: Callable

    def __call__(self, *args: Any) -> Any:  # not called: build() binds it to the rebuilt optimizer
        raise TypeError("unrollc: an optimizer's own step-hook method is bound when the optimizer is rebuilt")


def _hook_identity(hook: Callable) -> Any:
    """What makes two step hooks the same hook of two instances of an optimizer: a bound method's function, a
    ``functools.partial``'s function, a function's code (a lambda or closure made in ``__init__`` is a new function
    for each instance, with the same code)."""
    if isinstance(hook, _OwnMethod):
        return ("method", hook.func)
    if inspect.ismethod(hook):
        return ("method", hook.__func__)
    if isinstance(hook, functools.partial):
        return ("partial", _hook_identity(hook.func))
    code = getattr(hook, "__code__", None)
    return ("code", code) if code is not None else ("object", id(hook))


# What torch.optim.Optimizer.__init__ itself stores on an instance, and what an lr scheduler adds (its flag
# that step() ran); the rest is the subclass's own.
_OPTIMIZER_ATTRIBUTES = frozenset(vars(torch.optim.Optimizer([torch.zeros(1, requires_grad=True)], {}))) | {"_opt_called"}


def own_attributes(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The attributes a custom optimizer's own code stored on ``opt`` (``self.scale = scale``): not
    torch.optim.Optimizer's, and not a method patched onto the instance (an lr scheduler wraps ``opt.step``)."""
    return {
        k: v for k, v in vars(opt).items()
        if k not in _OPTIMIZER_ATTRIBUTES and not (callable(v) and hasattr(type(opt), k))
    }


def _copied(value: Any) -> Any:
    """A container (list, dict, set) deep-copied, so that a step appending to it leaves the user's as it was; other
    objects (a number, a module the optimizer refers to) are shared, as a closed-over value is."""
    if not isinstance(value, (list, dict, set)):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - a container of objects that cannot be copied is shared
        return value


def _required_options(cls: type, group: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``cls`` besides ``params`` that have no default (a custom optimizer's
    ``def __init__(self, params, lr)``), taken from ``group``; torch.optim's own have defaults for all."""
    try:
        arguments = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params
    except (TypeError, ValueError):  # no Python signature: nothing to add
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [a.name for a in arguments if a.default is inspect.Parameter.empty and a.kind in kinds]
    missing = [name for name in required if name not in group]
    if missing:
        raise TypeError(
            f"unrollc: {cls.__name__}.__init__ requires {missing}, which its parameter groups do not hold. unrollc "
            f"builds a fresh {cls.__name__} for the step it traces, passing the options of the user's optimizer's "
            "parameter groups by name; give those arguments defaults, or keep their values in the optimizer's "
            "defaults (super().__init__(params, dict(name=value, ...)))."
        )
    return {name: group[name] for name in required}


class Same:
    """A key part equal only to the same object; it holds the object, so its id cannot be reused meanwhile."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def option_key(value: Any) -> Any:
    """A hashable stand-in for an option value that compares safely with ``==``: dicts and lists become
    tuples, tensors and other unhashable values are compared by identity (a tensor's ``==`` is elementwise)."""
    if isinstance(value, dict):
        return ("dict", tuple((option_key(k), option_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(option_key(x) for x in value)
    if isinstance(value, torch.Tensor):
        return Same(value)
    try:
        hash(value)
    except TypeError:
        return Same(value)
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value
