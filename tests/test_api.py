"""The public API is small, explicit and documented."""

import inspect

import torch
from torch import nn

import unrollc


def test_public_names_exist_and_are_documented():
    for name in unrollc.__all__:
        obj = getattr(unrollc, name)
        assert obj.__doc__, name
    sig = inspect.signature(unrollc.compile)
    assert list(sig.parameters)[:3] == ["model", "opt", "loss_fn"]


def test_stepper_methods_match_the_contract():
    for name in ("init", "step", "unroll", "forward"):
        assert callable(getattr(unrollc.Stepper, name))
    assert isinstance(inspect.getattr_static(unrollc.Stepper, "graph"), property)
    params = inspect.signature(unrollc.Stepper.unroll).parameters
    assert params["checkpoint"].kind is inspect.Parameter.KEYWORD_ONLY


def test_trace_makes_the_graph_without_running_a_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state = stepper.init()
    stats = state.buffers["1.running_mean"].clone()
    calls = []
    step = stepper.step
    stepper.step = lambda *a: calls.append(1) or step(*a)  # type: ignore[method-assign]
    gm = stepper.trace(state, torch.randn(5, 3))
    assert isinstance(gm, torch.fx.GraphModule) and stepper.graph is gm and not calls
    assert torch.equal(state.buffers["1.running_mean"], stats) and state.t == 0
    assert stepper.trace(state, torch.randn(5, 3)) is gm and stepper.trace_count == 1  # same layout: cached
    assert "Adam" in str(unrollc.explain(stepper))


def test_state_fields_and_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state = stepper.init()
    assert list(state.params) == [n for n, _ in model.named_parameters()]
    assert list(state.buffers) == [n for n, _ in model.named_buffers()]
    assert state.t == 0 and state.opt_state == {}
    assert set(state.hyper) == {"lr", "betas", "eps", "weight_decay"}
    assert isinstance(state.hyper["lr"], torch.Tensor) and isinstance(state.hyper["betas"], tuple)
    state = stepper.step(state, torch.randn(5, 3))
    assert state.t == 1 and set(state.opt_state["0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert isinstance(stepper.graph, torch.fx.GraphModule)
    out = stepper.forward(state, torch.randn(5, 3))
    assert out.shape == (5, 4)
