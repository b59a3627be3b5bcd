"""unrollc.inspect.source: every node of the kept graphs knows the user's line it came from."""

from __future__ import annotations

import torch

from unrollc.inspect import annotated_code, source_of
from unrollc.passes import PIPELINE

from inspect_fixtures import line_of, tiny_stepper

FIXTURES = "inspect_fixtures.py"


def test_graph_names_are_documented_and_ordered():
    stepper = tiny_stepper()
    assert list(stepper.graphs) == ["captured"] + [f"after {p.__name__}" for p in PIPELINE]
    assert stepper.graphs["after cse"].code == stepper.graph.code  # SGD has no sqrt for safe_sqrt to change


def test_forward_and_loss_nodes_carry_the_users_line():
    stepper = tiny_stepper()
    sources = {n.name: source_of(n) for n in stepper.graph.graph.nodes}
    relu = sources["relu"]
    assert relu.kind == "user" and relu.filename.endswith(FIXTURES) and relu.lineno == line_of("forward relu")
    assert relu.module == ""  # computed in TinyNet.forward itself
    addmm = sources["addmm"]
    assert addmm.module == "hidden" and addmm.lineno == line_of("forward relu")
    assert sources["mean"].kind == "user" and sources["mean"].function == "mse" and sources["mean"].lineno == line_of("loss")


def test_optimizer_nodes_carry_the_optimizer_step_line():
    stepper = tiny_stepper(torch.optim.Adam)
    kinds = {source_of(n).kind for n in stepper.graph.graph.nodes if n.op == "call_function"}
    assert {"user", "autograd", "optimizer"} <= kinds
    optimizer = [source_of(n) for n in stepper.graph.graph.nodes if n.op == "call_function" and source_of(n).kind == "optimizer"]
    assert all(s.filename.endswith("adam.py") and s.lineno > 0 for s in optimizer)


def test_source_survives_every_pass():
    stepper = tiny_stepper()
    for name, gm in stepper.graphs.items():
        relu = [n for n in gm.graph.nodes if n.name == "relu"]
        assert relu and source_of(relu[0]).lineno == line_of("forward relu"), name


def test_annotated_code_is_readable_python_with_source_comments():
    stepper = tiny_stepper()
    code = annotated_code(stepper.graphs["after functionalize"])
    assert code.startswith("def step(\n    p_hidden_weight,  # param hidden.weight\n")
    assert f"{FIXTURES}:{line_of('forward relu')} in forward: h = torch.relu(self.hidden(x))" in code
    assert f"{FIXTURES}:{line_of('loss')} in mse" in code
    assert "# [hidden: Linear]" in code
    assert "torch/optim/sgd.py" in code and "autograd" in code
    compile(code, "<annotated>", "exec")  # it is valid Python


def test_the_returned_loss_is_labelled_with_the_loss_fn_line():
    """The loss the step returns is torch.func's view of loss_fn's result, without a stack trace of its own: it
    was labelled as autograd's (and drawn hanging off the backward)."""
    stepper = tiny_stepper()
    loss = stepper.graph.graph.output_node().args[0][-1]
    src = source_of(loss)
    assert src.kind == "user" and src.function == "mse" and src.lineno == line_of("loss")


def test_a_forward_run_by_exec_is_not_labelled_as_the_backward():
    """Code without a file (exec) leaves no frame to keep: its forward ops were labelled as autograd's."""
    import unrollc

    scope: dict = {"torch": torch}
    exec(
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        return torch.tanh(self.lin(x))\n"
        "def loss_fn(m, b):\n"
        "    return m(b).pow(2).mean()\n",
        scope,
    )
    model = scope["Net"]()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), scope["loss_fn"])
    stepper.step(stepper.init(), torch.randn(3, 4))
    nodes = {n.target: n for n in stepper.graph.graph.nodes}
    forward, backward = source_of(nodes[torch.ops.aten.tanh.default]), source_of(nodes[torch.ops.aten.tanh_backward.default])
    assert forward.kind == "module" and forward.module == "" and forward.short().startswith("source not recorded")
    assert backward.kind == "autograd"
    assert "[<model>: Net] source not recorded" in annotated_code(stepper.graph)
