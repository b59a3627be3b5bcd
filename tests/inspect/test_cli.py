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
