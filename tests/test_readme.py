"""The README's Python examples run as written and print what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(containing: str) -> str:
    blocks = [b for b in _python_blocks() if containing in b]
    assert len(blocks) == 1, f"README: expected one python block with {containing!r}, found {len(blocks)}"
    return blocks[0]


def test_quick_start_runs_and_gives_meta_gradients():
    env: dict = {}
    torch.manual_seed(0)
    exec(compile(_block("stepper.init(hyper={\"lr\": lr})"), "README quick start", "exec"), env)  # noqa: S102
    assert env["lr"].grad is not None and env["weights"].grad is not None
    assert env["model"][0].weight.grad is not None
    assert env["state"].t == 100 and len(env["state"].losses) == 100


def test_cost_model_example_prints_what_the_readme_says():
    src = _block("unrollc.CostModel.from_stepper")
    src = "\n".join(line for line in src.splitlines() if not line.startswith("print("))
    env: dict = {}
    exec(compile(src, "README cost model", "exec"), env)  # noqa: S102
    cost = env["cost"]
    assert (cost.state_bytes, cost.taped_step_bytes, cost.grad_bytes) == (3194960, 4534320, 1597484)
    assert cost.backward_bytes == 3168300 and not cost.backward_estimated
    assert str(cost.expressions("sqrt").evaluations) == "n + (ceiling(n/ceiling(sqrt(n))) - 1)*ceiling(sqrt(n))"
    p = cost.predict("sqrt", 160)
    assert (p.evaluations, p.peak_states, p.peak_taped_steps, p.peak_bytes) == (316, 12, 13, 105535312)
    assert repr(cost.plan(env["unrollc"].Budget(64 * 2**20), 160).resolved) == "Binomial(slots=15)"
    assert cost.expressions("sqrt").evaluations.subs("n", 160) == 316
    for claim in ("3194960, 4534320, 1597484", "# 3168300:",
                  "evaluations=316, peak_states=12, peak_taped_steps=13, peak_bytes=105535312", "Binomial(slots=15)"):
        assert claim in src


def test_readme_lists_the_benchmark_files_columns():
    from unrollc.bench.report import COLUMNS

    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", README.read_text(), flags=re.M))
    assert rows == COLUMNS
