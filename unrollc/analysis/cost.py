"""The cost model of a memory-bounded unroll: bytes and step evaluations of a checkpoint schedule, predicted.

Four numbers describe a step, all from the step graph without running it on data (``unrollc.analysis.liveness``,
``unrollc.analysis.backward``):

* ``state_bytes``: one carried state — the ``params', buffers', opt_state'`` the step returns (the state after a
  step, so a fresh optimizer's lazily created state is counted);
* ``taped_step_bytes``: what autograd saves for one *taped* step, i.e. with every floating-point param, buffer
  and optimizer-state input requiring grad (as in the checkpointed executor's tape, and in a plain autograd
  unroll after its first step), plus the hyperparameters / batch / meta tensors that require grad;
* ``step_saved_bytes``: the same with only the params (and inputs that require grad) as sources — what
  ``unrollc.analysis.memory.saved_bytes_per_step`` measures for a state;
* ``backward_bytes``: what the backward of one taped step allocates beyond its tape, the gradients it computes
  inside (``unrollc.analysis.backward``: the graph and its backward run on meta tensors; one taped step's bytes
  where a graph cannot run there, listed as ``backward_estimated``);

``grad_bytes``: the meta-gradients the backward leaves, which accumulate while it runs: the ``.grad`` of the
distinct leaf tensors that require grad (the initial weights, a learned ``lr``, meta inputs; from a stepper's
actual inputs, or every parameter input for a bare graph); ``overlap_bytes``: what a taped step saves of its own
input and output states (a weight ``mm`` saves, a momentum buffer a learned ``lr`` multiplies);
and ``flops_per_step``. A schedule's plan (``unrollc.runtime.schedules``) turns them into predictions:
``peak_bytes = (peak_states + W) * state_bytes + peak_taped_steps * tape_bytes + backward_bytes -
overlap_bytes + grad_bytes`` (the stored states, the taped steps — ``tape_bytes``: ``taped_step_bytes`` less
``held_saved_bytes``, what a step saves of the batch, meta and hyperparameter tensors, which the user holds and
which are the same tensors in every step that reads them —, the backward's working set of W states —
``unrollc.runtime.schedules.working_states``: 2 without checkpointing, 3 for every-k, 4 for binomial — and of
one step's backward, and the meta-gradients; without checkpointing the overlap is not subtracted; see
``unrollc.runtime.schedules.peak_bytes``) and
``flops = evaluations * flops_per_step`` (forward evaluations; the backward of the n taped steps is the same for
every schedule and not included). ``CostModel.expressions(policy)`` gives the same as sympy expressions in ``n``.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sympy
import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from ..errors import InternalError
from ..runtime.schedules import N, Binomial, Budget, EveryK, CheckpointLike, Plan, Policy, peak_bytes, resolve_checkpoint
from .backward import backward_working_bytes
from .liveness import StepAnalysis, analyze_step

from ..runtime.state import UnrollState
from ..runtime.stepper import Stepper

__all__ = ["CostExprs", "CostModel", "Prediction", "grad_leaf_bytes"]

_STATE_ROLES = ("param", "buffer", "opt_state")
_HELD_ROLES = ("batch", "meta", "hyper")  # inputs the user holds, the same tensors in every step that reads them
_CACHE: "weakref.WeakKeyDictionary[fx.GraphModule, dict[tuple[frozenset[str], frozenset[str]], CostModel]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Prediction:
    """What an n-step unroll under ``policy`` costs (``resolved``: the concrete schedule the plan implements)."""
    policy: Policy
    resolved: Policy
    n: int
    evaluations: int
    peak_states: int
    peak_taped_steps: int
    peak_bytes: int
    time_steps: int
    flops: int
    working_bytes: int = 0  # the part of peak_bytes that is the backward's working set (states and one step's backward)
    grad_bytes: int = 0     # the part of peak_bytes that is the meta-gradients the backward leaves


class CostExprs(NamedTuple):
    """A schedule's costs as sympy expressions in the symbol ``n`` (``expr.subs("n", 160)`` evaluates one;
    Binomial's use ``revolve_r(s, n)``, which evaluates itself)."""
    evaluations: sympy.Expr
    peak_states: sympy.Expr
    peak_taped_steps: sympy.Expr
    peak_bytes: sympy.Expr


@dataclass(frozen=True)
class CostModel:
    """Bytes and FLOPs of one step, and what they imply for a checkpointed unroll (see the module docstring)."""
    state_bytes: int
    step_saved_bytes: int
    taped_step_bytes: int
    flops_per_step: int
    analysis: StepAnalysis = field(repr=False)  # the per-node liveness analysis the figures come from
    grad_bytes: int = 0
    overlap_bytes: int = 0  # what a taped step saves of its own input and output states (see peak_bytes)
    backward_bytes: int | None = None  # one taped step's backward beyond its tape; given None: taped_step_bytes
    backward_estimated: bool = False   # the graph could not run on meta tensors: backward_bytes is the estimate
    held_saved_bytes: int = 0  # what a taped step saves of the batch, meta and hyperparameter tensors (the user's)

    def __post_init__(self) -> None:
        if self.backward_bytes is None:  # the estimate, so that every reader sees an int
            object.__setattr__(self, "backward_bytes", self.taped_step_bytes)

    @property
    def tape_bytes(self) -> int:
        """The memory one taped step adds: ``taped_step_bytes`` less what it saves of tensors the user holds anyway
        (``held_saved_bytes``: the batch, a learned loss network's weights passed as meta, a learned ``lr``; a
        checkpointed tape saves aliases of them). The predictions count this per taped step."""
        return self.taped_step_bytes - self.held_saved_bytes

    # ------------------------------------------------------------------------------------------- build
    @classmethod
    def from_graph(
        cls, gm: fx.GraphModule, *, requires_grad: frozenset[str] = frozenset(), constant: frozenset[str] = frozenset()
    ) -> "CostModel":
        """From a step graph alone; ``requires_grad`` names extra placeholders that require grad (e.g. ``h_lr``),
        ``constant`` state placeholders a taped (re-run) step takes as constants (step counters, frozen
        parameters). Cached per graph (an unroll under ``Budget`` asks for it every time)."""
        per_graph = _CACHE.setdefault(gm, {})
        key = (frozenset(requires_grad), frozenset(constant))
        if key not in per_graph:
            per_graph[key] = cls._analyze(gm, *key)
        return per_graph[key]

    @classmethod
    def _analyze(cls, gm: fx.GraphModule, requires_grad: frozenset[str], constant: frozenset[str]) -> "CostModel":
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        params = {n.name for n in placeholders if _role(n) == "param"} | set(requires_grad)
        taped = {n.name for n in placeholders if _role(n) in _STATE_ROLES and n.name not in constant}
        taped |= set(requires_grad)
        analysis = analyze_step(gm, requires_grad=params)
        taped_analysis = analyze_step(gm, requires_grad=taped)
        state_inputs = {n.name for n in placeholders if _role(n) in _STATE_ROLES}
        held = {n.name for n in placeholders if _role(n) in _HELD_ROLES}
        backward = backward_working_bytes(gm, frozenset(taped))
        return cls(
            state_bytes=sum(analysis.output_bytes[:-1]),
            step_saved_bytes=analysis.saved_bytes,
            taped_step_bytes=taped_analysis.saved_bytes,
            flops_per_step=analysis.flops,
            analysis=taped_analysis,
            grad_bytes=sum(_nbytes(n) for n in placeholders if n.name in params),
            overlap_bytes=sum(st.nbytes for st in taped_analysis.saved if st.owner in state_inputs or st.returned),
            backward_bytes=backward,  # None: estimated as one taped step (__post_init__)
            backward_estimated=backward is None,
            held_saved_bytes=sum(st.nbytes for st in taped_analysis.saved if st.owner in held),
        )

    @classmethod
    def from_stepper(cls, stepper: "Stepper", state: "UnrollState", batch: Any, *meta: Any) -> "CostModel":
        """The cost model of ``stepper``'s step for this state's and batch's layout.

        Traces the graph for this layout if it is new (``stepper.trace``); no step is run. Inputs of
        ``state``/``batch``/``meta`` that require grad (e.g. a learned ``lr``) are sources of requires_grad,
        as they would be in the unroll; inputs no gradient reaches from ``state`` (step counters, frozen parameters)
        are constants of the taped step, as in the unroll's re-runs. ``grad_bytes`` is exact here: the distinct leaf tensors of ``state``,
        ``batch`` and ``meta`` that require grad (:func:`grad_leaf_bytes`), where :meth:`from_graph`, which
        sees no tensors, counts every parameter input.
        """
        from ..runtime.meta import bind_modules
        from ..runtime.unroll import gradient_free_inputs

        if not isinstance(stepper, Stepper) or not isinstance(state, UnrollState):
            raise TypeError(
                "unrollc.CostModel.from_stepper: expected (stepper, state, batch, *meta) with the Stepper of "
                f"unrollc.compile and its init() state, got {type(stepper).__name__} and {type(state).__name__}; "
                "e.g. CostModel.from_stepper(stepper, stepper.init(), batches[0])."
            )
        bound = bind_modules(meta)
        gm, grad = traced_with_grad_inputs(stepper, state, batch, bound)
        constant = gradient_free_inputs(stepper._last, state)  # noqa: SLF001 - the graph traced just now
        return dataclasses.replace(cls.from_graph(gm, requires_grad=grad, constant=constant),
                                   grad_bytes=grad_leaf_bytes(state, batch, bound))

    # ----------------------------------------------------------------------------------------- predict
    def plan(self, policy: CheckpointLike, n: int) -> Plan:
        """The plan of ``policy`` (a policy object or a ``checkpoint=`` shorthand) for n steps; a ``Budget`` is
        resolved with this model's bytes (``plan.resolved`` is the schedule it picks)."""
        policy = resolve_checkpoint(policy, api="unrollc.CostModel.plan")
        return policy.plan(n, state_bytes=self.state_bytes, step_bytes=self.tape_bytes, grad_bytes=self.grad_bytes,
                           overlap_bytes=self.overlap_bytes, backward_bytes=self.backward_bytes)

    def predict(self, policy: CheckpointLike, n: int) -> Prediction:
        """Evaluations, stored states, taped steps, peak bytes and FLOPs of an n-step unroll under ``policy``."""
        plan = self.plan(policy, n)
        return Prediction(
            policy=plan.policy, resolved=plan.resolved, n=n, evaluations=plan.evaluations,
            peak_states=plan.peak_states, peak_taped_steps=plan.peak_taped_steps,
            peak_bytes=plan.peak_bytes(self.state_bytes, self.tape_bytes, self.grad_bytes, self.overlap_bytes,
                                       self.backward_bytes),
            time_steps=plan.evaluations, flops=plan.evaluations * self.flops_per_step,
            working_bytes=peak_bytes(0, 0, self.state_bytes, self.tape_bytes, policy=plan.resolved,
                                     overlap_bytes=self.overlap_bytes, backward_bytes=self.backward_bytes),
            grad_bytes=self.grad_bytes,
        )

    def expressions(self, policy: Any) -> CostExprs:
        """The policy's costs in ``n``, peak memory in bytes; ``Binomial`` needs ``slots``, ``Budget`` has none."""
        policy = resolve_checkpoint(policy, api="unrollc.CostModel.expressions")
        if isinstance(policy, Budget):
            raise ValueError(
                "unrollc.CostModel.expressions: Budget(...) picks a schedule per n and has no closed form; ask "
                "for the expressions of the schedule it picks: CostModel.plan(Budget(b), n).resolved."
            )
        if isinstance(policy, Binomial) and policy.slots is None:
            raise ValueError(
                "unrollc.CostModel.expressions: Binomial() chooses its number of slots from n, so it has no single "
                "expression in n; give the slots: CostModel.expressions(unrollc.Binomial(slots=8))."
            )
        c = policy.cost_expr()
        peak = peak_bytes(c.peak_states, c.peak_taped_steps, self.state_bytes, self.tape_bytes, self.grad_bytes,
                          policy=policy, overlap_bytes=self.overlap_bytes, backward_bytes=self.backward_bytes)
        return CostExprs(c.evaluations, c.peak_states, c.peak_taped_steps, peak)

    def evaluate(self, policy: CheckpointLike, expr: sympy.Expr, n: int) -> int:
        """``expr`` (one of ``expressions(policy)``) at ``n``, as an int: ``int(expr.subs("n", n))``."""
        resolve_checkpoint(policy, api="unrollc.CostModel.evaluate")
        return int(sympy.sympify(expr).subs(N, n))

    # -------------------------------------------------------------------------------------------- report
    def __str__(self) -> str:
        a = self.analysis
        lines = [
            "unrollc cost model of one step",
            f"  carried state        {_fmt(self.state_bytes)}  (params + buffers + optimizer state)",
            f"  saved for backward   {_fmt(self.taped_step_bytes)} per taped step "
            f"({_fmt(self.step_saved_bytes)} with only the params requiring grad; "
            f"{_fmt(self.held_saved_bytes)} of it the batch, meta and hyperparameter tensors you hold)",
            f"  peak live            {_fmt(a.peak_live_bytes)} without grad, {_fmt(a.peak_live_bytes_taped)} taped",
            f"  step backward        {_fmt(self.backward_bytes)} beyond the tape"
            + (" (estimated as one taped step: the graph cannot run on meta tensors)" if self.backward_estimated else
               " (the gradients computed inside one taped step's backward)"),
            f"  meta-gradients       {_fmt(self.grad_bytes)}  (.grad of the initial weights and of learned inputs)",
            f"  FLOPs                {self.flops_per_step:,} per step evaluation",
            "  largest saved: " + ", ".join(f"{s.owner} {_fmt(s.nbytes)}" for s in a.top_saved(3)),
        ]
        if a.fallback_ops:
            lines.append(f"  no meta kernel (assumed to save all inputs): {', '.join(a.fallback_ops)}")
        lines.append("  schedules (n steps; bytes = (states + W) * state + taped * step + step backward - overlap + "
                     "meta-gradients; W, the working states: 2 without checkpointing, 3 every-k, 4 binomial; "
                     f"overlap {_fmt(self.overlap_bytes)}, what a taped step saves of its input and output states, "
                     "is counted in W with checkpointing):")
        for policy in (None, "sqrt", EveryK(4), Binomial(slots=8)):  # binomial with fixed slots: memory flat in n
            e = self.expressions(policy)
            lines.append(f"    {resolve_checkpoint(policy)!r}: evaluations {e.evaluations}, peak bytes {e.peak_bytes}")
        return "\n".join(lines)


def _role(node: fx.Node) -> str | None:
    info = node.meta.get("unrollc")
    return getattr(info, "role", None)


def traced_with_grad_inputs(
    stepper: "Stepper", state: "UnrollState", batch: Any, meta: tuple
) -> tuple[fx.GraphModule, frozenset[str]]:
    """The step graph for this layout (``stepper.trace``) and the names of its placeholders whose inputs here
    (parameters, a learned ``lr``, batch or meta tensors) require grad."""
    gm = stepper.trace(state, batch, *meta)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    flat = _flat_inputs(stepper, state, batch, meta)
    if len(flat) != len(placeholders):
        raise InternalError(
            f"unrollc.analysis.cost: the step graph has {len(placeholders)} inputs but the state, batch and meta "
            f"give {len(flat)}; this is an unrollc bug, please report it with the model and optimizer."
        )
    return gm, frozenset(p.name for p, t in zip(placeholders, flat, strict=True) if t.requires_grad)


def _flat_inputs(stepper: "Stepper", state: "UnrollState", batch: Any, meta: tuple) -> list[torch.Tensor]:
    """The step graph's inputs, in placeholder order (relies on the Stepper's flattening of its last trace)."""
    from ..runtime.state import hyper_to_groups

    compiled = stepper._last  # noqa: SLF001 - see the report: a public Stepper.flat_inputs would remove this
    if compiled is None:
        raise InternalError("unrollc.analysis.cost: the stepper has no traced step; this is an unrollc bug.")
    groups = hyper_to_groups(state.hyper, len(stepper._spec.hyper))  # noqa: SLF001
    return stepper._flatten(compiled.signature, state, groups, batch, meta)  # noqa: SLF001


def grad_leaf_bytes(*trees: Any) -> int:
    """Bytes of the ``.grad`` a backward can leave on the tensors in ``trees`` (unroll states, batches, meta
    arguments; any pytree): the distinct floating-point leaf tensors that require grad, each counted once."""
    from ..runtime.state import UnrollState, distinct_nbytes

    flat = tree_flatten([(t.params, t.buffers, t.opt_state, t.hyper) if isinstance(t, UnrollState) else t
                         for t in trees])[0]
    return distinct_nbytes(t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf
                           and (t.is_floating_point() or t.is_complex()))


def _nbytes(node: fx.Node) -> int:
    """Bytes of a floating-point placeholder's example tensor (0 for others: they get no gradient)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not (val.is_floating_point() or val.is_complex()):
        return 0
    return val.numel() * val.element_size()


def _fmt(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)
