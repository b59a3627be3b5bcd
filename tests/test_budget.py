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
    assert plan.peak_bytes(cost.state_bytes, cost.taped_step_bytes) <= everything // 3
    assert plan.evaluations > 24  # it had to recompute

    def grad(checkpoint):
        model.zero_grad()
        final = stepper.unroll(stepper.init(), batches, checkpoint=checkpoint)
        stepper.forward(final, batches[0][0]).sum().backward()
        return model[0].weight.grad.clone()

    assert torch.allclose(grad(budget), grad(None), rtol=1e-10, atol=0)


def test_impossible_budget_says_how_much_is_needed():
    model = nn.Linear(4, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    with pytest.raises(ValueError, match="Budget"):
        stepper.unroll(stepper.init(), [torch.randn(3, 4)] * 4, checkpoint=unrollc.Budget(1))
