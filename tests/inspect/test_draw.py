"""Drawings of the step graph: DOT written and parseable, roles distinguished, collapsible by module."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from unrollc.inspect import draw, to_dot
from unrollc.inspect.draw import ROLE_COLORS

from inspect_fixtures import tiny_stepper

# pydot's DOT parser uses pyparsing names that newer pyparsing deprecates (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:'[a-zA-Z]+' deprecated:DeprecationWarning")


def test_missing_pydot_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)
    with pytest.raises(ImportError, match=r"pip install 'unrollc\[draw\]'"):
        to_dot(tiny_stepper(steps=1))


def test_dot_file_is_written_and_parses(tmp_path):
    pydot = pytest.importorskip("pydot")
    stepper = tiny_stepper(torch.optim.Adam)
    path = draw(stepper, tmp_path / "step.dot")
    (graph,) = pydot.graph_from_dot_file(path)
    nodes = {n.get_name(): n for n in graph.get_nodes()}
    for sub in graph.get_subgraphs():
        nodes.update({n.get_name(): n for n in sub.get_nodes()})
    colors = {n.get_name(): (n.get("fillcolor") or "").strip('"') for n in nodes.values()}
    assert colors["p_hidden_weight"] == ROLE_COLORS["param"]
    assert colors["s_hidden_weight_exp_avg"] == ROLE_COLORS["opt_state"]
    assert colors["h_lr"] == ROLE_COLORS["hyper"]
    assert colors["batch_batch_0"] == ROLE_COLORS["batch"]
    assert ROLE_COLORS["loss"] in colors.values()
    labels = {(sub.get("label") or "").strip('"') for sub in graph.get_subgraphs()}
    assert {"hidden: Linear", "out: Linear", "optimizer step", "backward (autograd)"} <= labels
    n_ops = sum(1 for n in stepper.graph.graph.nodes if n.op == "call_function")
    assert sum(len(sub.get_nodes()) for sub in graph.get_subgraphs()) == n_ops


def test_collapse_draws_one_node_per_group(tmp_path):
    pydot = pytest.importorskip("pydot")
    stepper = tiny_stepper(torch.optim.Adam)
    (full,) = pydot.graph_from_dot_data(to_dot(stepper).to_string())
    (small,) = pydot.graph_from_dot_data(to_dot(stepper, collapse=True).to_string())
    labels = [n.get("label") or "" for n in small.get_nodes()]
    assert any("hidden: Linear" in label and "ops" in label for label in labels)
    assert any("optimizer step" in label for label in labels)
    assert len(small.get_nodes()) < 25 < len(full.to_string().splitlines())


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_svg_is_rendered(tmp_path):
    pytest.importorskip("pydot")
    path = draw(tiny_stepper(), tmp_path / "step.svg", collapse=True)
    assert open(path).read().lstrip().startswith(("<?xml", "<svg"))


def test_annotated_code_takes_a_stepper_and_draw_refuses_unknown_suffixes(tmp_path):
    from unrollc.inspect import annotated_code

    stepper = tiny_stepper()
    assert annotated_code(stepper) == annotated_code(stepper.graph)
    with pytest.raises(TypeError, match=r"unrollc.inspect.annotated_code: expected a Stepper or an fx.GraphModule"):
        annotated_code(None)
    with pytest.raises(ValueError, match=r"cannot tell the format of .* use one of \.dot"):
        draw(stepper, tmp_path / "step.jpgx")
    with pytest.raises(TypeError, match=r"^unrollc.inspect.draw: expected a Stepper or an fx.GraphModule .* got int"):
        draw(42, tmp_path / "step.dot")


def test_check_passes_with_a_no_grad_block_inside_torch_nn_and_draw_names_a_missing_folder(tmp_path):
    """spectral_norm's power iteration runs under torch.no_grad() inside torch.nn: its detaches are kept by
    strip_detach, and the lint accepts them (it refused every detach not written in the user's own file)."""
    import unrollc
    from torch import nn

    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 1)))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean(), check=True)
    stepper.step(stepper.init(), torch.randn(3, 4))
    with pytest.raises(FileNotFoundError, match="no folder .* create it first"):
        draw(stepper, tmp_path / "missing" / "step.dot")


def test_collapse_to_a_depth_draws_one_box_per_module_and_groups_its_inputs():
    """With depth=1, ops in Block.forward itself and in its submodules were two boxes ("enc" and "enc: Block")
    with edges both ways, and the inputs kept their full paths."""
    import unrollc
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.a(x)) * self.b(x)  # tanh and * run in Block.forward itself

    model = nn.Sequential()
    model.add_module("enc", Block())
    model.add_module("head", nn.Linear(4, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, x: m(x).pow(2).mean())
    stepper.step(stepper.init(), torch.randn(3, 4))
    labels = [n.get("label").strip('"') for n in to_dot(stepper, collapse=True, depth=1).get_nodes() if n.get("label")]
    modules = [label for label in labels if label.startswith("enc")]
    assert len(modules) == 1 and modules[0].startswith("enc: Block\\n")
    assert "param x4\\nenc" in labels and not any("enc.a" in label for label in labels)
