"""Each example in examples/ runs end-to-end in its --quick mode, prints its RESULT line and saves its plot.

The examples are scripts, so they run in a subprocess exactly as a user would start them
(``python examples/<name>.py --quick``), with the repository root on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ["maml_sinusoid", "fewshot_digits", "learn_lr", "reweight_noisy", "distill", "higher_maml"]
NEEDS_SKLEARN = {"fewshot_digits", "learn_lr", "reweight_noisy", "distill"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_quick(name: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    if name in NEEDS_SKLEARN:
        pytest.importorskip("sklearn.datasets", reason="load_digits ships with scikit-learn: pip install scikit-learn")
    out = tmp_path / f"{name}.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # each takes well under 30 s on 2 idle cores; the generous timeout absorbs a loaded CI machine
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--seed", "0", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = [line for line in proc.stdout.splitlines() if line.startswith(f"RESULT {name}:")]
    assert len(results) == 1, f"{name} --quick printed no RESULT line:\n{proc.stdout[-3000:]}"
    assert out.is_file() and out.stat().st_size > 10_000, f"{name} --quick saved no plot at {out}"


def test_examples_are_short_and_cite_their_paper() -> None:
    for name in EXAMPLES:
        source = (ROOT / "examples" / f"{name}.py").read_text()
        assert len(source.splitlines()) <= 220, f"{name}.py should stay a short, readable script"
        doc = source.split('"""')[1]
        assert "after" in doc and any(str(year) in doc for year in range(2015, 2019)), f"{name}.py: cite the paper"
        assert "import unrollc" in source and "unrollc." in source.replace("import unrollc", "")
