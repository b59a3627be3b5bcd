"""run_graph: a step graph run with its ops called directly gives gm(*args)'s values and gradients, bit for bit."""

from __future__ import annotations

import traceback

import torch
from torch import fx, nn

import unrollc
from unrollc.runtime.execute import run_graph
from unrollc.runtime.state import hyper_to_groups


def _adam_step_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    stepper = unrollc.compile(model, opt, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    state = stepper.init()
    batch = (torch.randn(16, 4), torch.randn(16, 2))
    state = stepper.step(state, batch)  # the graph of later steps has optimizer state among its inputs
    return stepper, state, batch


def _inputs(stepper, state, batch):
    groups = hyper_to_groups(state.hyper, 1)
    compiled = stepper._lookup(state, groups, batch, ())
    return compiled.gm, stepper._flatten(compiled.signature, state, groups, batch, ())


def test_values_and_gradients_are_those_of_calling_the_graph_module():
    stepper, state, batch = _adam_step_graph()
    gm, flat = _inputs(stepper, state, batch)
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in flat]
    direct = run_graph(gm, leaves)
    called = gm(*leaves)
    assert len(direct) == len(called)
    for a, b in zip(direct, called, strict=True):
        assert torch.equal(a, b)
    wrt = [x for x in leaves if x.requires_grad]
    meta = sum(o.square().sum() for o in direct if o.is_floating_point())
    meta_called = sum(o.square().sum() for o in called if o.is_floating_point())
    for a, b in zip(torch.autograd.grad(meta, wrt, allow_unused=True), torch.autograd.grad(meta_called, wrt, allow_unused=True), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert "torch.ops.aten" in gm.code  # the graph module itself is untouched


def test_an_instrumented_graph_runs_through_its_module_call():
    stepper, state, batch = _adam_step_graph()
    gm, flat = _inputs(stepper, state, batch)
    calls = []
    handle = gm.register_forward_hook(lambda *_: calls.append("hook"))
    run_graph(gm, flat)
    handle.remove()
    assert calls == ["hook"]
    original = gm.forward
    gm.forward = lambda *args: calls.append("patched") or original(*args)
    try:
        run_graph(gm, flat)
    finally:
        del gm.forward
    assert calls == ["hook", "patched"]


def test_a_recompiled_graph_runs_its_new_code():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0)))
    gm = fx.GraphModule({}, graph)
    assert torch.equal(run_graph(gm, [torch.ones(2)]), torch.full((2,), 2.0))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.target = torch.ops.aten.add.Tensor
    gm.recompile()
    assert torch.equal(run_graph(gm, [torch.ones(2)]), torch.full((2,), 3.0))


def test_an_error_inside_the_graph_shows_the_failing_line():
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    graph.output(graph.call_function(torch.ops.aten.mm.default, (x, y)))
    gm = fx.GraphModule({}, graph)
    try:
        run_graph(gm, [torch.ones(2, 3), torch.ones(2, 3)])
    except RuntimeError:
        text = traceback.format_exc()
    else:
        raise AssertionError("mm of 2x3 by 2x3 did not fail")
    assert "= _op_aten_mm_default(x, y)" in text  # the generated line, not only the error


def test_backward_hooks_on_the_graph_module_run():
    from torch.nn.modules import module as nn_module

    gm = fx.symbolic_trace(lambda x: torch.ops.aten.mul.Tensor(x, x))
    calls = []
    handle = nn_module.register_module_full_backward_hook(lambda *_: calls.append("global"))
    x = torch.ones(2, requires_grad=True)
    try:
        run_graph(gm, [x]).sum().backward()
    finally:
        handle.remove()
    gm.register_full_backward_hook(lambda *_: calls.append("own"))
    run_graph(gm, [x]).sum().backward()
    assert calls == ["global", "own"]
