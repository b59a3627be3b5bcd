"""The optimizer update alone, compiled: ``(params, grads, opt_state, hyper) -> (params', opt_state')``.

:class:`CompiledUpdate` is the core of :mod:`unrollc.higher`'s differentiable optimizers. Where
:func:`unrollc.capture.capture_step` traces a whole step (forward, loss, gradient, update), this traces
only the real ``torch.optim`` ``step()``, with the gradients as inputs, so that the gradient can come
from the user's own eager code (``torch.autograd.grad(loss, params, create_graph=True)``):

1. a :class:`~unrollc.capture.ShadowOptimizer` (the same as :func:`~unrollc.capture.capture_step`'s)
   closes over private copies of the parameters, optimizer state and hyperparameters; the gradients
   are the traced placeholders, set as ``.grad`` before its real ``step()`` runs;
2. the raw graph goes through the same pass pipeline (:data:`unrollc.passes.PIPELINE`): inputs are
   lifted (``p_*, s_*, h_*, g_*``), in-place updates become functional, optimizer detaches go;
3. the result is cached by the layout of the inputs and the optimizer's static options, and reused
   while its guards hold (RAdam's rectification switches on after a few steps: a new trace, never a
   stale branch). The cache is shared by all instances (a new ``innerloop_ctx`` per outer step does
   not re-trace) and bounded.

   The pipeline's ``safe_sqrt`` pass gives the optimizer's ``sqrt`` a zero derivative where its input is
   exactly 0 (Adam's ``exp_avg_sq`` of an always-zero gradient entry), as ``higher`` does by masking.

The graph is a pure function of tensors: autograd differentiates through it like any op.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .capture import NodeInfo, ShadowOptimizer, hyper_leaves, input_layout, trace_with_fallbacks
from .guards import GuardSet, lookup_or_trace
from .optimizer_spec import OptimizerSpec
from .passes import release_examples, run_pipeline
from .runtime.execute import run_graph
from .runtime.state import aliased_state_inputs, guard_aliases

__all__ = ["CompiledUpdate", "UpdateSignature"]

_CACHE_SIZE = 128

State = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class UpdateSignature:
    """Inputs ``params, opt_state (in), hyper, grads``; outputs ``params', opt_state (out)``."""

    params: tuple[str, ...]
    state_in: tuple[tuple[str, str], ...]
    state_out: tuple[tuple[str, str], ...]
    hyper: tuple[str, ...]
    grads: tuple[str, ...]

    @property
    def input_infos(self) -> list[NodeInfo]:
        infos = [NodeInfo("param", n) for n in self.params]
        infos += [NodeInfo("opt_state", f"{p}.{k}") for p, k in self.state_in]
        infos += [NodeInfo("hyper", n) for n in self.hyper]
        return infos + [NodeInfo("grad", n) for n in self.grads]

    @property
    def n_inputs(self) -> int:
        return len(self.params) + len(self.state_in) + len(self.hyper) + len(self.grads)


@dataclass
class _Entry:
    gm: fx.GraphModule
    signature: UpdateSignature
    guards: GuardSet


_CACHE: OrderedDict[Any, list[_Entry]] = OrderedDict()


class CompiledUpdate:
    """``torch.optim``'s update for ``spec``'s class and static options, as a differentiable function.

    Args:
        spec: the optimizer's class, parameter names per group and static options (its ``hyper`` is
            only a default: the hyperparameters are passed to every call).
    """

    def __init__(self, spec: OptimizerSpec) -> None:
        self.spec = spec
        self._cache_spec = spec  # the cache key: the user's optimizer, before any fallback variant
        self._names = tuple(n for names in spec.group_params for n in names)
        self._static = (spec.cls, spec.group_params, spec.static_key)
        self._api = f"unrollc.higher ({spec.cls.__name__} update)"
        self._last_key: Any = None  # the key of the last call and its cache list: most calls repeat it
        self._last_entries: list[_Entry] = []
        self.trace_count = 0
        self.last: _Entry | None = None

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor | None],
        opt_state: Mapping[str, Mapping[str, torch.Tensor]],
        hyper: Sequence[Mapping[str, Any]],
    ) -> tuple[dict[str, torch.Tensor], State]:
        """One update. ``grads`` may lack a name or map it to None (that parameter is skipped, as in
        ``torch.optim``); ``hyper`` holds per group the float hyperparameters as 0-dim tensors (or tuples
        of them). Returns the new parameters (every name of ``params``) and the new optimizer state."""
        grads = {n: g for n, g in grads.items() if g is not None}
        state = {n: dict(st) for n, st in opt_state.items() if st}
        hyper_values = hyper_leaves(hyper, len(hyper) == 1)
        entry = self._lookup(params, grads, state, hyper, hyper_values)
        sig = entry.signature
        flat = [params[n] for n in sig.params]
        flat += [state[n][k] for n, k in sig.state_in]
        flat += [v for _, v in hyper_values]
        flat += [grads[n] for n in sig.grads]
        outs = run_graph(entry.gm, flat)
        new_params = dict(params)
        new_params.update(zip(sig.params, outs[: len(sig.params)], strict=True))
        new_state: State = {}
        for (n, k), v in zip(sig.state_out, outs[len(sig.params) :], strict=True):
            new_state.setdefault(n, {})[k] = v
        return new_params, new_state

    # ------------------------------------------------------------------------------------- internal
    def _key(self, params, grads, state, hyper) -> Any:  # noqa: ANN001
        pg = tuple((input_layout(params[n]), input_layout(grads[n]) if n in grads else None) for n in self._names)
        first: dict[int, int] = {}  # state inputs that are one tensor (shared step counters) share a class
        s = tuple((n, k, input_layout(v), first.setdefault(id(v), len(first)))
                  for n in sorted(state) for k, v in sorted(state[n].items()))
        h = tuple((k, tuple(map(input_layout, v)) if isinstance(v, tuple) else input_layout(v)) for grp in hyper for k, v in sorted(grp.items()))
        # torch.optim makes some scalars in the default dtype (ASGD's eta and mu): a graph traced under another one
        # would compute in the wrong precision
        return (self._static, pg, s, h, torch.get_default_dtype())

    def _env(self, sig: UpdateSignature, state: State, hyper_values: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        env = {f"hyper:{n}": v for n, v in hyper_values}
        env.update({f"state:{n}.{k}": state[n][k] for n, k in sig.state_in if state[n][k].dim() == 0})
        return env

    def _lookup(self, params, grads, state, hyper, hyper_values) -> _Entry:  # noqa: ANN001
        key = self._key(params, grads, state, hyper)
        if key != self._last_key:
            entries = _CACHE.get(key)
            if entries is None:
                entries = _CACHE[key] = []
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
            _CACHE.move_to_end(key)
            self._last_key, self._last_entries = key, entries
        self.last = lookup_or_trace(
            self._last_entries,
            lambda entry: self._env(entry.signature, state, hyper_values),
            lambda: self._trace(params, grads, state, hyper),
            self._api,
        )
        return self.last

    def _trace(self, params, grads, state, hyper) -> _Entry:  # noqa: ANN001
        grad_names = tuple(n for n in self._names if n in grads)
        grad_examples = [grads[n].detach() for n in grad_names]
        api = f"unrollc.higher ({self._cache_spec.cls.__name__} update)"

        def trace(spec: OptimizerSpec) -> tuple[fx.GraphModule, ShadowOptimizer, tuple[dict[int, int], list[torch.Tensor]]]:
            shadow = ShadowOptimizer(spec, {n: params[n] for n in self._names}, state, hyper, api=api)
            constants = shadow.constants()  # before step() updates the copies in place

            def update(*gs: torch.Tensor) -> list[torch.Tensor]:
                new_state = shadow.step(dict(zip(grad_names, gs, strict=True)))
                return list(shadow.params.values()) + new_state

            # copies: tracing runs the step for real, and a custom step may change p.grad in place (p.grad.add_(p)),
            # which on the user's gradients would apply the change twice
            return shadow.trace(update, [g.clone() for g in grad_examples]), shadow, constants

        (gm, shadow, (constants, examples)), self.spec = trace_with_fallbacks(self.spec, trace)
        hyper_names = tuple(n for n, _ in shadow.hyper_leaves)
        sig = UpdateSignature(tuple(shadow.params), shadow.state_in, tuple(shadow.state_out), hyper_names, grad_names)
        gm.meta["unrollc"] = {"signature": sig, "constants": constants, "example_inputs": examples + grad_examples,
                              "aliased_inputs": aliased_state_inputs(sig.state_in, state)}
        gm, _ = run_pipeline(gm)  # includes safe_sqrt: no NaN meta-gradients where exp_avg_sq == 0
        gm.meta["unrollc"].pop("constants", None)
        gm.meta["unrollc"].pop("example_inputs", None)
        release_examples(gm)  # the cached update keeps no copy of the parameters, state or gradients
        self.trace_count += 1
        return _Entry(gm, sig, GuardSet(shadow.tracker.guards, guard_aliases(gm.meta["unrollc"]["aliased_inputs"])))

