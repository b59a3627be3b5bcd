"""unrollc.inspect.explain: the report of what each pass did (golden text for a tiny model) and its costs."""

from __future__ import annotations

import os

import pytest
import torch

import unrollc
from unrollc.inspect import Report, explain
from unrollc.passes import PIPELINE

from inspect_fixtures import tiny_stepper

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "explain_tiny_sgd.txt")


def tiny_report() -> Report:
    return explain(tiny_stepper(torch.optim.SGD, momentum=0.9))


def test_explain_golden_text():
    """The report without its bytes/FLOPs section; after a deliberate change, regenerate the file with
    ``python tests/inspect/test_explain.py`` and review the diff."""
    text = tiny_report().format(costs=False)
    with open(GOLDEN) as f:
        expected = f.read()
    assert text == expected


def test_every_pass_is_listed_in_order_with_node_counts():
    report = tiny_report()
    names = [d.name for d in report.passes]
    assert names == [p.__name__ for p in PIPELINE]
    for before, after in zip(report.passes, report.passes[1:]):
        assert before.nodes_after == after.nodes_before
    lifted = {x.name: x for x in report.passes[0].lifted}
    assert lifted["hidden.weight"].placeholder == "p_hidden_weight" and lifted["hidden.weight"].module == "hidden: Linear"
    assert lifted["out.bias.momentum_buffer"].role == "opt_state" and lifted["out.bias.momentum_buffer"].module == "out: Linear"
    assert lifted["lr"].role == "hyper" and lifted["lr"].module is None
    rewritten = {a: b for a, _, b in report.passes[1].rewritten}
    assert rewritten["mul_.Tensor"] == "mul.Tensor"
    assert rewritten["addcmul_.default"] == "addcmul.default"  # SGD's add_(buf, alpha=-lr), fused on the CPU


def test_cost_section_matches_the_cost_model():
    cost = pytest.importorskip("unrollc.analysis.cost")
    stepper = tiny_stepper(torch.optim.SGD, momentum=0.9)
    report = explain(stepper)
    model = cost.CostModel.from_graph(stepper.graph)
    assert (report.state_bytes, report.saved_bytes, report.flops) == (
        model.state_bytes, model.taped_step_bytes, model.flops_per_step,
    )
    # 4 params + 4 momentum buffers of TinyNet (2x3 + 3 + 3x1 + 1 floats each), float32
    assert report.state_bytes == 2 * (6 + 3 + 3 + 1) * 4
    text = str(report)
    assert "carried state" in text and "saved for backward" in text and f"~{report.flops:,}" in text


@pytest.mark.parametrize("case", ["adam", "frozen layer"])
def test_saved_bytes_are_what_a_taped_step_saves(case):
    """Adam's step counters and a frozen layer's weights require no grad in an unroll (re-run steps take them as
    constants): explain's figure is the bytes autograd saves for one step (it priced them as differentiated, 8059
    B for 6179 saved with Adam), as CostModel.from_stepper's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    if case == "frozen layer":
        model[0].requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = (torch.randn(8, 10), torch.randint(0, 3, (8,)))
    stepper = unrollc.compile(model, opt, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    state = stepper.step(stepper.step(stepper.init(), batch), batch)  # the graph of the steps after the first
    report = explain(stepper)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stepper.step(state, batch)
    assert report.saved_bytes == sum(seen.values()) == unrollc.CostModel.from_stepper(stepper, state, batch).taped_step_bytes


def test_notebook_renderings():
    report = tiny_report()
    assert report._repr_html_().startswith("<pre>") and "lift_inputs" in report._repr_html_()
    assert report._repr_markdown_().startswith("```text\n")
    assert repr(report) == str(report)


def test_explain_traces_when_given_a_state_and_batch():
    stepper = tiny_stepper(steps=0)
    with pytest.raises(RuntimeError, match=r"has not traced a step yet.*unrollc.explain\(stepper, state, batch\)"):
        explain(stepper)
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"unrollc.explain: give both `state` and `batch`.*got a state without a batch"):
        explain(stepper, stepper.init())
    with pytest.raises(TypeError, match=r"Stepper.trace: expected an UnrollState as `state`.*got str"):
        explain(stepper, "state", (torch.randn(4, 2), torch.randn(4, 1)))
    report = explain(stepper, stepper.init(), (torch.randn(4, 2), torch.randn(4, 1)))
    assert report.inputs["param"] == 4


def test_explain_takes_a_batch_of_none_when_the_data_comes_as_meta():
    model = torch.nn.Linear(2, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, batch, x: m(x).sum())
    report = explain(stepper, stepper.init(), None, torch.randn(4, 2))
    assert report.inputs["meta"] == 1



def test_first_step_lists_lifted_inputs_under_lift_inputs_only():
    """A fresh Adam's first graph keeps other constants (its new step counters) after lift_inputs: later passes
    must not list the lifted inputs again."""
    text = tiny_report_of(tiny_stepper(torch.optim.Adam, steps=1, lr=0.01))
    assert text.count("-> input p_") == 4  # TinyNet's four parameters, once
    # and the report says it shows a first step's graph, not the one the steps after it run
    assert text.splitlines()[1].startswith("The graph of a first step: the optimizer has no state yet")
    assert "The graph of a first step" not in tiny_report_of(tiny_stepper(torch.optim.Adam, steps=2, lr=0.01))


def tiny_report_of(stepper) -> str:
    return explain(stepper).format(costs=False)


if __name__ == "__main__":  # regenerate the golden file
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        f.write(tiny_report().format(costs=False))
    print(open(GOLDEN).read())



def test_a_guard_on_every_parameters_state_is_shown_once():
    """RAdam's rho_t > 5 is read from each parameter's step counter. The counters unrollc shares are one tensor
    and one guard; separate counters (a warm optimizer whose parameters started at different steps) are a guard
    each, shown as one line naming the parameters, not one line each."""
    import unrollc

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.RAdam(model.parameters(), lr=0.1)
    stepper = unrollc.compile(model, opt, lambda m, b: m(b).pow(2).mean())
    state = stepper.step(stepper.init(), torch.randn(2, 3))
    stepper.step(state, torch.randn(2, 3))
    text = str(unrollc.explain(stepper))
    assert len(stepper.guards) == 2  # weight_decay != 0, and rho_t > 5 on the shared counter
    assert text.count("5.0)) == False") == 1 and "state:*.step" in text

    model(torch.randn(2, 3)).pow(2).mean().backward()
    opt.step()
    for i, p in enumerate(model.parameters()):
        opt.state[p]["step"] = torch.tensor(float(i + 1))  # four different counters
    warm = unrollc.compile(model, opt, lambda m, b: m(b).pow(2).mean())
    warm.step(warm.init(), torch.randn(2, 3))
    text = str(unrollc.explain(warm))
    assert len(warm.guards) >= 4
    assert text.count("5.0)) == False") == 1 and "state:*.step" in text
    assert "(for each of 4 parameters: 0.weight, 0.bias, 1.weight, 1.bias)" in text
