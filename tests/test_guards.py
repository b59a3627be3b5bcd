"""unrollc/guards.py: a guard's expression, compiled once into a closure, gives the value eager code computes."""

from __future__ import annotations

import torch

from unrollc.guards import Guard, GuardSet, _Call, _compile, _Item, _Leaf


def test_a_compiled_expression_computes_the_eager_value():
    step, beta2 = _Leaf("state:step"), _Leaf("hyper:beta2")
    # RAdam's rho_t = rho_inf - 2 * step * beta2 ** step / (1 - beta2 ** step), with keywords and constants
    power = _Call(torch.pow, (beta2, step), {}, False)
    rho = _Call(torch.sub, (4.0, _Call(torch.div, (_Call(torch.mul, (_Call(torch.mul, (2.0, step), {}, False), power), {}, False),
                                                   _Call(torch.rsub, (power, 1), {}, False)), {"rounding_mode": None}, False)), {}, False)
    env = {"state:step": torch.tensor(3.0, dtype=torch.float64), "hyper:beta2": torch.tensor(0.999, dtype=torch.float64)}
    s, b = env["state:step"], env["hyper:beta2"]
    assert torch.equal(_compile(rho)(env, {}), 4.0 - 2.0 * s * b**s / (1 - b**s))


def test_list_arguments_items_and_in_place_calls():
    a, b = _Leaf("a"), _Leaf("b")
    listed = _Call(torch._foreach_add, ([a, b], 1.5), {}, False)
    env = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    assert _compile(_Item(listed, 1))(env, {}).item() == 3.5
    in_place = _Call(torch.Tensor.add_, (a, 1.0), {}, True)
    assert _compile(in_place)(env, {}).item() == 2.0
    assert env["a"].item() == 1.0  # the leaf is not written: the in-place call works on a copy


def test_a_shared_subexpression_is_computed_once_per_evaluation():
    calls = []

    def counted(x):
        calls.append(1)
        return x * 2

    leaf = _Leaf("x")
    shared = _Call(counted, (leaf,), {}, False)
    both = _compile(_Call(torch.add, (shared, shared), {}, False))
    assert both({"x": torch.tensor(1.0)}, {}).item() == 4.0
    assert len(calls) == 1


def test_a_guard_set_re_evaluates_when_a_leaf_changes():
    guard = Guard(_Call(torch.gt, (_Leaf("state:step"), 5), {}, False), "bool", False)
    guards = GuardSet([guard])
    step = torch.tensor(2.0)
    assert guards.holds({"state:step": step})
    step.add_(4.0)  # in place: the same tensor, a new version
    assert not guards.holds({"state:step": step})
    assert guards.holds({"state:step": torch.tensor(5.0)})


def test_guards_that_differ_only_in_aliased_leaves_are_one():
    def rectified(leaf):
        return Guard(_Call(torch.gt, (_Call(torch.add, (_Leaf(leaf), 1), {}, False), 5), {}, False), "bool", True)

    aliases = {"state:b.step": "state:a.step", "state:c.step": "state:a.step"}
    guards = GuardSet([rectified("state:a.step"), rectified("state:b.step"), rectified("state:c.step")], aliases)
    assert len(guards) == 1 and guards.leaves == ["state:a.step"]
    assert guards.holds({"state:a.step": torch.tensor(6.0)})
    assert not guards.holds({"state:a.step": torch.tensor(3.0)})
    assert len(GuardSet([rectified("state:a.step"), rectified("state:b.step")])) == 2  # without aliases: two leaves
