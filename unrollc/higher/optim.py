r"""``higher.optim``: differentiable optimizers — the real ``torch.optim`` update, compiled by unrollc.

Nothing here re-implements an optimizer. ``DifferentiableOptimizer.step(loss)`` takes the gradient of
the user's eager ``loss`` with ``torch.autograd.grad(create_graph=track_higher_grads)`` and runs the
optimizer's own ``step()``, traced once and functionalized by :class:`unrollc.update.CompiledUpdate`,
as a differentiable function of the parameters, gradients, optimizer state and hyperparameters. So
every optimizer the core supports works (AdamW, NAdam, RAdam, ...) and matches ``torch.optim``
exactly, options such as ``maximize`` and ``decoupled_weight_decay`` included (``higher`` 0.2.1 puts
Adam's ``eps`` elsewhere and ignores those options).

``track_higher_grads=False`` (first-order / test mode): no graph through the updates; the new weights
are ``w_t.detach() + (w_0 - w_0.detach())`` where ``w_0`` are the weights the first step starts from (the initial
fast weights, or those set with ``fmodel(x, params=...)``, ``update_params`` or ``step(params=...)``), so their
value is ``w_t`` and the gradient of an outer loss reaches ``w_0`` unchanged — first-order MAML. With
``copy_initial_weights=False`` that delivers first-order gradients to ``model.parameters()`` (``higher``
silently gives None); the weights keep ``.grad`` after ``backward()`` (``retain_grad``), as in ``higher``.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..capture import state_number_tensor
from ..errors import LossError, user_stacklevel
from ..optimizer_spec import OptimizerSpec, UnsupportedOptimizerError, is_hyper_value
from ..update import CompiledUpdate
from . import patch as _patch
from . import utils as _utils

__all__ = [
    "DifferentiableOptimizer",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
]

_OverrideType = dict[str, list[Any]]
_GradCallbackType = Callable[[list[torch.Tensor]], list[torch.Tensor]]
_GroupedGradsType = list[list[torch.Tensor]]


class DifferentiableOptimizer:
    """A differentiable copy of an existing optimizer (``higher``'s constructor and ``step`` signatures).

    Attributes (as in ``higher``): ``param_groups`` (the options per group, with ``override`` s applied;
    ``group['params']`` holds the latest fast weights after a step) and ``state`` (per group, per parameter
    index, the optimizer's state tensors). A subclass may override ``_update(grouped_grads)`` the way
    ``higher``'s hand-written optimizers do; by default it runs the compiled ``torch.optim`` update.
    """

    _released = False  # set when the innerloop_ctx that made it exits (see _release)
    # (options as last read, their CompiledUpdate, hyperparameter tensors): see _update_now
    _last_update: tuple[list[tuple[str, Any, Any]], CompiledUpdate, list[dict[str, Any]]] | None = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[torch.Tensor],
        fmodel: _patch.FunctionalModule | None = None,
        device: torch.device | None = None,
        override: _OverrideType | None = None,
        grad_callback: _GradCallbackType | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        reference_params = list(reference_params)
        self._other = other
        self.param_groups = [{k: v for k, v in g.items() if k != "params"} for g in other.param_groups]
        self._raw = [dict(g) for g in self.param_groups]  # the options as the user's optimizer has them
        self._group_to_param_list: list[list[int]] = []
        self.state: list[collections.defaultdict[int, Any]] = [collections.defaultdict(dict) for _ in self.param_groups]
        if override is not None:
            self._apply_override(override)
        self._grad_callback = grad_callback
        for g, (group, orig) in enumerate(zip(self.param_groups, other.param_groups, strict=True)):
            local = []
            for i, p in enumerate(orig["params"]):
                if p in other.state and other.state[p]:
                    self.state[g][i] = {k: _utils._recursive_copy_and_cast(v, device) for k, v in other.state[p].items()}
                index = _utils._find_param_in_list(p, reference_params)
                if index is None:
                    raise ValueError(
                        f"Could not find parameter {i} of group {g} (shape {tuple(p.shape)}) in reference parameters: "
                        "unrollc.higher: the optimizer must be built over the parameters the differentiable optimizer "
                        "updates (reference_params, e.g. model.parameters() for the model that was patched)."
                    )
                local.append(index)
            group["params"] = [None] * len(local)
            self._group_to_param_list.append(local)
        self._fmodel = fmodel
        self._track_higher_grads = track_higher_grads
        self._first_order_links: list[torch.Tensor | None] | None = None
        self._base_spec: OptimizerSpec | None = None
        self._n_params = len(reference_params)
        if self._compiled:  # an optimizer that cannot be compiled (LBFGS) is refused here, as in higher
            self._read_optimizer()

    # ----------------------------------------------------------------------------------- higher API
    @property
    def _compiled(self) -> bool:
        """Whether updates run the user's torch.optim step, compiled (not a subclass's own ``_update``)."""
        return type(self)._update is DifferentiableOptimizer._update

    def _apply_override(self, override: _OverrideType) -> None:
        unknown = {k for k in override if not all(k in group for group in self.param_groups)} if self._compiled else ()
        if unknown:  # a subclass's own _update may read options of its own; torch.optim's step would not
            known = sorted({o for group in self.param_groups for o in group if o != "params"})
            warnings.warn(
                f"unrollc.higher: override {sorted(unknown)}: {type(self._other).__name__} has no such option, so it "
                f"changes nothing; its options are {known}.", stacklevel=user_stacklevel())
        for group, k, value in _per_group(override, self.param_groups):
            group[k] = value

    def step(
        self,
        loss: torch.Tensor,
        params: Iterable[torch.Tensor] | None = None,
        override: _OverrideType | None = None,
        grad_callback: _GradCallbackType | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        r"""Replace ``opt.zero_grad(); loss.backward(); opt.step()`` by ``new_params = diffopt.step(loss)``.

        Args:
            loss: the loss tensor.
            params (optional): the weights to differentiate ``loss`` by and update; by default the latest
                fast weights of the functional module given at construction (``params`` then replace them).
            override (optional): ``{option: [value]}`` or one value per group; takes precedence over the
                construction-time override. Tensors requiring grad receive gradients.
            grad_callback (optional): applied to the list of gradients (ordered like ``reference_params``),
                e.g. clipping; overrides the one given at construction.

        Returns:
            The updated weights (the functional module's fast weights are updated with them too).
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"DifferentiableOptimizer.step: expected the loss, a scalar tensor computed with the functional "
                f"module (diffopt.step(loss_fn(fmodel(x), y))), got {type(loss).__name__}."
            )
        if self._released:
            raise RuntimeError(
                "DifferentiableOptimizer.step: the innerloop_ctx that made this optimizer has exited, and leaving it "
                "released the graph of the optimizer state (momentum buffers, Adam's moments) to free memory, so a "
                "step now would not differentiate through the steps before it. Take every step inside the "
                "`with innerloop_ctx(...)` block, or build the optimizer with higher.get_diff_optim(...), which is "
                "not tied to a context."
            )
        if override is not None:
            self._apply_override(override)
        if self._fmodel is None or self._fmodel.fast_params is None:
            if params is None:
                raise ValueError(
                    "params kwarg must be passed to step if the differentiable optimizer doesn't have a view on a "
                    "patched model with params."
                )
        else:
            params = self._fmodel.fast_params if params is None else params
        params = list(params)
        if bad := [i for i, p in enumerate(params) if not isinstance(p, torch.Tensor)]:
            raise TypeError(
                f"DifferentiableOptimizer.step: expected `params` to hold tensors (the fast weights, ordered like "
                f"module.parameters()), got {type(params[bad[0]]).__name__} at position {bad[0]}; pass "
                "fmodel.fast_params or the list the previous step returned."
            )
        if len(params) != self._n_params:
            raise ValueError(
                f"DifferentiableOptimizer.step: expected {self._n_params} weights in `params` (one per reference "
                f"parameter, ordered like module.parameters()), got {len(params)}; pass all of them, e.g. "
                "fmodel.fast_params or the list the previous step returned."
            )
        if loss.numel() != 1:
            raise LossError(
                f"DifferentiableOptimizer.step: expected a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                "reduce it first, e.g. diffopt.step(loss.mean()) or F.mse_loss(..., reduction='mean')."
            )
        if not loss.requires_grad:
            raise LossError(
                "DifferentiableOptimizer.step: the loss does not require grad, so it cannot be differentiated by the "
                "fast weights: it was computed under torch.no_grad(), detached, or from tensors that carry no "
                "gradient. Compute it with the functional module: diffopt.step(loss_fn(fmodel(x), y))."
            )
        if self._first_order_links is None and not self._track_higher_grads:
            # The weights the first step starts from (the ones passed in, else the functional module's latest: the
            # initial ones, or what fmodel(x, params=...) / update_params set): later weights link to them.
            self._first_order_links = [p - p.detach() if p.requires_grad and torch.is_grad_enabled() else None for p in params]
        targets = [p if p.requires_grad else torch.tensor([], requires_grad=True) for p in params]
        # First-order weights retain .grad (as higher's detached leaves have it after backward); autograd.grad
        # fills retained grads too, so the inner gradient must not stay on them.
        held = [t.grad if t.retains_grad else None for t in targets]
        all_grads = torch.autograd.grad(loss, targets, create_graph=self._track_higher_grads, allow_unused=True)
        for t, g in zip(targets, held, strict=True):
            if t.retains_grad:
                t.grad = g
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            returned = callback(all_grads)  # given a tuple, as in higher
            if returned is None:
                raise TypeError(
                    "DifferentiableOptimizer.step: grad_callback returned None; it must return the gradients, one per "
                    "weight in the order it was given them (a callback that clips in place still needs `return grads`)."
                )
            all_grads = returned
        all_grads = list(all_grads)
        if len(all_grads) != len(params):
            raise ValueError(
                f"DifferentiableOptimizer.step: grad_callback returned {len(all_grads)} gradients for {len(params)} "
                "weights; it must return one per weight, in the order it was given them (None for no gradient)."
            )
        if all(g is None for g in all_grads) and params:
            warnings.warn(
                "DifferentiableOptimizer.step: the loss depends on none of the weights this optimizer updates, so the "
                "step changes nothing. Was it computed with the original model instead of the functional module "
                "(model(x) instead of fmodel(x))?", stacklevel=user_stacklevel())
        grouped = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list, strict=True):
            grads = []
            for i, index in enumerate(mapping):
                group["params"][i] = params[index]
                grads.append(all_grads[index])
            grouped.append(grads)
        if self._track_higher_grads:
            self._update(grouped)
        else:
            with torch.no_grad():
                self._update(grouped)
        new_params = params[:]
        for group, mapping in zip(self.param_groups, self._group_to_param_list, strict=True):
            for p, index in zip(group["params"], mapping, strict=True):
                if self._track_higher_grads:
                    new_params[index] = p
                elif params[index].requires_grad:
                    new_params[index] = self._first_order(p, index)
                else:  # a frozen weight stays frozen (higher's test mode made it trainable from the next step)
                    new_params[index] = p.detach()
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _first_order(self, p: torch.Tensor, index: int) -> torch.Tensor:
        """``p`` without graph, linked to the initial weight by an identity gradient (module docstring)."""
        link = self._first_order_links[index] if self._first_order_links and index < len(self._first_order_links) else None
        if link is None or link.shape != p.shape or not torch.is_grad_enabled():
            return p.detach().requires_grad_()
        out = p.detach() + link
        out.retain_grad()
        return out

    # ------------------------------------------------------------------------------ compiled update
    def _update(self, grouped_grads: _GroupedGradsType, **kwargs: Any) -> None:
        """Run the compiled ``torch.optim`` update on ``self.param_groups`` / ``self.state`` in place."""
        update, hyper = self._update_now()
        if any(isinstance(lr := h.get("lr"), torch.Tensor) and lr.dim() for h in hyper):
            hyper = [dict(h) for h in hyper]  # a copy: the per-element lrs are made for this step's parameters
            for g, group in enumerate(self.param_groups):
                if isinstance(lr := hyper[g].get("lr"), torch.Tensor) and lr.dim():
                    hyper[g]["lr"] = _elementwise_lr(lr, group["params"], g)
        names = update.spec.group_params  # "g.i" per group, as _read_optimizer names the parameters
        params, grads, state = {}, {}, {}
        for g, (group, gg, group_state) in enumerate(zip(self.param_groups, grouped_grads, self.state, strict=True)):
            for i, (p, grad) in enumerate(zip(group["params"], gg, strict=True)):
                name = names[g][i]
                params[name] = p if self._track_higher_grads else p.detach()
                if grad is not None:
                    grads[name] = grad
                if st := group_state.get(i):
                    state[name] = {k: v if isinstance(v, torch.Tensor) else _utils._recursive_map(v, _as_tensor) for k, v in st.items()}
        new_params, new_state = update(params, grads, state, hyper)
        for g, (group, group_state) in enumerate(zip(self.param_groups, self.state, strict=True)):
            group_params = group["params"]
            for i, name in enumerate(names[g]):
                group_params[i] = new_params[name]
                if (st := new_state.get(name)) is not None:
                    group_state[i] = st

    def _read_optimizer(self) -> OptimizerSpec:
        """The user's optimizer, read once: its class, parameter groups and static options."""
        if self._base_spec is None:
            ids = {id(p): f"{g}.{i}" for g, group in enumerate(self._other.param_groups) for i, p in enumerate(group["params"])}
            try:
                spec = replace(OptimizerSpec.from_optimizer(self._other, ids), step_hooks=((), ()))  # as higher: none
            except UnsupportedOptimizerError as exc:
                raise UnsupportedOptimizerError(str(exc).replace("unrollc.compile", "unrollc.higher")) from None
            maths = next((_STANDS_FOR[c] for c in type(self).__mro__ if c in _STANDS_FOR), None)
            if maths is not None and not issubclass(spec.cls, maths):
                # register_optim(MyOpt, DifferentiableSGD): higher's recipe to differentiate an optimizer it lacks
                # with another one's update; torch.optim.SGD's step runs with MyOpt's options (missing ones
                # take SGD's defaults), as higher's DifferentiableSGD._update would.
                spec = replace(spec, cls=maths)
            self._base_spec = spec
        return self._base_spec

    def _update_now(self) -> tuple[CompiledUpdate, list[dict[str, Any]]]:
        """The compiled update and hyperparameter tensors for the current options, made again only when an
        option changed (an override, ``group["lr"] = ...``, a tensor written in place or set to require grad).
        Reusing the same hyperparameter tensors from step to step lets the graph's guards skip re-evaluating
        them. Options that can change without becoming another object (a list or dict, a custom optimizer's own
        attributes) are read again at every step, as the compiled step cannot see into them."""
        options = [(k, v, (v._version, v.requires_grad) if isinstance(v, torch.Tensor) else None)
                   for group in self.param_groups for k, v in group.items() if k != "params"]
        last = self._last_update
        if last is not None and len(last[0]) == len(options) and all(
            k == k0 and v is v0 and w == w0 for (k, v, w), (k0, v0, w0) in zip(options, last[0], strict=True)
        ):
            return last[1], last[2]
        spec, hyper = self._spec_now()
        update = CompiledUpdate(spec)
        reusable = not spec.attributes and all(_immutable(v) for _, v, _ in options)
        self._last_update = (options, update, hyper) if reusable else None
        return update, hyper

    def _spec_now(self) -> tuple[OptimizerSpec, list[dict[str, Any]]]:
        """The optimizer spec for the current options (overrides applied) and its hyperparameters as tensors."""
        base = self._read_optimizer()
        statics, hypers = [], []
        for g, group in enumerate(self.param_groups):
            static = dict(base.static[g])
            hyper = {}
            for k, v in group.items():
                if k == "params":
                    continue
                if k in base.hyper[g] or (k not in static and is_hyper_value(v)):
                    hyper[k] = _hyper(k, v)
                elif v is not self._raw[g].get(k):
                    value = _static(k, v, self._raw[g].get(k))
                    if value != self._raw[g].get(k):  # else keep the spec's (normalized) value
                        static[k] = value
            statics.append(tuple(sorted(static.items())))
            hypers.append(hyper)
            lr = hyper.get("lr")
            if isinstance(lr, torch.Tensor) and lr.dim() and not issubclass(base.cls, torch.optim.SGD):
                raise ValueError(
                    f"unrollc.higher: a learning rate per element (shape {tuple(lr.shape)} in group {g}) is supported "
                    f"with torch.optim.SGD (Meta-SGD); {base.cls.__name__} takes one learning rate per parameter "
                    "group: give each parameter its own group and pass one scalar lr per group."
                )
        return replace(base, static=tuple(statics), hyper=tuple(hypers)), hypers

    def _release(self) -> None:
        """Keep the state's values but none of its graph: called when leaving ``innerloop_ctx``."""
        for per_group in self.state:
            for i, st in per_group.items():
                per_group[i] = _utils._recursive_map(st, lambda x: x.detach() if isinstance(x, torch.Tensor) else x)
        for group in self.param_groups:
            group["params"] = [None] * len(group["params"])
        self._released = True

    def write_back(self, opt: torch.optim.Optimizer | None = None) -> None:
        """Copy the optimizer state (moments, step counts, ...) into ``opt`` (default: the optimizer this one
        was made from), so that training can continue from the adapted state (``higher`` has no equivalent).
        Learned hyperparameters are written with :func:`apply_trainable_opt_params`."""
        target = self._other if opt is None else opt
        for g, group in enumerate(target.param_groups):
            for i, p in enumerate(group["params"]):
                st = self.state[g].get(i)
                if st:
                    target.state[p] = {
                        k: v.detach().clone().to(p.device if v.dim() else v.device) if isinstance(v, torch.Tensor) else v
                        for k, v in st.items()
                    }


# higher's arithmetic helpers, for DifferentiableOptimizer subclasses copied from higher's source.
def _add(tensor: torch.Tensor, a1: float | torch.Tensor, a2: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor + a1`` or, with ``a2``, ``tensor + a1 * a2`` (out of place, differentiable)."""
    value, other = (1.0, a1) if a2 is None else (a1, a2)
    return tensor + value * other


def _addcdiv(tensor: torch.Tensor, a1: float | torch.Tensor, a2: torch.Tensor, a3: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor + a1 / a2`` or, with ``a3``, ``tensor + a1 * (a2 / a3)``."""
    value, t1, t2 = (1.0, a1, a2) if a3 is None else (a1, a2, a3)
    return tensor + value * (t1 / t2)


def _addcmul(tensor: torch.Tensor, a1: float | torch.Tensor, a2: torch.Tensor, a3: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor + a1 * a2`` or, with ``a3``, ``tensor + a1 * a2 * a3``."""
    value, t1, t2 = (1.0, a1, a2) if a3 is None else (a1, a2, a3)
    return tensor + (value * t1 * t2)


def _elementwise_lr(lr: torch.Tensor, params: list[torch.Tensor], g: int) -> torch.Tensor:
    """Meta-SGD's learning rate for group ``g``, shaped like its parameter: one that broadcasts to it (one lr
    per row, shape ``(out, 1)``) is expanded, as higher's arithmetic broadcasts it (its gradient is summed)."""
    shapes = {tuple(p.shape) for p in params}
    if len(shapes) == 1:
        (shape,) = shapes
        if tuple(lr.shape) == shape:
            return lr
        try:
            if torch.broadcast_shapes(lr.shape, shape) == shape:
                return lr.expand(shape).contiguous()
        except RuntimeError:
            pass
    raise ValueError(
        f"unrollc.higher: the learning rate of parameter group {g} has shape {tuple(lr.shape)}, which does not "
        f"broadcast to its parameters' shape{'s' if len(shapes) > 1 else ''} {sorted(shapes)}. Meta-SGD takes one "
        "lr per weight element (a tensor shaped like the parameter, or one that broadcasts to it, such as one lr "
        "per row) with one parameter per group: torch.optim.SGD([{'params': [p]} for p in model.parameters()])."
    )


def _as_list(params: Any) -> list[torch.Tensor]:
    """A param group's ``"params"``: one tensor or an iterable of them, as torch.optim accepts."""
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _get_mask_closure(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that zeroes the gradient where ``mask`` is True (and keeps doing so at higher orders)."""

    def closure(grad: torch.Tensor) -> torch.Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:
            grad.register_hook(_get_mask_closure(mask))
        return grad

    return closure


def _maybe_mask(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the gradient of ``tensor`` where ``mask`` is True (higher's guard against NaN from sqrt at 0)."""
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))


def _as_tensor(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v
    t = state_number_tensor(v)  # as the compiled update carries a number it stores
    return v if t is None else t


def _hyper(key: str, v: Any) -> Any:
    """A hyperparameter as a 0-dim floating tensor (or a tuple of them), differentiable if it was."""
    if isinstance(v, (tuple, list)):
        return tuple(_hyper(key, x) for x in v)
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            if key == "lr" and v.is_floating_point():
                return v  # one learning rate per element (Meta-SGD): broadcast against its group's parameter
            raise ValueError(
                f"unrollc.higher: the optimizer option {key!r} must be a scalar (a float or a one-element tensor), "
                f"got a tensor of shape {tuple(v.shape)}; only 'lr' may be a tensor per element (Meta-SGD), with one "
                "parameter group per parameter."
            )
        v = v.reshape(())
        return v if v.is_floating_point() else v.double()
    if isinstance(v, (int, float)):
        return torch.tensor(float(v), dtype=torch.float64)
    raise TypeError(f"unrollc.higher: the optimizer option {key!r} must be a float or a tensor, got {type(v).__name__}.")


def _immutable(value: Any) -> bool:
    """Whether an option can change only by becoming another object (or, a tensor, by its version)."""
    if isinstance(value, tuple):
        return all(_immutable(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device))


def _static(key: str, v: Any, original: Any) -> Any:
    """An overridden non-float option (e.g. ``nesterov`` from :func:`get_trainable_opt_params`) as a Python value."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"unrollc.higher: the optimizer option {key!r} must be a scalar, got shape {tuple(v.shape)}.")
        v = v.item()
    if isinstance(original, bool):
        return bool(v)
    if isinstance(original, int):
        return int(v)
    return tuple(v) if isinstance(v, list) else v


class DifferentiableSGD(DifferentiableOptimizer):
    """A differentiable ``torch.optim.SGD`` (the compiled update; kept for ``higher``'s name)."""


class DifferentiableAdam(DifferentiableOptimizer):
    """A differentiable ``torch.optim.Adam`` (exactly ``torch.optim.Adam``, unlike ``higher``'s)."""


class DifferentiableAdadelta(DifferentiableOptimizer):
    """A differentiable ``torch.optim.Adadelta``."""


class DifferentiableAdagrad(DifferentiableOptimizer):
    """A differentiable ``torch.optim.Adagrad``."""


class DifferentiableAdamax(DifferentiableOptimizer):
    """A differentiable ``torch.optim.Adamax``."""


class DifferentiableASGD(DifferentiableOptimizer):
    """A differentiable ``torch.optim.ASGD``."""


class DifferentiableRMSprop(DifferentiableOptimizer):
    """A differentiable ``torch.optim.RMSprop``."""


class DifferentiableRprop(DifferentiableOptimizer):
    """A differentiable ``torch.optim.Rprop``."""


_opt_mapping: dict[type, type[DifferentiableOptimizer]] = {
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.SGD: DifferentiableSGD,
}


# The update each of higher's optimizer classes stands for: an optimizer of another class given to one of them
# (register_optim(MyOpt, DifferentiableSGD)) is differentiated with that update, as in higher.
_STANDS_FOR: dict[type, type] = {diff: torch_cls for torch_cls, diff in _opt_mapping.items()}


def _diff_type(opt_type: type) -> type[DifferentiableOptimizer]:
    if opt_type in _opt_mapping:
        return _opt_mapping[opt_type]
    if isinstance(opt_type, type) and issubclass(opt_type, torch.optim.Optimizer):
        return DifferentiableOptimizer  # any torch.optim optimizer the core can capture
    raise ValueError(f"Optimizer type {opt_type} not supported by unrollc.higher: expected a torch.optim.Optimizer.")


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[torch.Tensor],
    fmodel: _patch.FunctionalModule | None = None,
    device: torch.device | None = None,
    override: _OverrideType | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    r"""A differentiable version of the existing optimizer ``opt`` over ``reference_params`` (the module's
    ``parameters()``); ``fmodel``, ``device``, ``override`` and ``track_higher_grads`` as in ``higher``.
    Any ``torch.optim`` optimizer works (a type registered with :func:`register_optim` uses its class)."""
    return _diff_type(type(opt))(
        opt, reference_params, fmodel=fmodel, device=device, override=override, track_higher_grads=track_higher_grads, **kwargs
    )


def create_diff_optim(
    opt_type: type,
    opt_kwargs: dict[str, Any] | None = None,
    params: Sequence[Any] | None = None,
    fmodel: _patch.FunctionalModule | None = None,
    device: torch.device | None = None,
    override: _OverrideType | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    r"""A differentiable optimizer of type ``opt_type`` built from ``opt_kwargs`` over ``params`` (weights or
    parameter groups, used for their shapes only) or ``fmodel``'s weights, as in ``higher``."""
    diff_type = _diff_type(opt_type)
    if params is not None:
        params = list(params)
        if params and isinstance(params[0], dict):
            # (higher 0.2.1 applies zeros_like to a group's whole "params" list here and raises TypeError)
            dummy = [{**g, "params": [torch.zeros_like(p, requires_grad=True) for p in _as_list(g["params"])]} for g in params]
            reference = [p for g in dummy for p in g["params"]]
        else:
            dummy = reference = [torch.zeros_like(p, requires_grad=True) for p in params]
    elif fmodel is not None:
        dummy = reference = [torch.zeros_like(p, requires_grad=True) for p in fmodel.parameters()]
    else:
        raise ValueError("Must specify one of fmodel or params in kwargs.")
    opt = opt_type(dummy, **(opt_kwargs or {}))
    return diff_type(
        opt, reference, fmodel=fmodel, device=device, override=override, track_higher_grads=track_higher_grads, **kwargs
    )


def register_optim(optim_type: type, diff_optim_type: type[DifferentiableOptimizer]) -> None:
    r"""Use ``diff_optim_type`` for ``optim_type``: a :class:`DifferentiableOptimizer` subclass with its own
    ``_update``, or one of the classes above, e.g. ``DifferentiableSGD``: then an ``optim_type`` that is not a
    subclass of ``torch.optim.SGD`` is differentiated with ``torch.optim.SGD``'s update and its own options, as
    in ``higher``. Rarely needed: every ``torch.optim`` optimizer, and every subclass of one, works without
    registration (its own ``step()`` is compiled)."""
    _opt_mapping[optim_type] = diff_optim_type


def get_trainable_opt_params(opt: torch.optim.Optimizer, device: torch.device | None = None) -> _OverrideType:
    r"""An override dictionary with a tensor requiring grad for every int/float option (or structure of them)
    of every parameter group of ``opt``, as in ``higher`` (bools count as ints there, and here)."""
    override: _OverrideType = collections.defaultdict(list)

    def to_tensor(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.clone().detach().requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    for group in opt.param_groups:
        for k, v in group.items():
            if k != "params" and all(isinstance(x, (int, float)) for x in _utils.flatten(v)):
                override[k].append(_utils._recursive_map(v, to_tensor))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: _OverrideType) -> None:
    r"""Write learned hyperparameters (an override dictionary) back into ``opt``'s parameter groups."""
    for group, k, value in _per_group(override, opt.param_groups):
        group[k] = _recursive_apply(value, group[k])


def _per_group(override: _OverrideType, groups: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str, Any]]:
    """``(group, option, value)`` for every option of ``override`` and every group: one value serves all groups."""
    if not isinstance(override, dict):
        raise TypeError(
            f"unrollc.higher: expected `override` as a dict {{option: [value]}} (one value, or one per parameter "
            f"group), got {type(override).__name__}."
        )
    for k, v in override.items():
        if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or (isinstance(v, torch.Tensor) and v.dim() == 0):
            raise TypeError(
                f"unrollc.higher: override[{k!r}] must be a list, [value] for every parameter group or one value per "
                f"group (higher's format), got {type(v).__name__}; write {{{k!r}: [value]}}."
            )
        if len(v) != 1 and len(v) != len(groups):
            raise ValueError(
                f"Mismatch between the number of override tensors for optimizer parameter {k} and the number of "
                f"parameter groups: got {len(v)} values for {len(groups)} groups; pass one value or one per group."
            )
        for g, group in enumerate(groups):
            yield group, k, v[0] if len(v) == 1 else v[g]


def _recursive_apply(replacement: Any, target: Any) -> Any:
    if not isinstance(replacement, type(target)):
        if isinstance(replacement, torch.Tensor) and not _utils._is_container(target):
            return type(target)(replacement.item())
        raise ValueError(f"Expected an non-container type for target, but got {type(target)} with value {target}")
    if isinstance(replacement, torch.Tensor) and isinstance(target, torch.Tensor):
        target.data = replacement.data.to(target.device)
        return target
    if isinstance(target, (list, tuple)):
        return type(target)(_recursive_apply(r, t) for r, t in zip(replacement, target, strict=True))
    raise ValueError(f"Couldn't apply replacement of type {type(replacement)} to target of type {type(target)}")
