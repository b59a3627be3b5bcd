"""checkpoint=unrollc.Budget(bytes): the cheapest schedule whose predicted peak fits, same gradients."""

import pytest
import torch
from torch import nn

import unrollc
from unrollc.analysis.cost import CostModel
from unrollc.runtime.unroll import plan_unroll


def test_budget_picks_a_fitting_plan_and_keeps_the_gradient(float64):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batches = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(24)]
    state = stepper.init()
    cost = CostModel.from_stepper(stepper, state, batches[0])
    everything = cost.predict(unrollc.NoCheckpoint(), 24).peak_bytes
    budget = unrollc.Budget(everything // 3)
    plan = plan_unroll(stepper, state, batches, (), budget)
    assert cost.predict(plan.resolved, 24).peak_bytes <= everything // 3
    assert plan.evaluations > 24  # it had to recompute

    def grad(checkpoint):
        model.zero_grad()
        final = stepper.unroll(stepper.init(), batches, checkpoint=checkpoint)
        stepper.forward(final, batches[0][0]).sum().backward()
        return model[0].weight.grad.clone()

    assert torch.allclose(grad(budget), grad(None), rtol=1e-10, atol=0)


@pytest.mark.parametrize("dropout", [False, True])
def test_a_budget_counts_the_generator_state_kept_with_each_stored_state(dropout):
    """A step that draws random numbers (dropout) keeps the CPU generator's state (5056 bytes) with every stored
    state, to replay the draws: a Budget counts it; a step that draws nothing keeps none, and its plan is the cost
    model's."""
    from unrollc.runtime.rng import stored_rng_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.2) if dropout else nn.Identity(), nn.Tanh(), nn.Linear(64, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batches = [(torch.randn(8, 32), torch.randn(8, 1)) for _ in range(60)]
    state = stepper.init()
    rng = stored_rng_bytes([stepper.trace(state, batches[0])])
    assert rng == (torch.get_rng_state().numel() if dropout else 0)
    cost = CostModel.from_stepper(stepper, state, batches[0])
    budget = cost.predict(unrollc.Binomial(slots=8), 60).peak_bytes
    plan = plan_unroll(stepper, state, batches, (), unrollc.Budget(budget))
    with_rng = CostModel(**{**vars(cost), "state_bytes": cost.state_bytes + rng})
    assert with_rng.predict(plan.resolved, 60).peak_bytes <= budget
    assert (plan.resolved == cost.plan(unrollc.Budget(budget), 60).resolved) != dropout


def test_budget_runs_exactly_its_plan():
    """Choosing the schedule (the cost model reads the step graph) runs no step of its own."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batches = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(20)]
    cost = CostModel.from_stepper(stepper, stepper.init(), batches[0])  # a fresh stepper: traces, runs nothing
    budget = unrollc.Budget(cost.predict(unrollc.NoCheckpoint(), 20).peak_bytes // 3)
    plan = plan_unroll(stepper, stepper.init(), batches, (), budget)
    calls = []
    step = stepper._step  # the per-step path of Stepper.unroll
    stepper._step = lambda *args: calls.append(1) or step(*args)  # type: ignore[method-assign]
    final = stepper.unroll(stepper.init(), batches, checkpoint=budget)
    final.params["0.weight"].sum().backward()
    assert len(calls) == plan.evaluations > 20


def test_unroll_under_the_users_saved_tensors_hooks():
    """Tracing a new graph inside the user's saved_tensors_hooks works (torch.func refuses to trace under
    them): the hooks are suspended while tracing and see the steps that run."""
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        final = stepper.unroll(stepper.init(), [torch.randn(5, 3) for _ in range(4)], checkpoint=2)
        final.params["weight"].sum().backward()
    assert packed and model.weight.grad is not None


def test_impossible_budget_says_how_much_is_needed():
    model = nn.Linear(4, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    with pytest.raises(ValueError, match="Budget"):
        stepper.unroll(stepper.init(), [torch.randn(3, 4)] * 4, checkpoint=unrollc.Budget(1))


@pytest.mark.parametrize("checkpoint", [None, 3, "sqrt", "binomial", unrollc.Binomial(slots=2)])
def test_a_forward_hook_on_the_step_graph_counts_the_planned_evaluations(checkpoint):
    """Users (and tests) may count step evaluations by hooking ``stepper.graph``: the no-grad sweep of a
    checkpointed unroll then runs that graph too, so the count is the plan's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    batches = [torch.randn(5, 3) for _ in range(10)]
    state = stepper.step(stepper.init(), batches[0])  # a fresh Adam has no state: its first step has its own graph
    state = stepper.step(state, batches[0])  # stepper.graph is now the graph of every following step
    calls = []
    handle = stepper.graph.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = stepper.unroll(state, batches, checkpoint=checkpoint)
        out.params["0.weight"].sum().backward()
    finally:
        handle.remove()
    expected = 10 if checkpoint is None else unrollc.runtime.schedules.resolve_checkpoint(checkpoint).plan(10).evaluations
    assert len(calls) == expected


@pytest.mark.parametrize("checkpoint", [None, 4, "binomial"])
def test_a_wrapped_stepper_step_sees_every_evaluation(checkpoint):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lambda m, b, w: (w * m(b)).pow(2).mean())
    batches = [torch.randn(5, 3) for _ in range(9)]
    w = torch.tensor(1.5, requires_grad=True)
    calls = []
    step = stepper.step
    stepper.step = lambda *args: calls.append(1) or step(*args)  # type: ignore[method-assign]
    out = stepper.unroll(stepper.init(), batches, w, checkpoint=checkpoint)
    out.params["0.weight"].sum().backward()
    expected = 9 if checkpoint is None else unrollc.runtime.schedules.resolve_checkpoint(checkpoint).plan(9).evaluations
    assert len(calls) == expected and w.grad is not None


def test_a_fresh_optimizers_budget_counts_the_state_it_creates_in_the_first_step():
    """Adam's first step has no moments to read; the steps after it carry and save them. A budget planned from
    the first step's bytes alone let the unroll save more than it allowed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01),
                              lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    n = 8
    batches = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(n)]
    fresh = CostModel.from_stepper(stepper, stepper.init(), batches[0])
    budget = unrollc.Budget(fresh.state_bytes + n * fresh.taped_step_bytes)  # everything, at the first step's size
    plan = plan_unroll(stepper, stepper.init(), batches, (), budget)
    later = stepper.unroll(stepper.init(), batches[:1])  # a real state after one step
    steady = CostModel.from_stepper(stepper, later, batches[0])
    assert steady.taped_step_bytes > fresh.taped_step_bytes  # (state_bytes counts the state a step returns)
    assert plan.resolved != unrollc.NoCheckpoint()
    assert steady.predict(plan.resolved, n).peak_bytes <= budget.bytes


def test_a_budget_is_planned_for_the_largest_batch():
    model = nn.Linear(64, 64)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    batches = [torch.randn(4, 64)] + [torch.randn(512, 64) for _ in range(7)]
    small = CostModel.from_stepper(stepper, stepper.init(), batches[0])
    large = CostModel.from_stepper(stepper, stepper.init(), batches[1])
    budget = unrollc.Budget(small.state_bytes + 8 * small.taped_step_bytes)  # all of the 4-row steps
    assert large.taped_step_bytes > 5 * small.taped_step_bytes
    with pytest.raises(ValueError, match="no checkpoint schedule for n=8 steps fits"):
        plan_unroll(stepper, stepper.init(), batches, (), budget)
    budget = unrollc.Budget(large.state_bytes + 3 * large.taped_step_bytes)
    plan = plan_unroll(stepper, stepper.init(), batches, (), budget)
    assert large.predict(plan.resolved, 8).peak_bytes <= budget.bytes


def test_cost_model_of_a_step_with_a_module_meta_argument():
    model, lossnet = nn.Linear(3, 1), nn.Linear(1, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, b, ln: ln((m(b[0]) - b[1]).pow(2)).mean())
    batch = (torch.randn(5, 3), torch.randn(5, 1))
    cost = CostModel.from_stepper(stepper, stepper.init(), batch, lossnet)  # raised InternalError (10 vs 8 inputs)
    assert cost.taped_step_bytes > 0
    stepper.unroll(stepper.init(), [batch] * 3, lossnet, checkpoint=unrollc.Budget(10**6))


def test_budget_counts_the_gradients_of_every_synthetic_batch(monkeypatch):
    """Dataset distillation: each of the n batches requires grad, and the backward leaves a .grad on every one
    of them; a step's cost model sees one batch, so the unroll adds the others to the planned meta-gradients."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batches = [(torch.randn(16, 8, requires_grad=True), torch.randn(16, 1)) for _ in range(6)]
    batches.append(batches[0])  # the same synthetic batch again: one gradient
    cost = CostModel.from_stepper(stepper, stepper.init(), batches[0])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cost.grad_bytes == params + 16 * 8 * 4
    seen = {}
    plan = unrollc.Budget.plan
    monkeypatch.setattr(unrollc.Budget, "plan", lambda self, n, **kw: seen.update(kw) or plan(self, n, **kw))
    final = stepper.unroll(stepper.init(), batches, checkpoint=unrollc.Budget(10**8))
    assert seen["grad_bytes"] == params + 6 * 16 * 8 * 4
    stepper.forward(final, batches[0][0]).sum().backward()
    assert all(x.grad is not None for x, _ in batches)


def test_planned_meta_gradients_are_the_distinct_leaves_that_require_grad(monkeypatch):
    """A frozen layer leaves no .grad, a tensor passed twice leaves one, and batches computed from a synthetic
    leaf (an augmentation) leave none: their gradients flow on into the user's graph, which the unroll does not
    see (it plans only what it is given)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model[0].requires_grad_(False)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    lr = torch.tensor(0.1, requires_grad=True)
    synthetic = torch.randn(16, 8, requires_grad=True)
    batches = [(synthetic * (1 + 0.1 * i), torch.randn(16, 1)) for i in range(5)]
    state = stepper.init(hyper={"lr": lr})
    head = sum(p.numel() * p.element_size() for p in model[2].parameters())
    assert state.params["2.weight"].requires_grad and not state.params["0.weight"].requires_grad
    assert CostModel.from_stepper(stepper, state, batches[0]).grad_bytes == head + lr.element_size()
    assert CostModel.from_stepper(stepper, state, (synthetic, synthetic)).grad_bytes == (
        head + lr.element_size() + synthetic.numel() * 4)
    seen = {}
    plan = unrollc.Budget.plan
    monkeypatch.setattr(unrollc.Budget, "plan", lambda self, n, **kw: seen.update(kw) or plan(self, n, **kw))
    final = stepper.unroll(state, batches, checkpoint=unrollc.Budget(10**8))
    assert seen["grad_bytes"] == head + lr.element_size()
    stepper.forward(final, synthetic).sum().backward()
    assert synthetic.grad is not None and lr.grad is not None and model[0].weight.grad is None
