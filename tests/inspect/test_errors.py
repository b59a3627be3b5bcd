"""Capture failures point at the user's file and line and suggest the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unrollc


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:  # BRANCH
            h = h * 2
        return h


class UsesItem(DataDependent):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h * h.abs().max().item()  # ITEM


def _line(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, start=1) if line.rstrip().endswith(f"# {marker}"))


def _capture(model: nn.Module) -> unrollc.CaptureError:
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    with pytest.raises(unrollc.CaptureError) as info:
        stepper.step(stepper.init(), torch.randn(4, 3))
    return info.value


def test_data_dependent_branch_names_file_line_and_suggests_torch_where():
    error = _capture(DataDependent())
    message = str(error)
    assert f"{__file__}:{_line('BRANCH')}" in message
    assert "if h.sum() > 0:" in message and "in forward" in message
    assert "branches on the value of a traced tensor" in message and "torch.where" in message
    assert error.location is not None and error.location.lineno == _line("BRANCH")
    assert "torch/" not in message.split(":", 1)[1].split("(")[0]  # no torch-internal location


def test_item_in_forward_names_file_and_line():
    message = str(_capture(UsesItem()))
    assert f"{__file__}:{_line('ITEM')}" in message and ".item()" in message and "keep the value a tensor" in message


def test_batchnorm_cumulative_average_names_torch_nn_line_and_the_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None))
    message = str(_capture(model))
    assert "inside torch.nn at" in message and "batchnorm.py" in message and "num_batches_tracked" in message
    assert "momentum=0.1" in message and "torch.where" not in message


def test_batchnorm_cumulative_average_is_named_for_code_run_by_exec():
    """Code run by ``python -c`` or exec has no source file, so no user frame: the message fell back to the generic
    ".item() ... torch.where" hint (found in review); it names the BatchNorm fix from torch.nn's frame."""
    scope = {"nn": nn, "torch": torch, "unrollc": unrollc}
    exec(  # noqa: S102 - the point of the test
        "model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None))\n"
        "stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())\n"
        "try:\n    stepper.step(stepper.init(), torch.randn(5, 3))\nexcept unrollc.CaptureError as e:\n    message = str(e)\n",
        scope,
    )
    assert "momentum=0.1" in scope["message"] and "torch.where" not in scope["message"]
