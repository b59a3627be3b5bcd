"""The state at time 0 (:meth:`Stepper.init <unrollc.runtime.stepper.Stepper.init>`): the user's overrides of
parameters, buffers and hyperparameters checked against the model and the optimizer, and the optimizer's state
and hyperparameters turned into the tensors a step graph carries."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..capture import state_number_tensor

__all__ = ["READ_AT_CONSTRUCTION", "hyper_tensor", "mapping", "own_state_entry", "refused_values", "REFUSED_ADVICE", "same_shape"]


def own_state_entry(key: str, value: Any, shared: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """A copy of one optimizer-state entry; equal scalar entries of one name (the parameters' step counters)
    become one tensor, so that the step graph computes their bias corrections once (see passes/cse.py)."""
    t = _as_tensor(value).detach().clone()
    if t.dim() != 0:
        return t
    return shared.setdefault((key, t.dtype, t.device, t.item()), t)


def _as_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if (t := state_number_tensor(v)) is not None:  # a custom optimizer's number, as the step graph carries it
        return t
    raise TypeError(
        f"Stepper.init: the optimizer's state holds {v!r} ({type(v).__name__}); unrollc carries optimizer state "
        "as tensors, so a value other than a tensor or a number cannot be carried. Store a tensor in the state."
    )


def hyper_tensor(key: str, v: Any, like: Any = None, api: str = "Stepper.init") -> Any:
    """A hyperparameter as a 0-dim tensor (a tuple of them for ``betas``); refuses anything else (``api`` names
    the caller in the error)."""
    if isinstance(like, tuple) or (like is None and isinstance(v, tuple)):
        if not isinstance(v, (tuple, list)) or (like is not None and len(v) != len(like)):
            raise TypeError(
                f"{api}: hyperparameter {key!r} is a tuple of {len(like) if like else len(v)} numbers, got "
                f"{type(v).__name__}; pass e.g. hyper={{{key!r}: (b1, b2)}} with floats or 0-dim tensors."
            )
        return tuple(hyper_tensor(f"{key}[{i}]", x, api=api) for i, x in enumerate(v))
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(
                f"{api}: hyperparameter {key!r} must be a scalar (a float or a one-element tensor), got a "
                f"tensor of shape {tuple(v.shape)}; for one learning rate per parameter, give every parameter its "
                "own parameter group in the optimizer (hyper keys '0.lr', '1.lr', ...)."
            )
        return v.reshape(()) if v.dim() else v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(
            f"{api}: hyperparameter {key!r} must be a float or a 0-dim tensor, got {type(v).__name__}."
        )
    return torch.tensor(float(v), dtype=torch.float64)


def refused_values(cls: type, static: tuple[tuple[str, Any], ...], before: Mapping[str, Any],
                   after: Mapping[str, Any]) -> str | None:
    """What is wrong with the hyperparameters ``after`` (one group's, overrides applied) when the constructor of the
    ``torch.optim`` class ``cls`` refuses them (``lr=-0.1``, ``betas=(1.0, 0.999)``) while it accepts ``before``
    (the values they replace), e.g. ``"lr=-0.1 (Invalid learning rate: -0.1)"``; None when it accepts them.

    torch.optim checks ranges only in its constructor and a step runs with whatever its groups hold, so unrollc
    warns rather than refuses (a learned value may pass through such a range). Not checked: other classes (a
    subclass's constructor may have side effects: it is never run), values not on the CPU (reading them would
    synchronise a device), values inside a torch.func transform, and optimizers whose constructor refuses
    ``before`` as well. Values ``after`` shares with ``before`` (the same objects) are not read."""
    if not cls.__module__.startswith("torch.optim") or all(after[k] is before.get(k) for k in after):
        return None
    old, new = _as_floats(before), _as_floats(after)
    if old is None or new is None or old == new:
        return None
    error = _constructor_error(cls, static, new)
    if error is None or _constructor_error(cls, static, old) is not None:
        return None
    changed = ", ".join(f"{k}={new[k]!r}" for k in new if new[k] != old.get(k))
    return f"{changed} ({error})"


REFUSED_ADVICE = (
    "unrollc runs the step with the values as given (eager param_groups accept them too, and a learned value may "
    "pass through such a range), but the update may be meaningless or NaN; check the values, or keep a learned one "
    "in range (e.g. lr = softplus(raw), beta = sigmoid(raw))."
)


def _as_floats(group: Mapping[str, Any]) -> dict[str, Any] | None:
    """``group``'s values as floats (tuples of floats for ``betas``), or None when one cannot be read cheaply (a
    tensor on a GPU, a value wrapped by a torch.func transform)."""
    def value(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(value(x) for x in v)
        if isinstance(v, torch.Tensor) and v.device.type != "cpu":
            raise ValueError("not read: a device tensor")
        return float(v)

    try:
        with torch.no_grad():
            return {k: value(v) for k, v in group.items()}
    except Exception:  # noqa: BLE001 - a transform's wrapped tensor has no value to check
        return None


def _constructor_error(cls: type, static: tuple[tuple[str, Any], ...], floats: dict[str, Any]) -> str | None:
    """The ValueError ``cls``'s constructor raises for these options on a one-element parameter, or None."""
    try:
        return _cached_constructor_error(cls, static, tuple(floats.items()))
    except TypeError:  # an unhashable static option
        return _cached_constructor_error.__wrapped__(cls, static, tuple(floats.items()))


@functools.lru_cache(maxsize=256)
def _cached_constructor_error(cls: type, static: tuple[tuple[str, Any], ...], floats: tuple) -> str | None:
    accepted = _constructor_options(cls)
    options = {k: v for k, v in (*static, *floats) if accepted is None or k in accepted}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the constructor's own notes (differentiable RMSprop's) are not news here
            cls([torch.zeros(1, requires_grad=True)], **options)
    except ValueError as e:
        return str(e)
    except Exception:  # noqa: BLE001 - a constructor that cannot be built this way is not checked
        return None
    return None


@functools.cache
def _constructor_options(cls: type) -> frozenset[str] | None:
    """The keyword arguments ``cls.__init__`` accepts (None: it takes ``**kwargs``, or has no readable signature)."""
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


# Options torch.optim reads only when it builds the optimizer (Adagrad fills state["sum"] with it there).
READ_AT_CONSTRUCTION = frozenset({"initial_accumulator_value"})


_EXAMPLES = {"params": "{'0.weight': w}", "buffers": "{'1.running_mean': m}", "hyper": "{'lr': torch.tensor(0.1, requires_grad=True)}"}


def mapping(name: str, value: Any) -> Mapping[str, Any]:
    """``value``, an ``init`` argument (``params``, ``buffers`` or ``hyper``), as a mapping (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"Stepper.init: expected `{name}` to be a mapping from names to tensors, e.g. {_EXAMPLES[name]}, got "
            f"{type(value).__name__}."
        )
    return value


def same_shape(kind: str, name: str, value: Any, like: torch.Tensor) -> torch.Tensor:
    """``value``, an override of the model's ``like``: a tensor of its shape and kind of dtype, else refused."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Stepper.init: {kind}[{name!r}] must be a tensor, got {type(value).__name__}.")
    if value.shape != like.shape:
        raise ValueError(
            f"Stepper.init: {kind}[{name!r}] has shape {tuple(value.shape)} but the model's has {tuple(like.shape)}; "
            "pass a tensor of the model's shape."
        )
    if (value.is_floating_point(), value.is_complex()) != (like.is_floating_point(), like.is_complex()):
        raise TypeError(
            f"Stepper.init: {kind}[{name!r}] has dtype {value.dtype} but the model's is {like.dtype}; pass a tensor "
            f"of the model's kind of dtype, e.g. value.to({like.dtype})."
        )
    return value
