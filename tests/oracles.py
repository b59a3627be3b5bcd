"""Independent references the tests compare unrollc with: eager torch.optim, finite differences."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def eager_trajectory(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, batches: Sequence[Any]
) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]]:
    """Train deep copies of ``model`` and ``opt`` eagerly; the (params, buffers, state) after each step."""
    model, new_opt = copy.deepcopy((model, opt))  # one deepcopy keeps the optimizer's params the model's
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for batch in batches:
        new_opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        new_opt.step()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        state = {
            names[id(p)]: {k: v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in st.items()}
            for p, st in new_opt.state.items()
        }
        out.append((params, buffers, state))
    return out


def central_difference(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d f(x) / d x by float64 central differences (x is perturbed out of place)."""
    x = x.detach()
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        flat[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return grad
