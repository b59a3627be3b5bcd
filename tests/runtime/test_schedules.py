"""Checkpoint policies: plan counts against the revolve formula, a brute-force optimum, and closed forms."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from unrollc.runtime.schedules import (
    Advance, Binomial, Budget, EveryK, NoCheckpoint, Plan, Return, Sqrt, Tape, binomial_extra_steps,
    resolve_checkpoint,
)

ALLOWED = (
    "expected one of None, an int k >= 1, 'sqrt', 'binomial', unrollc.EveryK(k), unrollc.Sqrt(), "
    "unrollc.Binomial(slots=s), unrollc.Budget(bytes)."
)


@lru_cache(maxsize=None)
def optimal_untaped(length: int, slots: int) -> float:
    """Fewest untaped step evaluations to reverse ``length`` steps with ``slots`` stored states, by brute force.

    The state before the first step is stored (one slot). Reversing one step costs nothing (tape it from the
    working state); otherwise try every first advance m: the state reached is stored (a slot of the right part)
    and the right part is reversed with one slot fewer, then the left part with all slots.
    """
    if length == 1:
        return 0
    if slots == 0:
        return math.inf
    return min(m + optimal_untaped(length - m, slots - 1) + optimal_untaped(m, slots) for m in range(1, length))


def test_reference_numbers() -> None:
    assert binomial_extra_steps(100, 10) == 222
    assert binomial_extra_steps(1000, 20) == 2747
    assert Binomial(slots=10).plan(100).evaluations == 100 + 222
    plan = Binomial(slots=20).plan(1000)
    assert (plan.evaluations, plan.peak_states, plan.peak_taped_steps) == (1000 + 2747, 20, 1)


@pytest.mark.parametrize("slots", range(1, 7))
def test_formula_and_plan_are_optimal(slots: int) -> None:
    for n in range(1, 41):
        p = binomial_extra_steps(n, slots)
        assert p == optimal_untaped(n, slots), (n, slots)
        plan = Binomial(slots=slots).plan(n)
        assert plan.evaluations == n + p
        assert plan.peak_states == min(slots, max(n - 1, 1))
        assert plan.peak_taped_steps == 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), slots=st.integers(1, 30))
def test_binomial_plan_hits_the_formula(n: int, slots: int) -> None:
    plan = Binomial(slots=slots).plan(n)
    assert plan.evaluations == n + binomial_extra_steps(n, slots)
    assert plan.peak_states <= slots
    assert plan.resolved == Binomial(slots=slots)


def test_binomial_default_slots() -> None:
    assert Binomial().slots_for(1) == 2
    assert Binomial().slots_for(1000) == 10
    assert Binomial().plan(1000).resolved == Binomial(slots=10)


def test_binomial_cost_expr() -> None:
    cost = Binomial(slots=10).cost_expr()
    assert cost.evaluations.free_symbols == {sympy.Symbol("n")}  # r is revolve_r(10, n), a function of n
    assert cost.evaluations.subs("n", 100) == 322  # DESIGN.md: n=100, s=10 -> p=222
    assert Binomial(slots=20).cost_expr().evaluations.subs(sympy.Symbol("n"), 1000) == 1000 + 2747
    for steps in (1, 2, 3, 9, 11, 100, 4321):  # more slots than n - 1 are never used
        assert cost.peak_states.subs("n", steps) == Binomial(slots=10).plan(steps).peak_states
        assert cost.evaluations.subs("n", steps) == Binomial(slots=10).plan(steps).evaluations
    with pytest.raises(ValueError, match="give Binomial"):
        Binomial().cost_expr()


def every_k_counts(n: int, k: int) -> tuple[int, int, int]:
    """Evaluations, stored states, taped steps of EveryK(k), counted directly."""
    starts = list(range(0, n, k))
    last = n - starts[-1]
    return 2 * n - last, max(1, len(starts) - 1), min(k, n)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 50])
def test_every_k_counts_and_cost_expr(k: int) -> None:
    cost = EveryK(k).cost_expr()
    n_sym = sympy.Symbol("n")
    for n in range(1, 60):
        plan = EveryK(k).plan(n)
        assert (plan.evaluations, plan.peak_states, plan.peak_taped_steps) == every_k_counts(n, k)
        assert tuple(int(e.subs(n_sym, n)) for e in cost) == every_k_counts(n, k)
        assert sum(a.stop - a.start for a in plan.forward_actions if isinstance(a, (Advance, Tape))) == n


def test_sqrt_is_every_ceil_sqrt_n() -> None:
    n_sym = sympy.Symbol("n")
    for n, k in [(1, 1), (4, 2), (10, 4), (16, 4), (17, 5), (100, 10)]:
        plan = Sqrt().plan(n)
        assert plan.policy == Sqrt() and plan.resolved == EveryK(k)
        assert plan.actions == EveryK(k).plan(n).actions
        assert int(Sqrt().cost_expr().evaluations.subs(n_sym, n)) == plan.evaluations


def test_no_checkpoint() -> None:
    plan = NoCheckpoint().plan(9)
    assert (plan.evaluations, plan.peak_states, plan.peak_taped_steps) == (9, 1, 9)
    assert NoCheckpoint().cost_expr().evaluations == sympy.Symbol("n")


def test_actions_split_at_return() -> None:
    plan = Binomial(slots=3).plan(5)
    assert plan.actions.count(Return()) == 1
    assert plan.forward_actions + (Return(),) + plan.backward_actions == plan.actions


def candidate_plans(n: int) -> list[Plan]:
    return [NoCheckpoint().plan(n), *(EveryK(k).plan(n) for k in range(1, n + 1)),
            *(Binomial(slots=s).plan(n) for s in range(1, n + 1))]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), state_bytes=st.integers(0, 50), step_bytes=st.integers(0, 50),
       grad_bytes=st.integers(0, 50), backward_bytes=st.none() | st.integers(0, 80), budget=st.integers(1, 2000))
def test_budget_picks_the_cheapest_fitting_plan(n: int, state_bytes: int, step_bytes: int, grad_bytes: int,
                                                backward_bytes: int | None, budget: int) -> None:
    sizes = {"state_bytes": state_bytes, "step_bytes": step_bytes, "grad_bytes": grad_bytes,
             "backward_bytes": backward_bytes}
    fitting = [p for p in candidate_plans(n)
               if p.peak_bytes(state_bytes, step_bytes, grad_bytes, backward_bytes=backward_bytes) <= budget]
    if not fitting:
        with pytest.raises(ValueError, match="no checkpoint schedule"):
            Budget(budget).plan(n, **sizes)
        return
    plan = Budget(budget).plan(n, **sizes)
    assert plan.policy == Budget(budget)
    assert plan.peak_bytes(state_bytes, step_bytes, grad_bytes, backward_bytes=backward_bytes) <= budget
    assert plan.evaluations == min(p.evaluations for p in fitting)


def test_budget_examples_and_errors() -> None:
    assert Budget(10**9).plan(100, state_bytes=1000, step_bytes=5000).resolved == NoCheckpoint()
    plan = Budget(30_000).plan(100, state_bytes=1000, step_bytes=5000)
    # 16 slots, one taped step and the backward's working set (revolve's 4 states, one step): 20 * 1000 + 2 * 5000
    assert plan.resolved == Binomial(slots=16) and plan.peak_bytes(1000, 5000) == 30_000
    with pytest.raises(ValueError, match=r"the smallest needs 15000 bytes .* use Budget\(15000\) or more"):
        Budget(14_999).plan(100, state_bytes=1000, step_bytes=5000)
    # the meta-gradients the backward leaves take room from the stored states: 2500 bytes cost 3 slots
    plan = Budget(30_000).plan(100, state_bytes=1000, step_bytes=5000, grad_bytes=2500)
    assert plan.resolved == Binomial(slots=13) and plan.peak_bytes(1000, 5000, 2500) == 29_500
    with pytest.raises(ValueError, match=r"grad_bytes=500; the smallest needs 15500 bytes"):
        Budget(15_000).plan(100, state_bytes=1000, step_bytes=5000, grad_bytes=500)
    # what a taped step saves of its own input and output states is counted among the working states: 2000 bytes
    # of it free 2 slots (with checkpointing only)
    plan = Budget(30_000).plan(100, state_bytes=1000, step_bytes=5000, overlap_bytes=2000)
    assert plan.resolved == Binomial(slots=18) and plan.peak_bytes(1000, 5000, 0, 2000) == 30_000
    # a step's backward measured at 1000 bytes beyond its tape, not estimated as one more taped step (5000):
    # 4 more slots; the error names both
    plan = Budget(30_000).plan(100, state_bytes=1000, step_bytes=5000, backward_bytes=1000)
    assert plan.resolved == Binomial(slots=20) and plan.peak_bytes(1000, 5000, backward_bytes=1000) == 30_000
    with pytest.raises(ValueError, match=r"step_bytes=5000, backward_bytes=1000 and grad_bytes=0; the smallest needs 11000"):
        Budget(10_999).plan(100, state_bytes=1000, step_bytes=5000, backward_bytes=1000)
    with pytest.raises(ValueError, match=r"unrollc.Budget.plan: a memory budget is planned from the bytes .* unrollc.CostModel.from_stepper"):
        Budget(5999).plan(100)


@pytest.mark.parametrize("value, expected", [
    (None, NoCheckpoint()), (1, EveryK(1)), (5, EveryK(5)), ("sqrt", Sqrt()), ("binomial", Binomial()),
    (Binomial(slots=3), Binomial(slots=3)), (Budget(10), Budget(10)), (EveryK(2), EveryK(2)),
    (np.int64(4), EveryK(4)),  # an integer from numpy (e.g. int(np.sqrt(n)) forgotten) is an int
])
def test_resolve_checkpoint(value: object, expected: object) -> None:
    assert resolve_checkpoint(value) == expected


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-3, ValueError), ("foo", ValueError), ("SQRT", ValueError),
    (True, TypeError), (2.0, TypeError), (object, TypeError), ([3], TypeError),
])
def test_resolve_checkpoint_refuses(value: object, error: type) -> None:
    with pytest.raises(error) as info:
        resolve_checkpoint(value)
    assert str(info.value) == f"unrollc.unroll: checkpoint={value!r} is not a known schedule; {ALLOWED}"


@pytest.mark.parametrize("make, message", [
    (lambda: EveryK(0), "unrollc.EveryK: k=0 is not a segment length; expected an int k >= 1."),
    (lambda: EveryK(True), "unrollc.EveryK: k=True"),
    (lambda: Binomial(slots=0), "unrollc.Binomial: slots=0"),
    (lambda: Budget(0), "unrollc.Budget: bytes=0"),
    (lambda: Sqrt().plan(0), "unrollc.Sqrt.plan: n=0 is not a number of steps"),
    (lambda: binomial_extra_steps(10, 0), "unrollc.binomial_extra_steps: s=0"),
])
def test_bad_arguments(make, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_whole_numbers_given_otherwise_are_ints() -> None:
    """Budget(64e6) is 64 MB (found in review: refused); numpy integers become ints (they showed in reprs)."""
    assert Budget(64e6) == Budget(64_000_000) and type(Budget(64e6).bytes) is int
    assert repr(EveryK(np.int64(3))) == "EveryK(k=3)" and type(Binomial(slots=np.int32(4)).slots) is int
    with pytest.raises(ValueError, match=r"^unrollc.Budget: bytes=1.5 is not a number of bytes"):
        Budget(1.5)


def test_policies_are_hashable_values() -> None:
    assert len({EveryK(2), EveryK(2), Sqrt(), Sqrt(), Binomial(), Binomial(slots=None), Budget(5)}) == 4
    assert hash(Binomial(slots=4).plan(9)) == hash(Binomial(slots=4).plan(9))


def test_plan_repr_counts_its_actions_instead_of_listing_them() -> None:
    plan = Binomial(slots=10).plan(100)
    text = repr(plan)
    assert "evaluations=322" in text and "peak_states=10" in text
    assert f"actions=<{len(plan.actions)} actions>" in text and "Advance(" not in text
