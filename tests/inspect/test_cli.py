"""python -m unrollc: the demo and `explain path/to/script.py:function`."""

from __future__ import annotations

import textwrap

import pytest

from unrollc.__main__ import main

SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    import unrollc

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        stepper = unrollc.compile(model, opt, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
        return stepper, stepper.init(), (torch.randn(4, 2), torch.randn(4, 1))

    def not_a_stepper():
        return 3

    def untraced_stepper():
        return make()[0]

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    def branchy():
        model = nn.Sequential(nn.Linear(2, 1), Branchy())
        stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum())
        return stepper, stepper.init(), torch.randn(4, 2)

    def short_tuple():
        return make()[:2]

    def takes_arguments(n_layers):
        return make()

    def shape_bug():
        model = nn.Linear(2, 1)
        stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum())
        return stepper, stepper.init(), torch.randn(4, 5)  # the model takes 2 features
    """
)


def test_explain_a_script_function(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    assert main(["explain", f"{script}:make", "--graph", "after functionalize"]) == 0
    out = capsys.readouterr().out
    assert "unrollc.explain: Sequential + Adam" in out and "lift_inputs" in out
    assert "def step(" in out and "torch/optim/adam.py" in out


def test_explain_refuses_what_is_not_a_stepper(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with pytest.raises(SystemExit, match="must return a Stepper"):
        main(["explain", f"{script}:not_a_stepper"])
    with pytest.raises(SystemExit, match="path/to/script.py:function"):
        main(["explain", str(script)])
    with pytest.raises(SystemExit, match=r"has not traced a step.*return \(stepper, state, batch, \*meta\) from untraced_stepper"):
        main(["explain", f"{script}:untraced_stepper"])
    with pytest.raises(SystemExit, match=r"must be \(stepper, state, batch, \*meta\), got a tuple of 2"):
        main(["explain", f"{script}:short_tuple"])


def test_a_capture_failure_is_reported_without_advice_that_does_not_apply(tmp_path):
    """The function already returns (stepper, state, batch): the message is the capture error alone."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with pytest.raises(SystemExit) as info:
        main(["explain", f"{script}:branchy"])
    message = str(info.value)
    assert "train.py" in message and "torch.where" in message and "From the command line" not in message


def test_demo_prints_the_meta_gradient_and_the_report(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "d loss / d lr" in out and "|d loss / d initial weights|" in out
    assert "Passes (nodes before -> after):" in out


def test_a_target_that_is_not_a_python_file_is_refused_with_a_message(tmp_path):
    text = tmp_path / "make.txt"
    text.write_text("def make(): pass\n")
    for target in (f"{tmp_path}:make", f"{text}:make"):
        with pytest.raises(SystemExit, match="is not a Python file"):
            main(["explain", target])


def test_an_error_in_the_users_own_code_keeps_its_traceback(tmp_path):
    """Only capture failures become one-line messages; a RuntimeError the user's code raises (a shape bug) is
    raised as it is, with its traceback (it was reduced to its first line, without file or line)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as info:
        main(["explain", f"{script}:shape_bug"])
    assert not isinstance(info.value, SystemExit)


def test_a_function_that_takes_arguments_is_named(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with pytest.raises(SystemExit, match=r"takes_arguments\(n_layers\) takes arguments; the command line calls it with none"):
        main(["explain", f"{script}:takes_arguments"])
