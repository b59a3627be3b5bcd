"""Independent references the tests compare unrollc with: eager torch.optim, finite differences."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


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


def eager_unroll(
    model: nn.Module,
    loss_fn: Callable,
    batches: Sequence[Any],
    update: Callable[[list[torch.Tensor], list[torch.Tensor], list[dict], int], list[torch.Tensor]],
    params: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """A hand-written differentiable unroll: ``autograd.grad(create_graph=True)`` and ``update``.

    ``update(params, grads, states, t)`` returns the new parameters (``states`` holds one dict per
    parameter for the update's own state, ``t`` counts from 1). Buffers are copies, updated in place.
    """
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters()) if params is None else params
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    states: list[dict] = [{} for _ in params]
    for t, batch in enumerate(batches, start=1):
        weights = {**dict(zip(names, params)), **buffers}
        # tie_weights: a tied output layer reads the same tensor; MATH attention has a double backward.
        with torch.nn.utils.stateless._reparametrize_module(model, weights, tie_weights=True), sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = update(params, list(grads), states, t)
    return params


def sgd_momentum(lr: float, momentum: float) -> Callable:
    """torch.optim.SGD(lr, momentum) written out: buf = momentum * buf + g (buf = g at t=1); p -= lr * buf."""

    def update(params, grads, states, t):
        out = []
        for p, g, st in zip(params, grads, states, strict=True):
            st["buf"] = g if t == 1 else momentum * st["buf"] + g
            out.append(p - lr * st["buf"])
        return out

    return update


def adam(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
         decoupled: bool = False) -> Callable:
    """torch.optim.Adam / AdamW written out (bias-corrected moments, eps outside the sqrt)."""
    b1, b2 = betas

    def update(params, grads, states, t):
        out = []
        for p, g, st in zip(params, grads, states, strict=True):
            if weight_decay and decoupled:
                p = p * (1 - lr * weight_decay)
            elif weight_decay:
                g = g + weight_decay * p
            st["m"] = (1 - b1) * g if t == 1 else b1 * st["m"] + (1 - b1) * g
            st["v"] = (1 - b2) * g * g if t == 1 else b2 * st["v"] + (1 - b2) * g * g
            m_hat = st["m"] / (1 - b1**t)
            denom = (st["v"] / (1 - b2**t)).sqrt() + eps
            out.append(p - lr * m_hat / denom)
        return out

    return update


class HandWritten(torch.optim.Optimizer):
    """A hand-written optimizer in the style found in the wild, for tests: ``update(p, state, group)`` runs under
    ``torch.no_grad()`` for every parameter of every group; a subclass writes only its update."""

    def __init__(self, params: Any, lr: float = 0.1, **defaults: Any) -> None:
        super().__init__(params, {"lr": lr, **defaults})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.update(p, self.state[p], group)

    def update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError
