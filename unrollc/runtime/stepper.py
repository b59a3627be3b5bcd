"""Stepper: runs the compiled step graph, re-traces when a guard or an input's layout changes."""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.graph_module import _loader as _fx_sources
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import Captured, Signature, capture_step, hyper_leaves, input_layout, trace_with_fallbacks
from ..errors import CaptureError, user_stacklevel
from ..guards import Guard, GuardSet, lookup_or_trace
from ..optimizer_spec import OptimizerSpec, Same
from ..passes import forget_sources, release_examples, run_pipeline
from ..reparam import reparametrized
from ..traced_functions import RestoredGenerators
from .checks import check_model, check_opaque_leaves, meta_buffers_restored_on_failure
from .baked import (Modes, autocast_state, forward_hooks, gradient_hooks, module_code, module_modes, module_values,
                    python_values, restored_attributes,
                    training_modes, warn_numbers, warn_written)
from .execute import instrumented, run_graph
from .initial import READ_AT_CONSTRUCTION, hyper_tensor, mapping, own_state_entry, refused_values, REFUSED_ADVICE, same_shape
from .meta import bind_modules, meta_modules
from .rng import cuda_devices, fork_rng
from .schedules import CheckpointLike, NoCheckpoint, resolve_checkpoint
from .state import UnrollState, aliased_state_inputs, groups_to_hyper, guard_aliases, hyper_to_groups

__all__ = ["Stepper", "CompiledStep"]


def _cannot_bind(fn: Callable[..., Any], *args: Any) -> tuple[inspect.Signature, TypeError] | None:
    """``fn``'s signature and the error of binding ``args`` to it, or None when they bind (or ``fn``, a builtin or
    C callable, has no signature to check)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args)
    except TypeError as exc:
        return signature, exc
    return None


@dataclass
class CompiledStep:
    """One traced and rewritten step graph, valid for one input layout while its guards hold."""

    gm: fx.GraphModule
    signature: Signature
    guards: GuardSet
    graphs: dict[str, fx.GraphModule]


class Stepper:
    """A differentiable training step for ``model``, ``opt`` and ``loss_fn``; build it with
    :func:`unrollc.compile`.

    The step graph is traced on the first :meth:`step` (it depends on the batch's shapes) and cached by
    the layout of its inputs; a new shape, dtype or device, or a change of a value the optimizer branches
    on (see :mod:`unrollc.guards`), traces again.

    Attributes:
        model: the user's module (never changed by steps).
        loss_fn: ``loss_fn(model, batch, *meta) -> scalar tensor``.
        grad_callback: ``grad_callback(grads, *meta) -> grads``, or None.
        trace_count: the number of step graphs traced so far (one grows every outer iteration: a re-trace to fix).
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        loss_fn: Callable[..., torch.Tensor],
        *,
        check: bool = False,
        grad_callback: Callable[..., Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"unrollc.compile: expected an nn.Module as `model`, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise TypeError(
                f"unrollc.compile: expected `loss_fn(model, batch, *meta) -> scalar tensor`, got {type(loss_fn).__name__}."
            )
        if grad_callback is not None and not callable(grad_callback):
            raise TypeError(
                "unrollc.compile: expected `grad_callback(grads, *meta) -> grads`, a function of the dict of gradients "
                f"by parameter name (e.g. unrollc.clip_grad_norm(1.0)), or None; got {type(grad_callback).__name__}."
            )
        check_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.grad_callback = grad_callback
        self.check = check
        named = dict(model.named_parameters())
        self._param_names = tuple(named)
        self._buffer_names = tuple(n for n, _ in model.named_buffers())
        self._param_set, self._buffer_set = frozenset(self._param_names), frozenset(self._buffer_names)
        ids = {id(p): n for n, p in named.items()}
        self._spec = OptimizerSpec.from_optimizer(opt, ids)
        self._static_key = self._spec.static_key  # the optimizer's static options as last read (see init)
        self._compiled_hyper = tuple(frozenset(g) for g in self._spec.hyper)  # a state from before a scheduler's keys
        in_opt = {n for names in self._spec.group_params for n in names}
        self._in_opt = frozenset(in_opt)
        self._model_params = tuple(named.values())
        self._opt = opt  # read (never stepped) by init(): its current hyperparameters and state
        self._param_ids = ids
        self._cache: OrderedDict[Any, list[CompiledStep]] = OrderedDict()  # least recently used first
        self._last: CompiledStep | None = None
        self._pinned_modes: Modes | None = None  # see _modes_pinned
        self._kept: dict[Any, list[CompiledStep]] | None = None  # see _graphs_kept
        self._warned_written: set[str] = set()  # attributes the forward writes, pointed out once (see _lookup)
        self._traced_leaves: list[list[Any]] = []  # the batch and meta leaves of the first _MANY_KEYS traces
        self._volatile: set[tuple[Any, Any]] = set()  # (module path, attribute) the forward writes (see _lookup)
        self._new_keys = 0  # step graphs traced for a new key (layouts and values), see _lookup
        self._recent: deque[dict[str, fx.GraphModule]] = deque()  # the pass graphs of the latest traces (_capture)
        self._evicted: set[int] = set()  # hashes of the cache keys evicted so far (see _lookup)
        self._warned_evicted = False
        self._bindings: dict[tuple[str, str], tuple[int, int]] = {}  # tensor values in keys: (id last traced, re-binds)
        self.trace_count = 0

    # ----------------------------------------------------------------------------------------- state
    def __deepcopy__(self, memo: dict) -> "Stepper":
        raise TypeError(
            "Stepper cannot be copied or pickled: it holds step graphs traced for this model's and this optimizer's "
            "own tensors. Copy the model and the optimizer together, model2, opt2 = copy.deepcopy((model, opt)), and "
            "compile the copy: unrollc.compile(model2, opt2, loss_fn). A state (stepper.init(), unroll's result) "
            "can be copied, pickled and saved."
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        self.__deepcopy__({})

    def __repr__(self) -> str:
        loss = getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__name__)
        traced = sum(len(entries) for entries in self._cache.values())
        return (f"Stepper({type(self.model).__name__} + {self._spec.cls.__name__}, loss_fn={loss}, "
                f"{traced} step graph{'s' if traced != 1 else ''} traced)")

    def init(
        self,
        params: Mapping[str, torch.Tensor] | None = None,
        hyper: Mapping[str, Any] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
    ) -> UnrollState:
        """The state at time 0.

        By default the parameters ARE the model's ``nn.Parameter`` s (so a meta-loss's ``backward()``
        fills ``model.weight.grad``), the buffers and optimizer state are copies of the model's and the
        optimizer's, and the hyperparameters are the optimizer's, as tensors — all as they are when
        ``init`` is called (after eager training steps or an lr scheduler, their current values; a changed
        static option such as ``nesterov`` or ``maximize`` re-traces). Equal scalar
        entries of one name in the optimizer state (the parameters' ``step`` counters) are one shared tensor, so
        the step graph computes what depends on them (Adam's bias corrections) once; a state with separate
        counters works too and gets its own graph.

        Args:
            params: overrides by name (tensors may require grad); unnamed parameters keep the model's.
            hyper: overrides, e.g. ``{"lr": lr_tensor}`` (bare keys apply to every parameter group,
                ``"1.lr"`` to group 1); floats are turned into tensors.
            buffers: overrides by name.
        """
        named = dict(self.model.named_parameters())
        self._check_parameters_unchanged(named)
        p = dict(named)
        for n, v in mapping("params", params).items():
            if n not in named:
                raise KeyError(f"Stepper.init: no parameter named {n!r}; the model has {sorted(named)}.")
            p[n] = same_shape("params", n, v, named[n])
        b = {n: t.detach().clone() for n, t in self.model.named_buffers()}
        for n, v in mapping("buffers", buffers).items():
            if n not in b:
                raise KeyError(f"Stepper.init: no buffer named {n!r}; the model has {sorted(b)}.")
            b[n] = same_shape("buffers", n, v, b[n])
        if len(self._opt.param_groups) != len(self._spec.hyper):
            raise RuntimeError(
                f"Stepper.init: the optimizer has {len(self._opt.param_groups)} parameter groups now but had "
                f"{len(self._spec.hyper)} at unrollc.compile; compile again after add_param_group."
            )
        self._reread_static_options()
        groups = [
            {k: hyper_tensor(k, group.get(k, v)) for k, v in g.items()}
            for g, group in zip(self._spec.hyper, self._opt.param_groups, strict=True)
        ]
        groups = self._override_hyper(groups, mapping("hyper", hyper), "Stepper.init")
        ids = self._param_ids
        counters: dict[tuple, torch.Tensor] = {}
        state = {
            ids[id(q)]: {k: own_state_entry(k, v, counters) for k, v in st.items()}
            for q, st in self._opt.state.items() if id(q) in ids and st
        }
        t0 = max((int(st["step"]) for st in state.values() if "step" in st), default=0)
        return UnrollState(p, b, state, groups_to_hyper(groups), t=t0)

    def _check_parameters_unchanged(self, named: dict[str, torch.Tensor], api: str = "Stepper.init") -> None:
        """The model's parameters are the ones it had at compile, by name and identity: the optimizer holds those,
        so a layer replaced since (``model[2] = nn.Linear(8, 3)``) is one eager ``opt.step()`` would not update."""
        now = {n: id(q) for n, q in named.items()}
        then = {n: id(q) for n, q in zip(self._param_names, self._model_params, strict=True)}
        if now == then:
            return
        changed = sorted(n for n in now.keys() & then.keys() if now[n] != then[n])
        added, removed = sorted(now.keys() - then.keys()), sorted(then.keys() - now.keys())
        what = "; ".join(f"{label}: {names}" for label, names in
                         (("replaced", changed), ("added", added), ("removed", removed)) if names)
        raise RuntimeError(
            f"{api}: the model's parameters are not the ones it had at unrollc.compile ({what}). A layer or "
            "parameter was replaced, added or removed since; the stepper, and the optimizer, were made for the old "
            "ones (eager opt.step() would not update a new one). Build the optimizer for the model as it is now and "
            "call unrollc.compile(model, opt, loss_fn) again."
        )

    def _override_hyper(self, groups: list[dict[str, Any]], hyper: Mapping[str, Any], api: str,
                        check: bool = True) -> list[dict[str, Any]]:
        """``groups`` (per-group hyperparameter tensors) with the user's overrides ``hyper`` applied (bare keys set
        every group, ``"1.lr"`` group 1), each checked against the optimizer's options; ``groups`` is not changed.
        With ``check``, values the optimizer's constructor would refuse (``lr=-0.1``) are pointed out."""
        before, groups = groups, [dict(g) for g in groups]
        overrides = hyper_to_groups(hyper, len(groups), api=api)
        for g, override in zip(groups, overrides, strict=True):
            for k, v in override.items():
                if k not in g:
                    raise KeyError(
                        f"{api}: {self._spec.cls.__name__} has no float hyperparameter {k!r}; it has {sorted(g)}."
                    )
                value = hyper_tensor(k, v, g[k], api=api)
                # an unchanged value without grad is accepted: init(hyper=state.hyper) round-trips
                if k in READ_AT_CONSTRUCTION and (value.requires_grad or float(value) != float(g[k])):
                    raise ValueError(
                        f"{api}: {self._spec.cls.__name__} reads {k!r} only in its constructor (it fills the "
                        "optimizer state), so overriding it here (with another value, or one requiring grad) would "
                        "change nothing; build the optimizer with "
                        f"{k}=... and compile that one."
                    )
                g[k] = value
        if check and (why := self._refused(before, groups)):
            self._warn_refused(f"{api}: {why}")
        return groups

    def _warn_refused(self, what: str, more: str = "") -> None:
        """Point out values the optimizer's constructor refuses (``what``: where and why), at the user's line."""
        warnings.warn(f"{what} is refused by torch.optim.{self._spec.cls.__name__}'s constructor{more}. {REFUSED_ADVICE}",
                      stacklevel=user_stacklevel())

    def _refused(self, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str | None:
        """What the optimizer's constructor would refuse in the hyperparameters ``after`` that it accepts in
        ``before`` (both per group), e.g. ``"lr=-0.1 (Invalid learning rate: -0.1)"``; None if nothing."""
        why = [refused_values(self._spec.cls, static, old, new)
               for static, old, new in zip(self._spec.static, before, after, strict=True)]
        return "; ".join(f"group {i}: {w}" if len(why) > 1 else w for i, w in enumerate(why) if w) or None

    def _step_hypers(self, state: UnrollState, hyper: Any, n: int | None) -> list[dict[str, Any]]:
        """``unroll(hyper=...)``: one override mapping per step -> each step's whole hyperparameter dict (``n``,
        the number of batches, is None for a generator: the plain unroll checks the count as it runs)."""
        if isinstance(hyper, (Mapping, torch.Tensor, str)) or not isinstance(hyper, Iterable):
            raise TypeError(
                "Stepper.unroll: expected `hyper` as one mapping of hyperparameter overrides per step (a list as long "
                f"as batches), e.g. hyper=[{{'lr': lrs[i]}} for i in range(n)], got {type(hyper).__name__}; for "
                "the same values at every step, set them once with stepper.init(hyper=...)."
            )
        hyper = list(hyper)
        if n is not None and len(hyper) != n:
            from .unroll import hyper_count_error

            raise hyper_count_error(len(hyper), n)
        base = hyper_to_groups(state.hyper, len(self._spec.hyper), api="Stepper.unroll")
        steps = []
        for i, h in enumerate(hyper):
            if not isinstance(h, Mapping):
                raise TypeError(
                    f"Stepper.unroll: hyper[{i}] must be a mapping of overrides such as {{'lr': lr_tensor}}, got "
                    f"{type(h).__name__}."
                )
            steps.append(self._override_hyper(base, h, f"Stepper.unroll: hyper[{i}]", check=False))
        refused = [(i, why) for i, g in enumerate(steps) if (why := self._refused(base, g))]
        if refused:
            (i, why), more = refused[0], len(refused) - 1
            self._warn_refused(f"Stepper.unroll: hyper[{i}]: {why}",
                               f" (and {more} later step{'s' if more > 1 else ''})" if more else "")
        return [groups_to_hyper(g) for g in steps]

    def _reread_static_options(self) -> None:
        """Take the optimizer's static options (``nesterov``, ``maximize``, ``amsgrad``, ...) as they are now: one
        changed since compile (or the last init) selects other code in ``step()``, so the graphs traced with the
        old value are dropped, as eager torch.optim would run the new one from its next step. Hyperparameters
        added to the groups since (``initial_lr``, from an lr scheduler made after compile) join the state's."""
        now = OptimizerSpec.from_optimizer(self._opt, self._param_ids)
        if [set(g) for g in now.hyper] != [set(g) for g in self._spec.hyper]:
            # a float option added since compile: "initial_lr", which an lr scheduler made later sets
            self._spec = replace(self._spec, hyper=now.hyper)
        if now.static_key != self._static_key:
            # the user's options replace the traced spec's (a capturable or rewritten variant is found again)
            self._spec = replace(self._spec, static=now.static, attributes=now.attributes, step_hooks=now.step_hooks)
            self._static_key = now.static_key
            self._cache.clear()

    # ------------------------------------------------------------------------------------------ step
    def step(self, state: UnrollState, batch: Any, *meta: Any) -> UnrollState:
        """One differentiable training step: forward, gradient and the optimizer's update."""
        self._check_state("Stepper.step", state)
        return self._step(state, batch, bind_modules(meta))

    def _step(self, state: UnrollState, batch: Any, meta: tuple) -> UnrollState:
        """:meth:`step` for a state and meta already checked and bound (the unroll's per-step path)."""
        groups = hyper_to_groups(state.hyper, len(self._spec.hyper))
        compiled = self._lookup(state, groups, batch, meta)  # traces without drawing from the user's RNG
        flat = self._flatten(compiled.signature, state, groups, batch, meta)
        # Without grad (plain training, the forward sweep of a checkpointed unroll) the graph before
        # safe_sqrt computes the same values with fewer ops, unless the final graph is instrumented (a forward
        # hook or a wrapped forward counting evaluations): then every evaluation goes through it.
        gm = compiled.gm
        if not torch.is_grad_enabled() and not instrumented(gm):
            gm = compiled.graphs.get(_NO_GRAD_GRAPH, gm)
        outs = run_graph(gm, flat)
        return self._unflatten(compiled.signature, state, outs)

    def trace(self, state: UnrollState, batch: Any, *meta: Any) -> fx.GraphModule:
        """The step graph for the layout (shapes, dtypes, devices) of ``state``, ``batch`` and ``meta``,
        traced now if it is new, without running a step (tracing draws no random numbers either).
        :attr:`graph`, :attr:`graphs` and ``unrollc.explain(stepper)`` then show it."""
        self._check_state("Stepper.trace", state)
        meta = bind_modules(meta)
        groups = hyper_to_groups(state.hyper, len(self._spec.hyper))
        return self._lookup(state, groups, batch, meta).gm

    def unroll(
        self,
        state: UnrollState,
        batches: Iterable[Any],
        *meta: Any,
        checkpoint: CheckpointLike = None,
        hyper: Iterable[Mapping[str, Any]] | None = None,
    ) -> UnrollState:
        """``len(batches)`` steps, one per batch.

        Args:
            state: the state to start from (``init()``, or the result of earlier steps).
            batches: one batch per step (a list, a generator, a DataLoader).
            meta: passed to ``loss_fn(model, batch, *meta)`` at every step.
            checkpoint: trades memory for recomputation: ``None`` keeps every step's graph; ``k``, ``"sqrt"``,
                ``"binomial"`` or a policy object (``unrollc.EveryK``, ``Binomial``, ``Budget``).
            hyper: per-step hyperparameters, one mapping of overrides per step, as in ``init(hyper=...)``:
                ``[{"lr": lrs[i]} for i in range(n)]`` is a learned per-step learning rate (``lrs`` requiring grad
                gets its meta-gradient under every schedule). Keys a step does not give keep ``state.hyper``'s
                values; the returned state's ``hyper`` is the last step's.
        """
        from .unroll import read_batches, run_unroll

        self._check_state("Stepper.unroll", state)
        if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
            raise TypeError(
                f"Stepper.unroll: expected `batches`, an iterable with one batch per step (a list, a generator, a "
                f"DataLoader), got {type(batches).__name__}; for n steps on one batch pass [batch] * n, and for a tensor "
                "stacking n batches, batches.unbind(0)."
            )
        policy = resolve_checkpoint(checkpoint, api="Stepper.unroll")
        sized = isinstance(batches, Sized)  # an empty list is a zero-step unroll; an empty iterator may be a mistake
        drew = False
        if not isinstance(policy, NoCheckpoint):
            before = None if isinstance(batches, (list, tuple)) else torch.get_rng_state()
            with self._forward_writes_ignored() as same:
                batches = read_batches(batches, None if before is None else lambda: self._modes(bind_modules(meta)), same)
            drew = before is not None and not torch.equal(before, torch.get_rng_state())
        n = len(batches) if isinstance(batches, Sized) else None  # a generator is counted as the steps run
        hypers = None if hyper is None else self._step_hypers(state, hyper, n)
        try:
            out = run_unroll(self, state, batches, bind_modules(meta), policy, hypers, reading_drew_rng=drew)
        except Exception as exc:
            if (isinstance(batches, tuple) and len(batches) > 1 and all(isinstance(b, torch.Tensor) for b in batches)
                    and len({b.shape for b in batches}) > 1):
                exc.add_note(
                    f"Stepper.unroll: `batches` is a tuple of {len(batches)} tensors of shapes "
                    f"{', '.join(str(tuple(b.shape)) for b in batches)}, read as {len(batches)} batches of one tensor "
                    "each. If it is one batch (x, y), pass a list of batches: stepper.unroll(state, [(x, y)]), or "
                    "[(x, y)] * n for n steps on it."
                )
            raise
        if not out.losses and not sized:
            warnings.warn(
                "Stepper.unroll: `batches` yielded no batch, so no step ran and the state is returned as it was (its "
                "meta-gradients are those of the initial state). An iterator that an earlier unroll exhausted (a "
                "generator, iter(loader)) yields nothing: pass a list, or a new iterator each time.",
                stacklevel=2,
            )
        return out

    def forward(self, state: UnrollState, *args: Any, **kwargs: Any) -> Any:
        """Run the model with the state's weights and buffers (buffers are copied, never updated)."""
        self._check_state("Stepper.forward", state)
        weights = {**state.params, **{n: b.clone() for n, b in state.buffers.items()}}
        with reparametrized(self.model, weights):
            return self.model(*args, **kwargs)

    __call__ = forward

    @property
    def graph(self) -> fx.GraphModule:
        """The final step graph of the most recent step (traced on the first :meth:`step`)."""
        return self._traced("Stepper.graph").gm

    @property
    def graphs(self) -> dict[str, fx.GraphModule]:
        """The graph after each pass (``"captured"``, ``"after lift_inputs"``, ...) of the most recent step's graph,
        kept for the stepper's 8 most recent traces (older ones keep only what their steps run, to bound memory)."""
        graphs = self._traced("Stepper.graphs").graphs
        if "captured" not in graphs:
            raise RuntimeError(
                f"Stepper.graphs: the most recent step ran a step graph traced more than {GRAPHS_KEPT} traces ago, "
                "whose graphs after each pass were released to bound memory (the stepper keeps them for its "
                f"{GRAPHS_KEPT} most recent traces; stepper.graph, the final graph, is kept). To inspect its passes, "
                "step with a fresh stepper (unrollc.compile again) on the same layout."
            )
        return PassGraphs(graphs)

    @property
    def guards(self) -> list[Guard]:
        """The guards of the most recent step graph (values the optimizer branched on)."""
        return list(self._traced("Stepper.guards").guards)

    def _traced(self, api: str) -> CompiledStep:
        """The most recent step's compiled graph, or an error naming ``api`` and the fix if none was traced."""
        if self._last is None:
            raise RuntimeError(
                f"{api}: no step has been traced yet; the graph depends on the batch's shapes, so call "
                "stepper.step(state, batch) once first, or stepper.trace(state, batch), which traces without "
                "running a step."
            )
        return self._last

    # -------------------------------------------------------------------------------------- internal
    def _check_arity(self, batch: Any, meta: tuple) -> None:
        """``loss_fn`` accepts ``(model, batch, *meta)`` and ``grad_callback`` ``(grads, *meta)``: refused early,
        with the contract, when they cannot."""
        if (refused := _cannot_bind(self.loss_fn, self.model, batch, *meta)) is not None:
            signature, exc = refused
            schedule = next((m for m in meta if isinstance(m, (str, int)) and not isinstance(m, bool)), None)
            hint = (f" The meta argument {schedule!r} looks like a checkpoint schedule: `checkpoint` is keyword-only, "
                    f"unroll(state, batches, checkpoint={schedule!r})." if schedule is not None else "")
            fix = ("pass the meta arguments it takes after the batch: stepper.step(state, batch, *meta), "
                   "stepper.unroll(state, batches, *meta)" if "missing" in str(exc) else
                   "take the meta arguments after the batch, e.g. def loss_fn(model, batch, w): x, y = batch; return "
                   "(w * (model(x) - y).pow(2).mean(1)).mean(), or leave them out of step/unroll")
            raise TypeError(
                f"unrollc: loss_fn must accept (model, batch, *meta), here {2 + len(meta)} positional arguments "
                f"(the model, the batch and {len(meta)} meta argument(s) given to step/unroll), but its signature is "
                f"{getattr(self.loss_fn, '__name__', 'loss_fn')}{signature} ({exc}); {fix}.{hint}"
            ) from None
        if self.grad_callback is not None and (refused := _cannot_bind(self.grad_callback, {}, *meta)) is not None:
            signature, exc = refused
            raise TypeError(
                f"unrollc: grad_callback must accept (grads, *meta), here {1 + len(meta)} positional argument(s) (the "
                f"dict of gradients and {len(meta)} meta argument(s) given to step/unroll), but its signature is "
                f"{getattr(self.grad_callback, '__name__', 'grad_callback')}{signature} ({exc}); e.g. "
                "def grad_callback(grads, *meta): ..."
            ) from None

    def _check_state(self, api: str, state: Any) -> None:
        """``state`` is an :class:`UnrollState` of this stepper's model (cheap: names only)."""
        if not isinstance(state, UnrollState):
            raise TypeError(
                f"{api}: expected an UnrollState as `state` (from stepper.init(), step() or unroll()), got "
                f"{type(state).__name__}."
            )
        if state.params.keys() != self._param_set or state.buffers.keys() != self._buffer_set:
            raise ValueError(
                f"{api}: the state's parameters {sorted(state.params)} and buffers {sorted(state.buffers)} are not "
                f"those of this stepper's model ({sorted(self._param_names)}, {sorted(self._buffer_names)}); "
                "start from this stepper's init()."
            )
        self._check_hyper(api, state.hyper)
        if api != "Stepper.forward":
            _check_not_inference(api, state)

    def _check_hyper(self, api: str, hyper: Any) -> None:
        """The state's hyperparameters are this optimizer's, every one a tensor (a state changed with
        ``state.replace(hyper=...)`` may have lost, misspelt or un-tensored one)."""
        if not isinstance(hyper, Mapping):
            raise TypeError(f"{api}: expected `state.hyper` to be a dict of tensors, got {type(hyper).__name__}.")
        groups = hyper_to_groups(hyper, len(self._spec.hyper), api=api)
        for i, (got, want, compiled) in enumerate(zip(groups, self._spec.hyper, self._compiled_hyper, strict=True)):
            where = "" if len(groups) == 1 else f" of parameter group {i}"
            # keys added to the groups after compile (initial_lr, max_lr: an lr scheduler's bookkeeping, which no
            # step reads) may be missing from a state made before
            if got.keys() != want.keys() and not (got.keys() <= want.keys() and compiled <= got.keys()):
                missing, unknown = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
                raise ValueError(
                    f"{api}: the state's hyperparameters{where} are not {self._spec.cls.__name__}'s: "
                    + (f"missing {missing}" if missing else "")
                    + ("; " if missing and unknown else "")
                    + (f"unknown {unknown}" if unknown else "")
                    + f" (expected {sorted(want)}). Change values, keeping every key: "
                    "state.replace(hyper={**state.hyper, 'lr': torch.tensor(0.3)}), or start from stepper.init(hyper=...)."
                )
            for k, v in got.items():
                leaves = v if isinstance(v, tuple) else (v,)
                if not all(isinstance(x, torch.Tensor) for x in leaves):
                    raise TypeError(
                        f"{api}: hyperparameter {k!r}{where} in the state is {v!r}, a {type(v).__name__}; a state holds "
                        f"hyperparameters as tensors: state.replace(hyper={{**state.hyper, {k!r}: torch.tensor(...)}}), "
                        f"or stepper.init(hyper={{{k!r}: ...}}), which converts floats."
                    )

    def _key(self, state: UnrollState, groups: list[dict[str, Any]], batch: Any, meta: tuple) -> Any:
        p = tuple(input_layout(state.params[n]) for n in self._param_names)
        b = tuple(input_layout(state.buffers[n]) for n in self._buffer_names)
        first: dict[int, int] = {}  # optimizer-state inputs that are one tensor (shared step counters) share a class
        s = tuple((n, k, input_layout(v), first.setdefault(id(v), len(first)))
                  for n in sorted(state.opt_state) for k, v in sorted(state.opt_state[n].items()))
        h = tuple((k, input_layout(v) if not isinstance(v, tuple) else tuple(map(input_layout, v))) for g in groups for k, v in sorted(g.items()))
        batch_leaves, batch_spec = tree_flatten(batch)
        meta_leaves, meta_spec = tree_flatten(tuple(meta))
        check_opaque_leaves(batch_leaves, "the batch")
        check_opaque_leaves(meta_leaves, "a meta argument")
        modes = self._modes(meta)
        return (p, b, s, h, batch_spec, tuple(map(input_layout, batch_leaves)), meta_spec, tuple(map(input_layout, meta_leaves)), modes)

    def _guard_env(self, signature: Signature, state: UnrollState, groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        env = {}
        for name, value in hyper_leaves(groups, len(groups) == 1):
            env[f"hyper:{name}"] = value
        for n, k in signature.state_in:
            v = state.opt_state[n][k]
            if v.dim() == 0:
                env[f"state:{n}.{k}"] = v
        return env

    def _lookup(self, state: UnrollState, groups: list[dict[str, Any]], batch: Any, meta: tuple) -> CompiledStep:
        key = self._key(state, groups, batch, meta)
        entries = self._cache.setdefault(key, [])
        if self._kept is not None:  # a checkpointed unroll: its re-runs use the graphs its first sweep ran
            kept = self._kept.setdefault(key, entries)
            if kept is not entries:  # evicted meanwhile (more than _CACHE_SIZE layouts): put them back
                entries = self._cache[key] = kept
        if not entries:
            self._new_keys += 1
            if self._new_keys <= _MANY_KEYS:  # the values of the first traces: which ones changed between them
                self._traced_leaves.append([None if isinstance(x, torch.Tensor) else x for x in tree_flatten((batch, meta))[0]])
            if self._new_keys == _MANY_KEYS:
                warn_numbers(batch, meta, self._new_keys, self._traced_leaves)
            self._note_rebound_tensors(key[-1][2])
            if hash(key) in self._evicted and not self._warned_evicted:
                self._warned_evicted = True
                warnings.warn(
                    f"Stepper.step: tracing again a step graph the stepper had evicted from its cache, which keeps the "
                    f"{_CACHE_SIZE} most recently used (one per batch layout, two for an optimizer whose first step "
                    "creates its state, such as Adam or SGD with momentum). The steps cycle through more layouts "
                    "than that, so graphs are traced again and again (about a second each). Pad or bucket the "
                    "batches to fewer shapes, or use one stepper per group of shapes.", stacklevel=user_stacklevel())
        self._cache.move_to_end(key)
        while len(self._cache) > _CACHE_SIZE:  # a long run over ever new layouts or values keeps only the recent
            if len(self._evicted) > 64 * _CACHE_SIZE:  # bounded: a warning's memory, not the cache's
                self._evicted.clear()
            self._evicted.add(hash(self._cache.popitem(last=False)[0]))

        def trace() -> CompiledStep:
            # Tracing runs the loss and the step for real: random ops (dropout) must not advance the user's
            # generators, or a seeded run would differ between the first unroll and later ones, and a
            # checkpointed unroll's recomputed steps would draw other numbers than the steps they replay.
            # a layer replaced or a parametrization added since compile: refused as init() refuses it
            self._check_parameters_unchanged(dict(self.model.named_parameters()), "Stepper.step")
            modules = meta_modules(meta)
            sources = set(_fx_sources.eval_cache)
            before = python_values(self.model, self.loss_fn, self.grad_callback, modules)
            with fork_rng(cuda_devices(_tensors_of(state.params, state.buffers, batch, meta))), RestoredGenerators():
                with training_modes(self.model, self._pinned_modes, modules), contextlib.ExitStack() as restoring:
                    written = restoring.enter_context(restored_attributes(self.model))
                    meta_written = [restoring.enter_context(restored_attributes(m)) for m in modules]
                    with meta_buffers_restored_on_failure(meta), _outside_torch_func(state, groups, batch, meta) as plain:
                        with self._model_kept_unchanged(), _seeding_recorded() as seeded:
                            compiled = self._capture(*plain)
                        if seeded:
                            _warn_seeded_in_step()
            written |= {f"{type(m).__name__} (meta argument {j}).{name}" for j, (m, names) in
                        enumerate(zip(modules, meta_written, strict=True)) for name in names}
            # Values the forward itself writes (a counter, `self.last_attention = w`) change with every run: as
            # part of the key they would re-trace every step, so they are left out (and stay as traced).
            after = python_values(self.model, self.loss_fn, self.grad_callback, modules)
            self._volatile |= {item[:2] for item in set(before) ^ set(after)}
            # ...and those it wrote that tracing put back (`self.last_out = h`): an eager forward between steps
            # (pseudo-labelling in a generator) re-binds them, which must not re-trace nor count as a change
            self._volatile |= {key for name in written if " (meta argument" not in name
                               and isinstance(_attribute(self.model, key := tuple(name.rpartition(".")[::2])), torch.Tensor)}
            warn_written(written - self._warned_written)
            self._warned_written |= written
            # torch.fx keeps every generated module's source for tracebacks, process-wide and for ever (~0.5 MiB
            # per trace of a small MLP): each graph's goes with the graph, the rest (tracing's own) with the step
            new = set(_fx_sources.eval_cache) - sources
            for gm in (compiled.gm, *compiled.graphs.values()):
                key = getattr(getattr(gm.forward, "__code__", None), "co_filename", None)
                if key in new:
                    new.discard(key)
                    weakref.finalize(gm, forget_sources, (key,))
            weakref.finalize(compiled, forget_sources, tuple(new))
            return compiled

        volatile = len(self._volatile)
        self._last = lookup_or_trace(entries, lambda entry: self._guard_env(entry.signature, state, groups), trace, "Stepper.step")
        if len(self._volatile) != volatile and self._kept is None:  # the trace found attributes the forward writes:
            new_key = self._key(state, groups, batch, meta)  # the key leaves them out from now on, so this one does
            if new_key != key and self._cache.get(key) is entries:
                self._cache[new_key] = self._cache.pop(key)
        return self._last

    def _note_rebound_tensors(self, values: tuple) -> None:
        """Count, per name, the new step graphs traced because a tensor the model or ``loss_fn`` reads by reference
        was re-bound to another (``W = new_weights`` every outer iteration): each traces again (0.1-1 s) and the cache
        keeps the old tensors alive; the third time, the fix is pointed out, once per name."""
        for owner, name, value in values:
            if not (isinstance(value, Same) and isinstance(value.obj, torch.Tensor)):
                continue
            last, count = self._bindings.get((owner, name), (id(value.obj), 0))
            if last != id(value.obj):
                count += 1
                if count == _REBINDS_POINTED_OUT:
                    where = f"loss_fn's variable {name!r}" if owner == "loss_fn" else (
                        f"grad_callback's variable {name!r}" if owner == "grad_callback" else
                        f"the tensor attribute {'.'.join(p for p in ('model', owner, name) if p)}")
                    warnings.warn(
                        f"Stepper.step: {where} was re-bound to a new tensor {count} times; a tensor read by reference "
                        "is part of what a step graph is traced for, so each new one traces a new graph (about a "
                        "second each) and the cached graphs keep the old tensors alive. Update it in place "
                        f"({name}.copy_(new_value)), or pass it to loss_fn as a meta argument "
                        "(stepper.unroll(state, batches, value) with loss_fn(model, batch, value)): an input of one "
                        "graph.", stacklevel=user_stacklevel())
            self._bindings[(owner, name)] = (id(value.obj), count)

    def _modes(self, meta: tuple = ()) -> "Modes":
        """What a step graph is traced for besides its inputs, as it is now: ``module.training`` of every module,
        the trainable parameters (in the optimizer, requiring grad: freezing a layer after compile takes effect,
        as in eager training), the Python values the model and ``loss_fn`` may read (see
        :func:`~unrollc.runtime.baked.python_values`), which the graph holds as constants, and torch's default
        dtype (what ``torch.zeros(3)`` in a forward and ASGD's scalar state are made in), the parameters'
        gradient hooks (``Tensor.register_hook``), which the graph applies to their gradients, and the modules'
        forward hooks, which tracing ran, and code (a layer replaced, a ``forward`` set on an instance); and the same
        for the modules among the (bound) ``meta`` arguments."""
        if self._pinned_modes is not None:
            return self._pinned_modes
        values = tuple(v for v in python_values(self.model, self.loss_fn, self.grad_callback) if v[:2] not in self._volatile)
        modules = list(self.model.modules())
        hooks = (gradient_hooks(zip(self._param_names, self._model_params), "Stepper.step"), forward_hooks(modules),
                 module_code(modules), autocast_state())
        metas = module_modes(meta_modules(meta),
                             lambda j, m: tuple(v for v in module_values(j, m) if v[:2] not in self._volatile))
        return tuple(m.training for m in modules), self._trainable(), values, torch.get_default_dtype(), hooks, metas

    def _trainable(self) -> frozenset[str]:
        """The parameters the optimizer updates: in one of its groups and requiring grad (pinned, if pinned)."""
        if self._pinned_modes is not None:
            return self._pinned_modes[1]
        return frozenset(
            n for n, p in zip(self._param_names, self._model_params, strict=True) if n in self._in_opt and p.requires_grad
        )

    @contextlib.contextmanager
    def _modes_pinned(self, modes: "Modes") -> Iterator[None]:
        """Steps run inside use graphs traced with the model's modules in ``modes`` (train/eval, trainable
        parameters), whatever the model's are now: a checkpointed unroll recomputes steps in the backward pass,
        often after the user called ``model.eval()`` for a validation loss, and must recompute the steps it ran."""
        previous, self._pinned_modes = self._pinned_modes, modes
        try:
            yield
        finally:
            self._pinned_modes = previous

    @contextlib.contextmanager
    def _graphs_kept(self, kept: dict[Any, list[CompiledStep]]) -> Iterator[None]:
        """Steps run inside record the graphs they use in ``kept`` (by cache key), or use those already there: a
        checkpointed unroll re-runs steps in the backward pass, possibly after the cache has evicted their graphs,
        and a re-trace then would bake in the Python values of that moment (a changed ``model.scale``) under the
        key of the values the steps ran with."""
        previous, self._kept = self._kept, kept
        try:
            yield
        finally:
            self._kept = previous

    def _capture(self, state: UnrollState, groups: list[dict[str, Any]], batch: Any, meta: tuple) -> CompiledStep:
        from ..inspect.source import recording_sources

        trainable = self._used(state, batch, meta)
        if not trainable and self._trainable():
            warnings.warn(
                "Stepper.step: the loss loss_fn(model, batch, *meta) returns depends on none of the parameters the "
                "optimizer updates, so the step changes nothing (torch.optim skips parameters without a gradient). "
                "Does loss_fn run another module than the `model` it is given (a copy, a global)? Call model(...) "
                "inside loss_fn.", stacklevel=user_stacklevel())
        args = (state.params, state.buffers, state.opt_state, groups, batch, meta, trainable)

        def trace(spec: OptimizerSpec) -> Captured:
            # Anomaly mode's NaN check reads every traced gradient into Python (a data-dependent bool, refused by
            # tracing); the graph's steps still run under it, where it checks the real tensors.
            with recording_sources(self.model, spec.cls, self.loss_fn, self.grad_callback), \
                    torch.autograd.set_detect_anomaly(False):
                return capture_step(self.model, spec, self.loss_fn, *args, grad_callback=self.grad_callback)

        captured, self._spec = trace_with_fallbacks(self._spec, trace)
        gm = captured.gm
        gm.meta["unrollc"] = {
            "signature": captured.signature,
            "constants": captured.constants,
            "example_inputs": captured.example_inputs,
            "aliased_inputs": aliased_state_inputs(captured.signature.state_in, state.opt_state),
        }
        gm, graphs = run_pipeline(gm, keep=True, check=self.check)
        gm.meta["unrollc"].pop("constants", None)
        gm.meta["unrollc"].pop("example_inputs", None)
        for g in (gm, *graphs.values()):  # no copy of the weights in the cache
            release_examples(g)
        self._recent.append(graphs)
        if len(self._recent) > GRAPHS_KEPT:  # an older trace keeps what its steps run: its final graph, "after cse"
            older = self._recent.popleft()
            for name in [k for k in older if k != _NO_GRAD_GRAPH]:
                del older[name]
        self.trace_count += 1
        self._warn_held_parameters(gm)
        aliases = guard_aliases(gm.meta["unrollc"]["aliased_inputs"])
        return CompiledStep(gm, captured.signature, GuardSet(captured.guards, aliases), graphs)

    def _held_parameters(self, gm: fx.GraphModule) -> dict[int, str]:
        """``{id: name}`` of the model parameters, among those the steps update, that ``gm`` reads as constants: held
        by ``loss_fn`` or ``grad_callback`` (a list of parameters made before compile), not read through the model,
        so every step reads their time-0 values (a frozen parameter held is its own value every step)."""
        trainable = self._trainable()
        names = {id(p): n for n, p in zip(self._param_names, self._model_params, strict=True) if n in trainable}
        return {id(v): names[id(v)] for node in gm.graph.find_nodes(op="get_attr")
                if id(v := getattr(gm, str(node.target), None)) in names}

    def _warn_held_parameters(self, gm: fx.GraphModule) -> None:
        """Point out the parameters :meth:`_held_parameters` finds (a checkpointed unroll refuses them)."""
        held = sorted(set(self._held_parameters(gm).values()))
        if held:
            warnings.warn(
                f"unrollc: the step reads the model's parameter(s) {', '.join(held)} as they are held by loss_fn or "
                "grad_callback (a tensor or list of parameters taken before compile), not through the model: the "
                "step graph holds them as constants, so every step reads their time-0 values, not the step's. Read "
                "them through the model inside the call (model.named_parameters(), model.layer.weight), which gives "
                "the step's weights.", stacklevel=user_stacklevel())

    def _used(self, state: UnrollState, batch: Any, meta: tuple) -> frozenset[str]:
        """Trainable parameters the loss depends on (others get no gradient, as in eager torch.optim)."""
        trainable = self._trainable()
        names = [n for n in self._param_names if n in trainable]
        if not names:
            return frozenset()
        with torch.enable_grad():
            ps = {n: t.detach().clone().requires_grad_(n in trainable) for n, t in state.params.items()}
            bs = {n: t.detach().clone() for n, t in state.buffers.items()}
            b = _detached(batch)
            m = _detached(meta)
            self._check_arity(batch, meta)
            try:
                # restored: the trace runs the forward again, and a counter it keeps must read as in eager's step
                with reparametrized(self.model, {**ps, **bs}), restored_attributes(self.model):
                    loss = self.loss_fn(self.model, b, *m)
            except Exception as exc:
                self._refuse_backward_in_loss_fn(ps, exc)
                exc.add_note(
                    f"unrollc: raised by loss_fn(model, batch, *meta) with batch = {_describe(batch)}"
                    + (f" and meta = {_describe(meta)}" if meta else "")
                    + "; Stepper.step takes one batch, Stepper.unroll a list with one batch per step."
                )
                raise
            self._refuse_backward_in_loss_fn(ps)
            if isinstance(loss, (tuple, list, dict)):
                raise TypeError(
                    f"Stepper.step: loss_fn(model, batch, *meta) must return the loss alone, a scalar tensor, got a "
                    f"{type(loss).__name__} of {len(loss)}; return only the loss, and compute the other outputs "
                    "(logits, accuracy) outside loss_fn, e.g. with stepper.forward(state, x)."
                )
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(
                    "Stepper.step: loss_fn(model, batch, *meta) must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; "
                    "reduce it, e.g. with .mean()."
                )
            if not loss.requires_grad:
                return frozenset()
            grads = torch.autograd.grad(loss, [ps[n] for n in names], allow_unused=True)
        return frozenset(n for n, g in zip(names, grads, strict=True) if g is not None)

    @contextlib.contextmanager
    def _forward_writes_ignored(self) -> Iterator[Callable[["Modes", "Modes"], bool]]:
        """``Stepper._modes`` for reading a checkpointed unroll's batches, without the model attributes an eager
        forward run meanwhile writes (a generator pseudo-labelling with ``model(x)``, whose forward keeps
        ``self.last_out = h``): what the forward writes it writes every call, so it is not a change the steps would
        miss (found in review: refused as one, even before the first trace, which finds such names)."""
        from .baked import _public_attributes

        modules = dict(self.model.named_modules())
        written: set[tuple[str, str]] = set()
        seen: dict[str, dict[str, Any]] = {}

        def before(module: nn.Module, args: Any) -> None:
            seen.update({p: dict(_public_attributes(m)) for p, m in modules.items()})

        def after(module: nn.Module, args: Any, out: Any) -> None:
            for p, m in modules.items():
                now, was = _public_attributes(m), seen.get(p, {})
                written.update((p, k) for k in now.keys() | was.keys() if now.get(k, _ABSENT) is not was.get(k, _ABSENT))

        def same(a: "Modes", b: "Modes") -> bool:  # both without what the forward wrote, as far as now known
            def kept(m: "Modes") -> "Modes":
                return (m[0], m[1], tuple(v for v in m[2] if v[:2] not in written), *m[3:])

            return kept(a) == kept(b)

        handles = [self.model.register_forward_pre_hook(before), self.model.register_forward_hook(after)]
        try:
            yield same
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _model_kept_unchanged(self) -> Iterator[None]:
        """Refuse a trace that wrote into the user's own parameters or buffers (an optimizer step hook that loops over
        the user's optimizer or model it closes over, not the one it is passed: the real weights were clamped and
        torch then failed on a leaf written in place). With step hooks, the tensors are copied first and put back."""
        tensors = {n: t for n, t in (*self.model.named_parameters(), *self.model.named_buffers())
                   if not t.is_inference()}  # an inference tensor has no version (nor can it be written here)
        versions = {n: t._version for n, t in tensors.items()}
        hooks = any(self._spec.step_hooks)
        with torch.no_grad():
            copies = {n: t.detach().clone() for n, t in tensors.items()} if hooks else {}
        failure: BaseException | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below, or as the cause of the refusal
            failure = exc
        changed = [n for n, t in tensors.items() if t._version != versions[n]]
        if changed:
            with torch.no_grad():
                for n in changed:
                    if n in copies:
                        tensors[n].copy_(copies[n])
            raise CaptureError(
                f"Stepper.step: tracing the step wrote into the model's own tensors ({', '.join(changed[:4])}"
                f"{', ...' if len(changed) > 4 else ''}){' (put back)' if copies else ''}. The step runs on copies: "
                "code that reaches the model's tensors another way than through the model it is given (a list of "
                "parameters loss_fn or grad_callback closes over, an optimizer step hook looping over the optimizer "
                "it closes over instead of the one it is passed, `def hook(opt, args, kwargs): for group in "
                "opt.param_groups: ...`) changes the real weights instead of the step's. Use the model, or the "
                "hook's optimizer argument (their weights are the step's while the step runs)."
            ) from failure
        if failure is not None:
            raise failure

    @staticmethod
    def _refuse_backward_in_loss_fn(params: dict[str, torch.Tensor], cause: BaseException | None = None) -> None:
        """``loss.backward()`` (with ``opt.step()``) inside ``loss_fn``, as in the eager loop it came from: torch's
        error ("backward through the graph a second time", from unrollc's code) did not say what to change."""
        if any(p.grad is not None for p in params.values()):
            raise CaptureError(
                "Stepper.step: loss_fn(model, batch, *meta) called backward() (the parameters got a .grad). loss_fn "
                "only computes and returns the loss; the stepper differentiates it and runs the optimizer's step. "
                "Remove loss.backward(), opt.zero_grad() and opt.step() from loss_fn."
            ) from cause

    def _flatten(
        self, sig: Signature, state: UnrollState, groups: list[dict[str, Any]], batch: Any, meta: tuple
    ) -> list[torch.Tensor]:
        flat = [state.params[n] for n in sig.params]
        flat += [state.buffers[n] for n in sig.buffers]
        flat += [state.opt_state[n][k] for n, k in sig.state_in]
        flat += [v for _, v in hyper_leaves(groups, len(groups) == 1)]
        flat += [x for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor)]
        flat += [x for x in tree_flatten(tuple(meta))[0] if isinstance(x, torch.Tensor)]
        return flat

    def _unflatten(self, sig: Signature, state: UnrollState, outs: list[torch.Tensor]) -> UnrollState:
        n_p, n_b = len(sig.params), len(sig.buffers)
        params = dict(zip(sig.params, outs[:n_p], strict=True))
        buffers = dict(zip(sig.buffers, outs[n_p : n_p + n_b], strict=True))
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        for (n, k), v in zip(sig.state_out, outs[n_p + n_b : -1], strict=True):
            opt_state.setdefault(n, {})[k] = v
        return UnrollState(params, buffers, opt_state, state.hyper, t=state.t + 1, loss=outs[-1])


@contextlib.contextmanager
def _seeding_recorded() -> Iterator[list[bool]]:
    """A list that holds True once the body called ``torch.manual_seed`` / ``torch.seed`` (as ``torch.X`` or
    ``torch.random.X``), or changed the default generator's seed another way."""
    import torch.random as torch_random

    calls: list[bool] = []
    patched = [(module, name, getattr(module, name)) for module in (torch, torch_random) for name in ("manual_seed", "seed")]
    tracing = threading.get_ident()

    def recording(original: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == tracing:  # not another thread's seeding meanwhile
                calls.append(True)
            return original(*args, **kwargs)
        return call

    seed = torch.initial_seed()
    for module, name, original in patched:
        setattr(module, name, recording(original))
    try:
        yield calls
    finally:
        for module, name, original in patched:
            setattr(module, name, original)
        if torch.initial_seed() != seed and not calls and threading.active_count() == 1:
            calls.append(True)


def _warn_seeded_in_step() -> None:
    """``torch.manual_seed`` in the forward or ``loss_fn`` (a fixed dropout mask): it runs while a step is traced,
    not when the step graph runs, whose random ops draw on from where the generator is (found in review: another
    trajectory from step 1, without a word)."""
    warnings.warn(
        "Stepper.step: loss_fn or the model's forward called torch.manual_seed (or torch.random.seed). Python code "
        "runs only while a step is traced: the step graph's random ops then draw from torch's generator where it "
        "is, not from a fresh seed each step as in eager training. For the same random numbers every step, draw "
        "them from a torch.Generator seeded each step and passed as a meta argument, or pass the mask itself.",
        stacklevel=user_stacklevel(),
    )


def _describe(tree: Any) -> str:
    """A short description of a batch: its structure with tensors as ``Tensor(shape)``."""
    leaves, spec = tree_flatten(tree)
    shown = [f"Tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves]
    text = str(tree_unflatten(shown, spec)).replace("'", "")
    return text if len(text) <= 200 else text[:197] + "..."


def _check_not_inference(api: str, state: UnrollState) -> None:
    """Steps record autograd graphs and advance tensors by version: refused inside ``torch.inference_mode()`` and
    on a state made there (its tensors are inference tensors), with the fix, as eager training cannot run there
    either. ``Stepper.forward`` is allowed (evaluation)."""
    made_there = any(t.is_inference() for t in (*state.params.values(), *state.buffers.values()))
    if torch.is_inference_mode_enabled() or made_there:
        where = "inside torch.inference_mode()" if not made_there else "on a state made inside torch.inference_mode()"
        raise RuntimeError(
            f"{api}: called {where}; a step records what its meta-gradient needs and advances buffers and optimizer "
            "state, which inference mode (and its inference tensors) forbid, as for eager training. Call "
            "stepper.init() and the steps outside inference_mode (use torch.no_grad() for steps without a graph); "
            "stepper.forward(state, x) may run inside it."
        )


_ABSENT = object()


def _attribute(model: nn.Module, key: tuple[str, str]) -> Any:
    """``model.<prefix>.<name>`` for ``key = (prefix, name)`` (None if there is none)."""
    try:
        return getattr(model.get_submodule(key[0]), key[1], None)
    except AttributeError:
        return None
_CACHE_SIZE = 64  # step graphs kept per stepper (layouts x guard outcomes x values)
GRAPHS_KEPT = 8  # traces whose graphs after every pass are kept (stepper.graphs); older ones keep _NO_GRAD_GRAPH
_NO_GRAD_GRAPH = "after cse"  # what steps without grad run (see Stepper._step)
_REBINDS_POINTED_OUT = 3  # new graphs traced for one re-bound tensor before the fix is pointed out
_MANY_KEYS = 8  # traces for new keys after which Python numbers among the inputs are pointed out


class PassGraphs(dict):
    """``Stepper.graphs``: a dict whose missing keys are reported with the keys it has. Its graphs generate their
    Python code when first read from it (``passes.LazyGraphModule``: most are never read)."""

    def __getitem__(self, key: Any) -> fx.GraphModule:
        gm = super().__getitem__(key)
        _LazyGraphModule.force_recompile(gm)  # gm.forward is the generated code, for inspect.getsource and tracebacks
        return gm

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> Any:
        return [self[k] for k in self]

    def items(self) -> Any:
        return [(k, self[k]) for k in self]

    def __missing__(self, key: Any) -> fx.GraphModule:
        raise KeyError(
            f"Stepper.graphs: no graph {key!r}; the keys are {list(self)} (one per pass of unrollc.passes.PIPELINE)."
        )


@contextlib.contextmanager
def _outside_torch_func(state: UnrollState, *trees: Any) -> Iterator[tuple[Any, ...]]:
    """``(state, *trees)`` for tracing a step inside a ``torch.func`` transform: its tensors unwrapped from the
    transforms' wrappers (one plain tensor per wrapper, so that inputs that are one tensor stay one; requiring
    grad where the wrapper does; under ``vmap`` the first entry of the batch), with the transforms switched off
    meanwhile. Tracing needs plain tensors and autograd (``requires_grad_``, ``autograd.grad``); the graph it makes
    then runs under the transform like any ATen ops, its guards checked on the transform's values (a guard on a
    value that differs across a vmap batch fails there, as Python control flow on one does). Outside a transform,
    the inputs as they are."""
    from torch._C import _functorch
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    from torch.utils._pytree import tree_map_only

    if _functorch.peek_interpreter_stack() is None:
        yield (state, *trees)
        return
    plain: dict[int, torch.Tensor] = {}

    def unwrap(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in plain:
            u = t
            while _functorch.is_functorch_wrapped_tensor(u):
                if _functorch.is_batchedtensor(u):  # vmap: the first entry, whose shape is the logical one
                    u, dim = _functorch._unwrap_batched(u, _functorch.maybe_get_level(u))
                    u = u if dim is None else u.select(dim, 0)
                else:
                    u = _functorch.get_unwrapped(u)
            plain[id(t)] = u.detach().requires_grad_(t.requires_grad) if u.requires_grad != t.requires_grad else u
        return plain[id(t)]

    with temporarily_clear_interpreter_stack():
        fields = (state.params, state.buffers, state.opt_state, state.hyper, state.loss)
        params, buffers, opt_state, hyper, loss = tree_map_only(torch.Tensor, unwrap, fields)
        yield (replace(state, params=params, buffers=buffers, opt_state=opt_state, hyper=hyper, loss=loss),
               *tree_map_only(torch.Tensor, unwrap, trees))


def _detached(tree: Any) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def _tensors_of(*trees: Any) -> list[torch.Tensor]:
    """The tensors in ``trees`` (a state's dicts, a batch, meta)."""
    return [x for x in tree_flatten(trees)[0] if isinstance(x, torch.Tensor)]
