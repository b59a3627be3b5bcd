"""Small models and steppers shared by the inspection tests."""

from __future__ import annotations

import torch
from torch import nn

import unrollc


class TinyNet(nn.Module):
    """Two layers with a forward written here, so graph nodes map to lines of this file."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(2, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x))  # LINE: forward relu
        return self.out(h)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()  # LINE: loss


def line_of(marker: str) -> int:
    """The line number of ``# LINE: marker`` in this file."""
    with open(__file__) as f:
        for i, line in enumerate(f, start=1):
            if line.rstrip().endswith(f"# LINE: {marker}"):
                return i
    raise LookupError(marker)


def tiny_stepper(opt_cls=torch.optim.SGD, steps: int = 2, check: bool = False, **opt_kwargs) -> unrollc.Stepper:
    """TinyNet with ``opt_cls``, stepped ``steps`` times on a fixed batch (the steady-state graph)."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = opt_cls(model.parameters(), **({"lr": 0.1} | opt_kwargs))
    stepper = unrollc.compile(model, opt, mse, check=check)
    state = stepper.init()
    batch = (torch.randn(4, 2), torch.randn(4, 1))
    for _ in range(steps):
        state = stepper.step(state, batch)
    return stepper
