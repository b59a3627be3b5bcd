r"""``higher.patch``: a "stateless" view of an ``nn.Module`` that runs with explicit (fast) weights.

:func:`monkeypatch` returns an :class:`FunctionalModule`. Unlike ``higher`` 0.2.1, nothing is
monkey-patched: no class is created at run time. The functional module holds a structural copy of the
user's module: new module objects, sharing with the user's module every tensor (parameters, buffers, plain
tensor attributes, public or private) and every module it uses without owning it. The copy's layers hold the
latest fast weights and the functional module's buffers (put there whenever they change, as ``higher``'s
patched module holds them), so ``fmodel.encoder(x)``, ``fmodel[0](x)``, ``fmodel.fc.weight``, methods and
properties of the user's class (``fmodel.embed(x)``), ``fmodel.modules()``, ``apply()`` and ``state_dict()``
all see the fast weights, and the user's module is never touched.

``copy_initial_weights`` (as in ``higher``):

* ``True`` (default): the weights at time 0 are *detached copies* of the module's parameters. Meta-
  gradients reach ``fmodel.parameters(time=0)``, **not** ``model.parameters()``.
* ``False``: the weights at time 0 are ``p.clone()`` of the module's parameters, so gradients of an
  outer loss flow into ``model.parameters()`` (``.grad`` after ``backward()``): use this for MAML.

``track_higher_grads=False`` (first-order / test mode) keeps no graph through the updates; unlike
``higher``, ``parameters(time=0)`` still returns the initial weights, and the differentiable optimizer
links every later weight to them with an identity gradient (first-order MAML): see
:mod:`unrollc.higher.optim`.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils._named_member_accessor import NamedMemberAccessor

from ..traced_functions import CompositeWeightNorm, sdpa_math
from . import utils as _utils
from .structure import module_tree_copy, shared_objects, tied_names, uses_weight_norm

__all__ = ["monkeypatch", "make_functional", "buffer_sync", "FunctionalModule"]

_INTERNAL = frozenset(
    {"_module", "_original", "_param_names", "_fast_params", "_bufs", "_track_higher_grads", "_released", "_weight_norm",
     "_aliases",
     "training"}
)


class FunctionalModule(nn.Module):
    """The functional version of a module returned by :func:`monkeypatch` (``higher``'s ``fmodel``).

    ``fmodel(*args, params=None, **kwargs)`` runs the module with ``params`` (a list ordered like
    ``module.parameters()``; they become the new fast weights) or with the latest fast weights.
    """

    def __init__(self, module: nn.Module, buffers: dict[str, torch.Tensor], track_higher_grads: bool) -> None:
        super().__init__()
        names = [n for n, _ in module.named_parameters()]  # same order as module.parameters()
        try:
            structure = copy.deepcopy(module, memo=shared_objects(module))
        except Exception:  # noqa: BLE001 - e.g. a lock or a file handle in a private attribute
            structure = module_tree_copy(module)
        object.__setattr__(self, "_module", structure)
        object.__setattr__(self, "_original", module)
        object.__setattr__(self, "_param_names", names)
        object.__setattr__(self, "_fast_params", None)
        object.__setattr__(self, "_bufs", buffers)
        object.__setattr__(self, "_released", False)
        object.__setattr__(self, "_weight_norm", uses_weight_norm(module))
        object.__setattr__(self, "_aliases", tied_names(module))
        self.track_higher_grads = track_higher_grads
        self.training = module.training

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        """The patched module's class, for ``isinstance(fmodel, MyNet)`` as on higher's patched module (a
        subclass of the user's class there); ``type(fmodel)`` is :class:`FunctionalModule`."""
        return type(self._original)

    def _get_name(self) -> str:
        return type(self).__name__

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(type(self))))  # nn.Module's reads self.__class__

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # pickle refuses __newobj__ when obj.__class__ is not the class it rebuilds (the __class__ property)
        return (_new_instance, (type(self),), self.__getstate__())

    # ----------------------------------------------------------------------------- fast weights
    @property
    def track_higher_grads(self) -> bool:
        """Whether new fast weights keep their graph to the earlier ones (higher's flag; False: first order)."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        """Switch higher-order tracking on or off (a bool, as in higher)."""
        if not isinstance(value, bool):
            raise ValueError(f"Expected boolean argument. Got: {type(value)}.")
        object.__setattr__(self, "_track_higher_grads", value)

    @property
    def fast_params(self) -> list[torch.Tensor] | None:
        """The latest fast weights (a list ordered like ``module.parameters()``), None before any."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: Sequence[torch.Tensor]) -> None:
        value = list(value)
        if len(value) != len(self._param_names):
            raise ValueError(
                f"unrollc.higher: expected {len(self._param_names)} fast weights (one per module.parameters(), "
                f"ordered like them), got {len(value)}."
            )
        if self._fast_params is None:
            object.__setattr__(self, "_fast_params", [value])
        elif self.track_higher_grads:
            self._fast_params.append(value)
        else:  # keep time 0 and the latest only: no history, no graph through it
            self._fast_params[1:] = [value]
        self._install()

    @property
    def init_fast_params(self) -> list[torch.Tensor]:
        """The fast weights at time 0 (available with ``track_higher_grads=False`` too)."""
        return self._history(0)

    def update_params(self, params: Sequence[torch.Tensor]) -> None:
        """Make ``params`` the latest fast weights (with ``track_higher_grads``, appended to the history)."""
        self.fast_params = params

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[torch.Tensor]:  # type: ignore[override]
        """The fast weights at ``time`` (None or -1: the latest; 0: the initial weights; t: after t updates)."""
        if not recurse:
            warnings.warn(
                "Calling parameters with recurse=False on a monkey patched module still returns all the fast "
                "weights of of nested patched modules.",
                stacklevel=2,
            )
        return iter(self._history(-1 if time is None else time))

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        """``(name, latest fast weight)``, named as in ``module.named_parameters()``."""
        dot = f"{prefix}." if prefix else ""
        return iter([(dot + n, p) for n, p in zip(self._param_names, self._latest(), strict=True)])

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:  # type: ignore[override]
        """The buffers the forward uses (copies of the module's; BatchNorm's running stats advance here)."""
        return iter(list(self._bufs.values()))

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        """``(name, buffer)`` pairs of :meth:`buffers`, named as in the module."""
        dot = f"{prefix}." if prefix else ""
        return iter([(dot + n, b) for n, b in self._bufs.items()])

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:  # type: ignore[override]
        """The module's state dict with the latest fast weights and the functional module's buffers."""
        with self._reparametrized():
            sd = self._module.state_dict(prefix=prefix, keep_vars=True)
        out = OrderedDict((k, v if keep_vars or not isinstance(v, torch.Tensor) else v.detach()) for k, v in sd.items())
        if destination is not None:
            destination.update(out)
            return destination
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Copy ``state_dict`` (keyed as :meth:`state_dict`) into the latest fast weights and the functional module's
        buffers, in place and without gradient, as on ``higher``'s patched module; the user's module is untouched.
        Returns torch's ``(missing_keys, unexpected_keys)``."""
        if assign:
            raise ValueError(
                "unrollc.higher: load_state_dict(assign=True) on a functional module is not supported: its fast weights "
                "are plain tensors, not nn.Parameters. Make tensors the new fast weights with "
                "fmodel.update_params([...]) (ordered like module.parameters()), or load with assign=False (a copy)."
            )
        with self._reparametrized():
            return self._module.load_state_dict(state_dict, strict=strict)

    def _history(self, time: int) -> list[torch.Tensor]:
        if self._fast_params is None:
            raise Exception("Tried to get fast weights of a monkey patched module which does not encapsulate fast weights.")
        try:
            if isinstance(time, bool):
                raise TypeError
            time = operator.index(time)  # an int, numpy's or a 0-dim integer tensor (higher indexes a list with it)
        except TypeError:
            raise TypeError(
                f"unrollc.higher: parameters(time=...) takes an int (0: the initial weights, t: after t updates, -1 "
                f"or None: the latest), got {type(time).__name__} {time!r}."
            ) from None
        if not self.track_higher_grads and time not in (-1, 0):
            raise ValueError(
                "The patched model is not tracking higher gradients. Only the latest parameters (time=None or -1) "
                "and the initial ones (time=0) are available."
            )
        if not -len(self._fast_params) <= time < len(self._fast_params):
            raise IndexError(
                f"unrollc.higher: no fast weights at time={time}: the history holds times 0 to "
                f"{len(self._fast_params) - 1} (negative times count from the latest, -1)."
            )
        entry = self._fast_params[time]
        if entry is None:
            raise ValueError(
                f"unrollc.higher: the fast weights at time={time} were released when the innerloop_ctx that created "
                "this module was left; only time=0 and the latest weights are kept. Read them inside the context."
            )
        return list(entry)

    def _latest(self) -> list[torch.Tensor]:
        if self.fast_params is None:
            raise ValueError("params keyword must be provided if patched module not tracking its own fast parameters")
        return self.fast_params

    def _release(self) -> None:
        """Drop the intermediate history (times 1 .. n-1): called when leaving ``innerloop_ctx``."""
        if self._fast_params is not None and len(self._fast_params) > 2:
            self._fast_params[1:-1] = [None] * (len(self._fast_params) - 2)
        object.__setattr__(self, "_released", True)

    # --------------------------------------------------------------------------------- running
    def _install(self) -> None:
        """Put the latest fast weights (once there are any) and the buffers into the copy's layers, tied
        names included: everything that reads the layers, in a call or not, sees them."""
        tensors = dict(self._bufs)
        if self._fast_params is not None:
            tensors.update(zip(self._param_names, self._latest(), strict=True))
        tensors.update({alias: tensors[name] for name, alias in self._aliases if name in tensors})
        NamedMemberAccessor(self._module).swap_tensors_dict(tensors, allow_missing=True)

    @contextlib.contextmanager
    def _reparametrized(self) -> Iterator[None]:
        """Run code that reads the layers: the latest weights installed again (the list of fast weights may have
        been edited in place), afterwards the buffers the code re-assigned (not updated in place) read back."""
        self._latest()  # no fast weights yet: higher's error
        self._install()
        composite = CompositeWeightNorm() if self._weight_norm else contextlib.nullcontext()
        # The fused attention kernels (flash, efficient) have no double backward: a second-order meta-gradient
        # through nn.MultiheadAttention / TransformerEncoderLayer failed in backward(); the math kernel has one.
        attention = sdpa_math() if self._track_higher_grads and torch.is_grad_enabled() else contextlib.nullcontext()
        with composite, attention:
            yield
        accessor = NamedMemberAccessor(self._module)
        for n in self._bufs:
            self._bufs[n] = accessor.get_tensor(n)

    def forward(self, *args: Any, params: Sequence[torch.Tensor] | None = None, **kwargs: Any) -> Any:
        """The module's forward with the fast weights (or ``params``, which become the fast weights, as in higher)."""
        if params is not None:
            self.fast_params = params
        with self._reparametrized():
            return self._module(*args, **kwargs)

    def _call_in(self, path: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a submodule or a method) run with the fast weights; accepts ``params=`` like forward."""

        def call(*args: Any, params: Sequence[torch.Tensor] | None = None, **kwargs: Any) -> Any:
            if params is not None:
                self.fast_params = params
            with self._reparametrized():
                return fn(*args, **kwargs)

        call.__name__ = getattr(fn, "__name__", path)
        call.__doc__ = getattr(fn, "__doc__", None)
        return call

    def train(self, mode: bool = True) -> "FunctionalModule":
        """Set train/eval mode on the functional module and the layers its forward runs."""
        self._module.train(mode)
        object.__setattr__(self, "training", mode)
        return self

    # ----------------------------------------------------------------- attributes and submodules
    def _resolve(self, path: str, name: str) -> Any:
        full = f"{path}.{name}" if path else name
        module = self._module.get_submodule(path) if path else self._module
        if full in self._param_names:
            return self._latest()[self._param_names.index(full)]
        if full in self._bufs:
            return self._bufs[full]
        if name in module._parameters or name in module._buffers:  # a tied name or a None entry
            with self._reparametrized():
                return getattr(module, name)
        if name in module._modules and module._modules[name] is not None:
            return SubmoduleView(self, full)
        attr = getattr(module, name)
        if callable(attr) and getattr(attr, "__self__", None) is module and not hasattr(nn.Module, name):
            return self._call_in(full, attr)
        return attr

    def _assign(self, path: str, name: str, value: Any) -> bool:
        """Assign a fast weight (appended to the history, as in ``higher``) or a buffer; False if neither."""
        full = f"{path}.{name}" if path else name
        module = self._module.get_submodule(path) if path else self._module
        if name in module._parameters:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"Require Tensor as fast weights. Got {torch.typename(value)}")
            with self._reparametrized():
                old = getattr(module, name)
            fast = list(self._latest())
            index = next((i for i, p in enumerate(fast) if p is old), None)
            if index is None:
                raise AttributeError(f"unrollc.higher: {full!r} is not a parameter of the patched module.")
            fast[index] = value
            self.update_params(fast)
            return True
        if full in self._bufs:
            self._bufs[full] = value
            NamedMemberAccessor(self._module).set_tensor(full, value)
            return True
        return False

    def __getattr__(self, name: str) -> Any:
        if name in _INTERNAL or name.startswith("__"):
            return super().__getattr__(name)
        return self._resolve("", name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _INTERNAL or isinstance(getattr(type(self), name, None), property):
            super().__setattr__(name, value)  # fast_params, track_higher_grads: this module's own properties
            if name == "training" and "_module" in vars(self):  # fmodel.training = False: the root's flag, which
                self._module.training = value  # the forward reads (self.training), as on higher's patched module
        elif not self._assign("", name, value):
            setattr(self._module, name, value)  # seen by the forward, as on higher's patched module

    # ----------------------------------------------------------------------------- module tree
    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        """This functional module, then the submodules the forward runs (``modules()``, ``apply()`` and
        ``isinstance`` checks see the real layer types; they hold the latest fast weights and the buffers)."""
        for name, module in self._module.named_modules(memo, prefix, remove_duplicate):
            yield name, (self if module is self._module else module)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        """The immediate layers the forward runs, with their names."""
        return self._module.named_children()

    def children(self) -> Iterator[nn.Module]:  # type: ignore[override]
        """The immediate layers the forward runs."""
        return self._module.children()

    def get_submodule(self, target: str) -> nn.Module:
        """The layer at ``target`` (``""``: this functional module)."""
        return self if target == "" else self._module.get_submodule(target)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "FunctionalModule":  # type: ignore[override]
        tensors = [*self._bufs.values(), *(self._original.parameters() if self.fast_params is None else self._latest())]
        with torch.no_grad():
            if all(fn(t) is t for t in tensors):  # .to()/.cpu()/.double() to what they are already: a no-op, as in higher
                return self
        raise RuntimeError(
            "unrollc.higher: .to()/.cuda()/.float() on a functional module would convert the original model's "
            "parameters, which it shares; convert the model before patching it, or pass device= to monkeypatch "
            "/ innerloop_ctx."
        )

    def __getitem__(self, index: Any) -> "SubmoduleView":
        return SubmoduleView(self, "")[index]

    def __len__(self) -> int:
        return len(self._module)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator["SubmoduleView"]:
        return iter(SubmoduleView(self, ""))

    def write_back(self, module: nn.Module | None = None) -> None:
        """Copy the latest fast weights and the buffers into ``module`` (default: the patched module), in
        place and without gradient: keep what the inner loop learned (``higher`` has no equivalent)."""
        target = self._original if module is None else module
        with torch.no_grad():
            for p, fast in zip(target.parameters(), self._latest(), strict=True):
                p.copy_(fast)
            named = dict(target.named_buffers())
            for n, b in self._bufs.items():
                named[n].copy_(b)

    def extra_repr(self) -> str:
        """What ``repr`` shows after the class name."""
        return f"functional view of {type(self._original).__name__}, track_higher_grads={self.track_higher_grads}"


class SubmoduleView:
    """A submodule reached through a :class:`FunctionalModule` (``fmodel.encoder``, ``fmodel[0]``): calling it,
    its methods, and reading its weights use the fast weights."""

    __slots__ = ("_root", "_path")

    def __init__(self, root: FunctionalModule, path: str) -> None:
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_path", path)

    @property
    def _target(self) -> nn.Module:
        return self._root._module.get_submodule(self._path) if self._path else self._root._module

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        """The layer's class: ``isinstance(fmodel.encoder, nn.Linear)`` holds, as in higher."""
        return type(self._target)

    def __call__(self, *args: Any, params: Sequence[torch.Tensor] | None = None, **kwargs: Any) -> Any:
        return self._root._call_in(self._path, self._target)(*args, params=params, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The submodule's forward, run with the root's fast weights."""
        return self._root._call_in(self._path, self._target.forward)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return self._root._resolve(self._path, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self._root._assign(self._path, name, value):
            setattr(self._target, name, value)

    def _child(self, key: str) -> "SubmoduleView":
        return SubmoduleView(self._root, f"{self._path}.{key}" if self._path else key)

    def __getitem__(self, index: Any) -> Any:
        target = self._target
        if isinstance(target, (nn.ParameterList, nn.ParameterDict)):  # the fast weight, as in higher
            key = list(target._parameters)[index] if isinstance(index, int) else index
            return self._root._resolve(self._path, str(key))
        keys = list(target._modules)
        if isinstance(index, str):
            return self._child(index)
        if isinstance(index, int):
            return self._child(keys[index])
        raise TypeError(f"unrollc.higher: submodules are indexed with an int or a str, got {type(index).__name__}.")

    def __len__(self) -> int:
        return len(self._target._modules)

    def __iter__(self) -> Iterator["SubmoduleView"]:
        return iter([self._child(k) for k in self._target._modules])

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        return iter([p for _, p in self.named_parameters()])

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        head = f"{self._path}." if self._path else ""
        dot = f"{prefix}." if prefix else ""
        named = zip(self._root._param_names, self._root._latest(), strict=True)
        return iter([(dot + n[len(head) :], p) for n, p in named if n.startswith(head)])

    def __repr__(self) -> str:
        return f"SubmoduleView({self._path!r}, {self._target!r})"


def _new_instance(cls: type) -> Any:
    """An empty instance of ``cls`` for unpickling (its state follows)."""
    return cls.__new__(cls)


_MonkeyPatchBase = FunctionalModule  # higher's name for the type of a patched module


def buffer_sync(module: nn.Module, fmodule: FunctionalModule, device: torch.device | None = None) -> None:
    r"""One off sync (copy) of buffers in ``fmodule`` with those from ``module``."""
    for n, b in module.named_buffers():
        fmodule._bufs[n] = b.clone().detach() if device is None else b.clone().detach().to(device)
    fmodule._install()


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
) -> FunctionalModule:
    r"""Return a stateless version of ``module`` that holds no fast weights yet (``higher``'s
    ``make_functional``, the building block of :func:`monkeypatch`).

    Pass the weights to its first call, ``fmodule(x, params=[...])`` (ordered like ``module.parameters()``),
    or set them with ``fmodule.update_params(...)``. Its buffers are the module's own (BatchNorm's running
    statistics advance in ``module``) until :func:`buffer_sync` gives it copies.

    Args:
        module: a ``torch.nn.Module`` instance; its parameters are never modified.
        encapsulator (optional): called as ``encapsulator(fmodule, module)`` on the new functional module,
            e.g. to give it initial fast weights (this is how ``monkeypatch`` is built in ``higher``).

    Returns:
        ``fmodule``: call it as ``fmodule(x, params=fast_weights)``.
    """
    return _make_functional(module, encapsulator, "unrollc.higher.make_functional")


def _make_functional(
    module: nn.Module, encapsulator: Callable[[FunctionalModule, nn.Module], None] | None, api: str
) -> FunctionalModule:
    if isinstance(module, FunctionalModule):
        raise ValueError(f"{api}: the module is already a functional module; pass the original module.")
    if not isinstance(module, nn.Module):
        raise TypeError(f"{api}: expected a torch.nn.Module, got {type(module).__name__}; pass the model itself.")
    fmodule = FunctionalModule(module, {}, track_higher_grads=True)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def monkeypatch(
    module: nn.Module,
    device: torch.device | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    r"""Create a "stateless" version of ``module`` with its own fast weights (see the module docstring).

    Args:
        module: a ``torch.nn.Module`` subclass instance; never modified (buffers are copied and advance in
            the copy, e.g. BatchNorm running statistics).
        device (optional): a device to cast the fast weights and buffers to.
        copy_initial_weights: if True, the initial fast weights are detached copies (gradients stop there:
            read them with ``fmodel.parameters(time=0)``); if False, they are ``clone()`` s of the module's
            parameters, so gradients reach ``module.parameters()`` (MAML).
        track_higher_grads: if False, updates are not differentiated through ("test mode" / first order).

    Returns:
        ``fmodel``: call it as ``fmodel(x)`` or ``fmodel(x, params=fast_weights)``.
    """

    def encapsulator(fmodel: FunctionalModule, module: nn.Module) -> None:
        if copy_initial_weights:
            params = _utils.get_func_params(module, device=device)
        else:
            params = [p.clone() if device is None else p.clone().to(device) for p in module.parameters()]
        buffer_sync(module, fmodel, device)
        fmodel.update_params(params)

    fmodel = _make_functional(module, encapsulator, "unrollc.higher.monkeypatch")
    fmodel.track_higher_grads = track_higher_grads
    return fmodel
