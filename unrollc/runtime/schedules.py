"""Checkpoint policies for an n-step unroll, and the plans they compile to.

A policy (``NoCheckpoint``, ``EveryK``, ``Sqrt``, ``Binomial``, ``Budget``) is a frozen dataclass: hashable,
comparable, usable as a cache key. ``policy.plan(n)`` turns it into a ``Plan``: the exact sequence of
executor ``actions`` plus the counts that sequence implies, computed without running any step.
``unrollc.runtime.checkpointed.checkpointed_unroll`` executes a plan.

Conventions (the counts every plan reports, and every test checks against the executor):

* ``evaluations`` counts every call of the step function: the forward sweep, the recomputations in the
  backward sweep, and the taped (graph-building) runs. The last step (``Binomial``) or the last segment
  (``EveryK``) is taped in the forward sweep itself and its graph is reused in the backward sweep, so no step
  is run twice needlessly.
* ``peak_states`` counts stored states (checkpoints) alive at once, *including the initial state* ``state0``,
  which the executor keeps anyway. The state being worked on and the states inside a taped graph are not counted.
* ``peak_taped_steps`` is the most steps whose autograd graph is alive at once.

Predicted peak memory (``Plan.peak_bytes``, :func:`peak_bytes`) is
``(peak_states + W) * state_bytes + peak_taped_steps * step_bytes + backward_bytes - overlap + grad_bytes``: the
stored states and taped steps, plus the backward's working set: ``W`` states (:func:`working_states`: 2 without
checkpointing, 3 for ``EveryK``/``Sqrt``, 4 for ``Binomial`` — the gradients w.r.t. a taped step's output and
input states, the unroll's final state, the tape's output and, for revolve, its recomputed input) and what one
step's backward allocates beyond its tape (``backward_bytes``, measured by ``unrollc.analysis.backward``; one
more taped step when not given); minus what a checkpointed tape saves
of its own input and output states, counted among the working states already; plus the meta-gradients the
backward leaves (``grad_bytes``: the ``.grad`` of the initial weights and of learned hyperparameters or meta
inputs). Only ``Budget`` reads the byte counts when planning; the other policies accept and ignore them.

Binomial is Griewank & Walther's "revolve" (ACM TOMS 26(1), 2000). With ``beta(s, r) = C(s + r, s)`` and
``r = min{r : beta(s, r) >= n}``, reversing n steps with s slots (``state0`` is one of them) costs
``p(n, s) = r*n - beta(s + 1, r - 1)`` untaped step evaluations, plus the n taped ones:
``evaluations == n + binomial_extra_steps(n, s)`` exactly (n=100, s=10 -> 322; n=1000, s=20 -> 3747).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import sympy

from unrollc.errors import ArgumentError, InternalError

__all__ = [
    "Advance", "Backprop", "Binomial", "Budget", "CheckpointLike", "CostExpr", "EveryK", "Free", "NoCheckpoint", "Plan", "Policy",
    "Restore", "Return", "Sqrt", "Store", "Tape", "binomial_extra_steps", "resolve_checkpoint",
]

_ALLOWED = (
    "None, an int k >= 1, 'sqrt', 'binomial', unrollc.EveryK(k), unrollc.Sqrt(), unrollc.Binomial(slots=s), "
    "unrollc.Budget(bytes)"
)


# ----------------------------------------------------------------------------------------------- actions
# The executor keeps a *working state* (the state before step ``index``), a dict of stored states, and at most
# one tape (the autograd graph of steps ``start..stop-1``).

@dataclass(frozen=True)
class Store:
    """Store the working state (the state before step ``index``) as a checkpoint."""
    index: int


@dataclass(frozen=True)
class Restore:
    """Make the stored state ``index`` the working state."""
    index: int


@dataclass(frozen=True)
class Free:
    """Drop the stored state ``index``."""
    index: int


@dataclass(frozen=True)
class Advance:
    """Run steps ``start..stop-1`` without building a graph; the working state moves from ``start`` to ``stop``."""
    start: int
    stop: int


@dataclass(frozen=True)
class Tape:
    """Run steps ``start..stop-1`` building their graph, kept until the matching ``Backprop``."""
    start: int
    stop: int


@dataclass(frozen=True)
class Return:
    """The forward sweep ends here: every step ran once; the final state and the losses are returned."""


@dataclass(frozen=True)
class Backprop:
    """Pull the state gradient at ``stop`` (and the loss gradients of the steps) back through the tape to ``start``."""
    start: int
    stop: int


Action = Union[Store, Restore, Free, Advance, Tape, Return, Backprop]


class CostExpr(NamedTuple):
    """A policy's costs as sympy expressions in the symbol ``n`` (number of steps)."""
    evaluations: sympy.Expr
    peak_states: sympy.Expr
    peak_taped_steps: sympy.Expr


# The number of steps in the cost expressions: a plain symbol, so that expr.subs("n", 160) (or Symbol("n")) works.
N = sympy.Symbol("n")


class revolve_r(sympy.Function):  # noqa: N801 - printed in expressions, like sympy's own functions
    """``revolve_r(s, n) = min{r >= 0 : C(s + r, s) >= n}``, the number of sweeps of revolve with s slots over n
    steps: a sympy function that evaluates itself once n is a number (``expr.subs("n", 1000)``)."""

    is_integer = True
    is_nonnegative = True

    @classmethod
    def eval(cls, s: sympy.Expr, n: sympy.Expr) -> sympy.Integer | None:  # noqa: D102 - sympy's protocol
        if s.is_Integer and n.is_Integer and s >= 1 and n >= 1:
            return sympy.Integer(_revolve_r(int(n), int(s)))
        return None


# ----------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """What the executor will do for ``n`` steps, and what it costs (see the module docstring for conventions).

    ``policy`` is the policy that was asked for (e.g. ``Sqrt()`` or ``Budget(...)``); ``resolved`` is the
    concrete schedule the actions implement (``NoCheckpoint()``, ``EveryK(k)`` or ``Binomial(slots=s)``).
    """
    policy: "Policy"
    resolved: "Policy"
    n: int
    evaluations: int
    peak_states: int
    peak_taped_steps: int
    actions: tuple[Action, ...]

    def __repr__(self) -> str:
        # The actions run to thousands for long unrolls; the repr names their count (``plan.actions`` has them).
        return (f"Plan(policy={self.policy!r}, resolved={self.resolved!r}, n={self.n}, "
                f"evaluations={self.evaluations}, peak_states={self.peak_states}, "
                f"peak_taped_steps={self.peak_taped_steps}, actions=<{len(self.actions)} actions>)")

    @property
    def forward_actions(self) -> tuple[Action, ...]:
        """The actions of the forward sweep, up to (excluding) ``Return()``."""
        return self.actions[: self.actions.index(Return())]

    @property
    def backward_actions(self) -> tuple[Action, ...]:
        """The actions of the backward sweep, after ``Return()``."""
        return self.actions[self.actions.index(Return()) + 1:]

    def peak_bytes(self, state_bytes: int, step_bytes: int, grad_bytes: int = 0, overlap_bytes: int = 0,
                   backward_bytes: int | None = None) -> int:
        """Predicted peak memory: stored states, taped steps, the backward's working set and the meta-gradients
        it produces (``grad_bytes``; ``overlap_bytes``, ``backward_bytes``: see :func:`peak_bytes`)."""
        return peak_bytes(self.peak_states, self.peak_taped_steps, state_bytes, step_bytes, grad_bytes,
                          policy=self.resolved, overlap_bytes=overlap_bytes, backward_bytes=backward_bytes)


def peak_bytes(states: Any, taped_steps: Any, state_bytes: Any, step_bytes: Any, grad_bytes: Any = 0, *,
               policy: "Policy | None" = None, overlap_bytes: Any = 0, backward_bytes: Any = None) -> Any:
    """Predicted peak memory of an unroll under ``policy`` (a resolved schedule: ``NoCheckpoint()`` if None) that
    stores ``states`` states (the initial one included) and tapes ``taped_steps`` steps at most (numbers or sympy
    expressions)::

        (states + working_states(policy)) * state_bytes + taped_steps * step_bytes + backward_bytes - overlap
            + grad_bytes

    The working states (see :func:`working_states`) are the states alive besides the stored ones while a taped
    step is backpropagated, the gradients w.r.t. its output and input states among them; ``backward_bytes`` what
    that step's backward allocates beyond its tape, the gradients it computes inside
    (``unrollc.analysis.backward``: about a parameter's worth per layer with SGD on an MLP, 1.5 times the tape on a
    small CNN with BatchNorm, a tenth of it on an LSTM); without it, one more taped step (``step_bytes``), the
    estimate before it was measured. ``grad_bytes`` the meta-gradients the backward leaves (``.grad`` of the
    initial weights and of learned hyperparameters and meta inputs). A checkpointed tape's input and output
    states are counted as working states, so the bytes a taped step saves of its own input and output states
    (``overlap_bytes``, e.g. a weight saved for ``mm``'s backward) are not counted twice; a plain autograd unroll
    keeps no state besides what its steps saved, so there they count."""
    policy = NoCheckpoint() if policy is None else policy
    overlap = 0 if isinstance(policy, NoCheckpoint) else overlap_bytes
    backward = step_bytes if backward_bytes is None else backward_bytes
    return ((states + working_states(policy)) * state_bytes + taped_steps * step_bytes + backward - overlap
            + grad_bytes)


def working_states(policy: "Policy") -> int:
    """States alive besides the stored ones at the backward's peak, by the executor's design: for every schedule the
    gradients w.r.t. a taped step's output and input states (2); with checkpointing (the custom autograd
    Function) also the unroll's final state, which the caller holds, and the tape's output state, minus the
    initial state, which ``states`` counts and the caller owns (+1); with ``Binomial`` also the tape's input,
    recomputed from a stored state rather than restored (+1). Measured with a tensor-level live-bytes tracker on an
    MLP with SGD-momentum: Binomial(2) 6.97 states at the peak, 6 of them these."""
    if isinstance(policy, NoCheckpoint):
        return _WORKING_STATES
    return _WORKING_STATES + (2 if isinstance(policy, Binomial) else 1)


_WORKING_STATES = 2


def _build_plan(policy: "Policy", resolved: "Policy", n: int, actions: list[Action]) -> Plan:
    """Check ``actions`` by simulating them (indices only) and derive the plan's counts from the simulation."""
    def bug(why: str) -> InternalError:
        return InternalError(f"unrollc.runtime.schedules: the plan of {resolved!r} for n={n} is invalid: {why}")
    stored: set[int] = set()
    cur: int | None = 0
    tape: tuple[int, int] | None = None
    grad_at: int | None = None          # index of the state whose gradient is known (None: forward sweep)
    evaluations = peak_states = peak_taped = 0
    for action in actions:
        if isinstance(action, Store):
            if action.index != cur:
                raise bug(f"{action} but the working state is at {cur}")
            stored.add(action.index)
        elif isinstance(action, Restore):
            if action.index not in stored:
                raise bug(f"{action} of a state that is not stored")
            cur = action.index
        elif isinstance(action, Free):
            stored.discard(action.index)
        elif isinstance(action, (Advance, Tape)):
            if action.start != cur or not action.start < action.stop <= n:
                raise bug(f"{action} but the working state is at {cur}")
            if isinstance(action, Tape):
                if tape is not None:
                    raise bug(f"{action} while another tape is alive")
                tape = (action.start, action.stop)
                peak_taped = max(peak_taped, action.stop - action.start)
            evaluations += action.stop - action.start
            cur = action.stop
        elif isinstance(action, Return):
            if grad_at is not None or cur != n or tape is None:
                raise bug("Return() before the forward sweep reached step n with a live tape")
            grad_at = n
        elif isinstance(action, Backprop):
            if grad_at is None or tape != (action.start, action.stop) or action.stop != grad_at:
                raise bug(f"{action} with tape {tape} and the gradient known at {grad_at}")
            grad_at, tape, cur = action.start, None, None
        peak_states = max(peak_states, len(stored))
    if grad_at != 0 or tape is not None:
        raise bug("the backward sweep does not end at state 0")
    return Plan(policy, resolved, n, evaluations, peak_states, peak_taped, tuple(actions))


def _is_int(value: object, minimum: int) -> bool:
    """An integer >= minimum: Python's or numpy's (``numbers.Integral``), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def _require_int(api: str, name: str, value: object, minimum: int, what: str) -> int:
    """``value`` as an int if it is an integer >= minimum (bools refused), else an ``ArgumentError`` (a TypeError
    and a ValueError) naming the API and the fix."""
    if not _is_int(value, minimum):
        raise ArgumentError(f"{api}: {name}={value!r} is not {what}; expected an int {name} >= {minimum}.")
    return int(value)  # type: ignore[call-overload]


def _check_n(api: str, n: object) -> int:
    return _require_int(f"unrollc.{api}.plan", "n", n, 1, "a number of steps")


def _segments_actions(n: int, k: int) -> list[Action]:
    """Checkpoint the start of every k-step segment; tape the last segment in the forward sweep."""
    starts = list(range(0, n, k))
    actions: list[Action] = [Store(0)]
    for j, start in enumerate(starts[:-1]):
        if j > 0:
            actions.append(Store(start))
        actions.append(Advance(start, starts[j + 1]))
    actions += [Tape(starts[-1], n), Return(), Backprop(starts[-1], n)]
    for j in reversed(range(len(starts) - 1)):
        stop = starts[j + 1]
        actions += [Restore(starts[j]), Free(starts[j]), Tape(starts[j], stop), Backprop(starts[j], stop)]
    return actions


# ----------------------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class NoCheckpoint:
    """Keep the graph of every step (a plain autograd loop): n evaluations, n taped steps."""

    def plan(self, n: int, *, state_bytes: int | None = None, step_bytes: int | None = None, grad_bytes: int = 0,
             overlap_bytes: int = 0, backward_bytes: int | None = None) -> Plan:
        """One tape of all n steps (the caller normally runs this as a plain autograd loop)."""
        n = _check_n("NoCheckpoint", n)
        return _build_plan(self, self, n, [Store(0), Tape(0, n), Return(), Backprop(0, n)])

    def cost_expr(self) -> CostExpr:
        """Costs in n: n evaluations, 1 stored state (state0), n taped steps."""
        return CostExpr(N, sympy.Integer(1), N)


@dataclass(frozen=True)
class EveryK:
    """Store the state every ``k`` steps; in the backward sweep, re-run each k-step segment with its graph.

    ``2n - len(last segment)`` evaluations, ``max(1, ceil(n/k) - 1)`` stored states, ``min(k, n)`` taped steps.
    """
    k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _require_int("unrollc.EveryK", "k", self.k, 1, "a segment length"))  # numpy ints too

    def plan(self, n: int, *, state_bytes: int | None = None, step_bytes: int | None = None, grad_bytes: int = 0,
             overlap_bytes: int = 0, backward_bytes: int | None = None) -> Plan:
        """Segments of k steps: forward sweep storing segment starts, then one taped segment at a time."""
        n = _check_n("EveryK", n)
        return _build_plan(self, self, n, _segments_actions(n, self.k))

    def cost_expr(self) -> CostExpr:
        """Costs in n (exact, with sympy's ``ceiling``)."""
        return _every_k_cost(sympy.Integer(self.k))


def _every_k_cost(k: sympy.Expr) -> CostExpr:
    segments = sympy.ceiling(N / k)
    return CostExpr(N + k * (segments - 1), sympy.Max(1, segments - 1), sympy.Min(k, N))


@dataclass(frozen=True)
class Sqrt:
    """``EveryK(ceil(sqrt(n)))``: about sqrt(n) stored states and sqrt(n) taped steps, about 2n evaluations."""

    def plan(self, n: int, *, state_bytes: int | None = None, step_bytes: int | None = None, grad_bytes: int = 0,
             overlap_bytes: int = 0, backward_bytes: int | None = None) -> Plan:
        """The plan of ``EveryK(ceil(sqrt(n)))`` (``plan.resolved`` says which k)."""
        n = _check_n("Sqrt", n)
        resolved = EveryK(math.isqrt(n - 1) + 1)   # ceil(sqrt(n)), exactly
        return _build_plan(self, resolved, n, _segments_actions(n, resolved.k))

    def cost_expr(self) -> CostExpr:
        """Costs in n, with k = ceiling(sqrt(n))."""
        return _every_k_cost(sympy.ceiling(sympy.sqrt(N)))


def _beta(s: int, r: int) -> int:
    return math.comb(s + r, s) if r >= 0 else 0


def _revolve_r(n: int, s: int) -> int:
    """min{r >= 0 : beta(s, r) >= n}, by bisection (beta(s, n - 1) >= beta(1, n - 1) = n, so r < n)."""
    return bisect.bisect_left(range(n), n, key=lambda r: _beta(s, r))


def binomial_extra_steps(n: int, s: int) -> int:
    """p(n, s) = r*n - beta(s+1, r-1): the untaped step evaluations of an optimal reversal of n steps with s slots.

    Together with the n taped evaluations, ``n + p(n, s)`` is the minimum over all checkpoint schedules that
    store at most s states (state0 included) and tape one step at a time (Griewank & Walther 2000).
    """
    _require_int("unrollc.binomial_extra_steps", "n", n, 1, "a number of steps")
    _require_int("unrollc.binomial_extra_steps", "s", s, 1, "a number of slots")
    r = _revolve_r(n, s)
    return r * n - _beta(s + 1, r - 1)


def _revolve_split(length: int, s: int) -> int:
    """An optimal first advance m for reversing ``length`` >= 2 steps with s slots (Griewank 1992, Lemma)."""
    r = _revolve_r(length, s)
    m = min(_beta(s, r - 1), length - _beta(s - 1, r - 1))
    if not max(1, _beta(s, r - 2), length - _beta(s - 1, r)) <= m <= length - 1:
        raise InternalError(f"unrollc.runtime.schedules: no revolve split for {length} steps, {s} slots")
    return m


def _revolve_actions(n: int, s: int) -> list[Action]:
    """Revolve, with an explicit stack (the recursion would be n deep for s = 1).

    ``reverse(start, length, s, at_start)``: reverse steps start..start+length-1 with s slots, the state before
    ``start`` being stored (and the working state if ``at_start``). For length 1: tape the step and backprop.
    Otherwise advance m, store that state if its part is longer than one step, reverse the right part with
    s - 1 slots, then the left part (length m) with s slots, restoring ``start`` first.
    """
    actions: list[Action] = [Store(0)]
    stack: list[tuple[int, int, int, bool] | Action] = [(0, n, s, True)]
    taped_in_forward = False
    while stack:
        item = stack.pop()
        if not isinstance(item, tuple):
            actions.append(item)
            continue
        start, length, slots, at_start = item
        if length == 1:
            if not at_start:
                actions += [Restore(start), Free(start)]
            actions.append(Tape(start, start + 1))
            if not taped_in_forward:
                actions.append(Return())
                taped_in_forward = True
            actions.append(Backprop(start, start + 1))
            continue
        m = _revolve_split(length, slots)
        if not at_start:
            actions.append(Restore(start))
        actions.append(Advance(start, start + m))
        if length - m > 1:
            actions.append(Store(start + m))
        stack.append((start, m, slots, False))                     # left part, done second
        stack.append((start + m, length - m, slots - 1, True))     # right part, done first
    return actions


@dataclass(frozen=True)
class Binomial:
    """Optimal checkpointing with ``slots`` stored states (revolve); n + p(n, slots) evaluations, 1 taped step.

    The peak number of stored states is ``min(slots, max(n - 1, 1))`` (more slots than n - 1 are never used).

    ``slots=None`` picks ``max(2, ceil(log2(n)))`` slots for n steps: memory logarithmic in n, and r (the number
    of sweeps, evaluations <= (r + 1) * n) stays small: r = 4 for n = 1000, r = 7 for n = 10**6.
    """
    slots: int | None = None

    def __post_init__(self) -> None:
        if self.slots is not None:
            slots = _require_int("unrollc.Binomial", "slots", self.slots, 1, "a number of stored states (state0 included)")
            object.__setattr__(self, "slots", slots)

    def slots_for(self, n: int) -> int:
        """The slots used for n steps."""
        return self.slots if self.slots is not None else max(2, (n - 1).bit_length())

    def plan(self, n: int, *, state_bytes: int | None = None, step_bytes: int | None = None, grad_bytes: int = 0,
             overlap_bytes: int = 0, backward_bytes: int | None = None) -> Plan:
        """The revolve schedule: ``evaluations == n + binomial_extra_steps(n, slots)``, ``peak_states <= slots``."""
        n = _check_n("Binomial", n)
        s = self.slots_for(n)
        return _build_plan(self, Binomial(slots=s), n, _revolve_actions(n, s))

    def cost_expr(self) -> CostExpr:
        """Costs in n, with ``r = revolve_r(s, n) = min{r : C(s+r, s) >= n}``; requires ``slots`` to be set."""
        if self.slots is None:
            raise ValueError("unrollc.Binomial.cost_expr: slots=None depends on n; give Binomial(slots=s).")
        s = self.slots
        r = revolve_r(s, N)
        return CostExpr(N + r * N - sympy.binomial(s + r, s + 1), sympy.Min(s, sympy.Max(N - 1, 1)), sympy.Integer(1))


@dataclass(frozen=True)
class Budget:
    """The fewest evaluations among NoCheckpoint / EveryK(k) / Binomial(slots) whose peak memory fits ``bytes``.

    Needs ``state_bytes`` (one stored state) and ``step_bytes`` (the graph of one taped step) at plan time;
    predicted memory is :func:`peak_bytes` (stored states, taped steps and the backward's working set). Ties go to
    less memory.
    """
    bytes: int

    def __post_init__(self) -> None:
        value = self.bytes  # Budget(64e6): a float that is a whole number of bytes is one
        value = int(value) if isinstance(value, float) and value.is_integer() else value
        object.__setattr__(self, "bytes", _require_int("unrollc.Budget", "bytes", value, 1, "a number of bytes"))

    def plan(self, n: int, *, state_bytes: int | None = None, step_bytes: int | None = None,
             grad_bytes: int = 0, overlap_bytes: int = 0, backward_bytes: int | None = None) -> Plan:
        """Choose a schedule from closed-form costs, then build its plan (``grad_bytes``: the meta-gradients the
        backward leaves, the same for every schedule; ``overlap_bytes``: what a taped step saves of its own input
        and output states; ``backward_bytes``: what one step's backward allocates beyond its tape, ``step_bytes``
        if not given; see :func:`peak_bytes`; :class:`unrollc.CostModel` passes all three)."""
        n = _check_n("Budget", n)
        if state_bytes is None or step_bytes is None:
            raise ValueError(
                "unrollc.Budget.plan: a memory budget is planned from the bytes of one stored state and of one taped "
                "step's graph, which come from the step graph; got state_bytes="
                f"{state_bytes!r}, step_bytes={step_bytes!r}. Use unrollc.CostModel.from_stepper(stepper, state, "
                f"batch).plan({self!r}, {n}), pass Budget.plan(n, state_bytes=..., step_bytes=..., grad_bytes=...), or let "
                f"stepper.unroll(state, batches, checkpoint={self!r}) plan it."
            )
        backward_bytes = step_bytes if backward_bytes is None else backward_bytes  # see peak_bytes
        for name, value in (("state_bytes", state_bytes), ("step_bytes", step_bytes), ("grad_bytes", grad_bytes),
                            ("overlap_bytes", overlap_bytes), ("backward_bytes", backward_bytes)):
            _require_int("unrollc.Budget.plan", name, value, 0, "a byte count")
        S, B, G, O = state_bytes, step_bytes, grad_bytes, overlap_bytes

        def fits(states: int, taped: int, policy: Policy) -> int:
            return peak_bytes(states, taped, S, B, G, policy=policy, overlap_bytes=O, backward_bytes=backward_bytes)

        # (evaluations, bytes, policy) for every candidate, from the closed forms the plans are tested against;
        # among Binomial(s), the largest s that fits is the cheapest.
        candidates: list[tuple[int, int, Policy]] = [(n, fits(1, n, NoCheckpoint()), NoCheckpoint())]
        for k in range(1, n + 1):
            segments = -(-n // k)
            candidates.append((n + k * (segments - 1), fits(max(1, segments - 1), min(k, n), EveryK(k)), EveryK(k)))
        s_fit = (self.bytes - fits(0, 1, Binomial(1))) // S if S > 0 else n
        s = max(1, min(s_fit, n - 1))      # Binomial(1) when none fits: the smallest memory of all
        candidates.append((n + binomial_extra_steps(n, s), fits(s, 1, Binomial(slots=s)), Binomial(slots=s)))
        fitting = [c for c in candidates if c[1] <= self.bytes]
        if not fitting:
            need = min(c[1] for c in candidates)
            raise ValueError(
                f"unrollc.Budget: no checkpoint schedule for n={n} steps fits in {self.bytes} bytes with "
                f"state_bytes={S}, step_bytes={B}, backward_bytes={backward_bytes} "
                f"and grad_bytes={G}; the smallest needs {need} bytes (one stored state and one taped step, the "
                f"backward's working set of states and what one step's backward allocates, and the meta-gradients); "
                f"use Budget({need}) or more."
            )
        _, _, chosen = min(fitting, key=lambda c: (c[0], c[1]))
        return dataclasses.replace(chosen.plan(n), policy=self)


Policy = Union[NoCheckpoint, EveryK, Sqrt, Binomial, Budget]
# What ``checkpoint=`` accepts: a policy, or a shorthand (None, k, "sqrt", "binomial"), see resolve_checkpoint.
CheckpointLike = Union[Policy, int, str, None]
_POLICY_TYPES = (NoCheckpoint, EveryK, Sqrt, Binomial, Budget)


def resolve_checkpoint(checkpoint: object, *, api: str = "unrollc.unroll") -> Policy:
    """Turn the user's ``checkpoint=`` option into a policy: None, an int k >= 1, 'sqrt', 'binomial', or a policy."""
    if checkpoint is None:
        return NoCheckpoint()
    if isinstance(checkpoint, _POLICY_TYPES):
        return checkpoint
    if _is_int(checkpoint, 1):
        return EveryK(int(checkpoint))  # type: ignore[call-overload]
    if isinstance(checkpoint, str) and checkpoint in ("sqrt", "binomial"):
        return Sqrt() if checkpoint == "sqrt" else Binomial()
    error = ValueError if isinstance(checkpoint, (str, numbers.Integral)) and not isinstance(checkpoint, bool) else TypeError
    raise error(f"{api}: checkpoint={checkpoint!r} is not a known schedule; expected one of {_ALLOWED}.")
