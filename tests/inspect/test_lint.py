"""check=True: after each pass the graph is linted and every guarantee established so far is verified."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import unrollc
import unrollc.passes
from unrollc.inspect.lint import PassCheckError, check_after
from unrollc.passes import PIPELINE
from unrollc.passes.schema import is_mutating

from inspect_fixtures import tiny_stepper


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop])
def test_check_mode_passes_on_the_real_pipeline(opt_cls):
    stepper = tiny_stepper(opt_cls, check=True, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {}))
    assert not any(is_mutating(n.target) for n in stepper.graph.graph.nodes)


def reintroduce_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """A deliberately broken pass: turns the first functional addcmul (SGD's ``p.add_(buf, alpha=-lr)`` on the
    CPU) back into aten.addcmul_ (mutation per its schema)."""
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.addcmul.default:
            node.target = torch.ops.aten.addcmul_.default
            break
    gm.recompile()
    return gm


def read_parameter_attribute(gm: fx.GraphModule) -> fx.GraphModule:
    """A deliberately broken pass: reads a parameter through get_attr again after lift_inputs."""
    gm.register_parameter("stray_weight", torch.nn.Parameter(torch.zeros(3, 2)))
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "p_hidden_weight")
    with gm.graph.inserting_after(list(gm.graph.find_nodes(op="placeholder"))[-1]):
        attr = gm.graph.get_attr("stray_weight")
    node.replace_all_uses_with(attr)
    gm.recompile()
    return gm


def test_a_pass_that_reintroduces_an_inplace_op_is_caught(monkeypatch):
    broken = (*PIPELINE[:3], reintroduce_inplace, *PIPELINE[3:])
    monkeypatch.setattr(unrollc.passes, "PIPELINE", broken)
    with pytest.raises(PassCheckError) as info:
        tiny_stepper(check=True)
    message = str(info.value)
    assert "pass `reintroduce_inplace`" in message
    assert "lift_inputs → functionalize → strip_detach" in message
    assert "established by `functionalize`" in message and "aten.addcmul_.default" in message
    assert "writes to self" in message


def test_without_check_the_broken_pass_fails_later_without_naming_it(monkeypatch):
    monkeypatch.setattr(unrollc.passes, "PIPELINE", (*PIPELINE, reintroduce_inplace))
    with pytest.raises(RuntimeError) as info:
        tiny_stepper(check=False, steps=1)
    assert not isinstance(info.value, PassCheckError) and "reintroduce_inplace" not in str(info.value)


def test_a_parameter_attribute_after_lifting_is_caught(monkeypatch):
    monkeypatch.setattr(unrollc.passes, "PIPELINE", (PIPELINE[0], read_parameter_attribute, *PIPELINE[1:]))
    with pytest.raises(PassCheckError, match="pass `read_parameter_attribute` \\(passes run before it: lift_inputs\\)"):
        tiny_stepper(check=True)


def test_a_pass_that_fails_its_own_guarantee_is_named():
    lifted = tiny_stepper().graphs["after lift_inputs"]  # still has add_ etc.: as if functionalize did nothing
    with pytest.raises(PassCheckError, match="`functionalize` does not establish its guarantee"):
        check_after(lifted, ["lift_inputs", "functionalize"])


def forgot_return(gm: fx.GraphModule) -> None:
    """A deliberately broken pass: edits in place and forgets to return the graph."""
    gm.recompile()


def rebuilt_without_meta(gm: fx.GraphModule) -> fx.GraphModule:
    """A deliberately broken pass: builds a new GraphModule and drops gm.meta (the step's signature)."""
    return fx.GraphModule(gm, gm.graph)


@pytest.mark.parametrize("broken", [forgot_return, rebuilt_without_meta])
def test_a_pass_that_returns_no_graph_or_drops_its_meta_is_named(monkeypatch, broken):
    monkeypatch.setattr(unrollc.passes, "PIPELINE", (*PIPELINE[:2], broken, *PIPELINE[2:]))
    with pytest.raises(PassCheckError, match=rf"pass `{broken.__name__}` \(passes run before it: lift_inputs → functionalize\)"):
        tiny_stepper(check=True)
