"""Built-in benchmark workloads: a model, an optimizer and generated data, all from a fixed seed.

A :class:`Task` is everything one configuration needs: the model and optimizer (fresh, never shared between
methods), ``n`` training batches, a validation batch and the loss. No data is downloaded: inputs are Gaussian
and labels uniform, drawn from ``torch.Generator`` seeded per workload, so every method and every process sees
identical numbers.

Training batches cycle through a pool of at most ``POOL`` distinct batches (batch ``i`` is ``pool[i % POOL]``):
at n=1024 a fresh batch per step would hold 256 MiB of inputs in every process before the unroll starts, and
the methods compared do not care whether batches repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Workload", "Task", "WORKLOADS", "OPTIMIZERS", "make_task", "make_optimizer", "loss_fn"]

POOL = 16

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    """An MLP classification task: layer widths (input first, classes last) and the batch size."""

    name: str
    widths: tuple[int, ...]
    batch: int
    seed: int = 0

    def build_model(self) -> nn.Sequential:
        """``Linear(w0, w1), ReLU, ..., Linear(w_{k-1}, w_k)``, initialised from ``seed``."""
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:], strict=True)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(a, b))
        return nn.Sequential(*layers)

    def describe(self) -> str:
        """E.g. ``"MLP 256-512-512-10, batch 256"``."""
        return f"MLP {'-'.join(map(str, self.widths))}, batch {self.batch}"


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("mlp", (256, 512, 512, 10), 256),
    "mlp-small": Workload("mlp-small", (32, 64, 64, 10), 32),
}

# name -> (torch.optim class, keyword arguments)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
}


def make_optimizer(name: str, params: object) -> torch.optim.Optimizer:
    """A fresh ``torch.optim`` optimizer of the named kind over ``params``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unrollc.bench: unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}.")
    cls, kwargs = OPTIMIZERS[name]
    return cls(params, **kwargs)  # type: ignore[call-arg]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on ``(x, y)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@dataclass
class Task:
    """One configuration's inputs. ``lr`` is the optimizer's learning rate (the meta-gradient's second target)."""

    workload: Workload
    optimizer: str
    n: int
    model: nn.Module
    batches: list[Batch]
    val: Batch
    lr: float
    device: torch.device

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer over ``self.model``'s parameters."""
        return make_optimizer(self.optimizer, self.model.parameters())

    @property
    def loss_fn(self) -> Callable[[nn.Module, Batch], torch.Tensor]:
        """The training and validation loss."""
        return loss_fn


def _batch(w: Workload, gen: torch.Generator, device: torch.device) -> Batch:
    x = torch.randn(w.batch, w.widths[0], generator=gen)
    y = torch.randint(0, w.widths[-1], (w.batch,), generator=gen)
    return x.to(device), y.to(device)


def make_task(workload: str | Workload, optimizer: str, n: int, device: str | torch.device = "cpu") -> Task:
    """The task of one configuration: same model weights, batches and validation batch for every method."""
    w = WORKLOADS[workload] if isinstance(workload, str) else workload
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unrollc.bench: unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)}.")
    dev = torch.device(device)
    model = w.build_model().to(dev)
    gen = torch.Generator().manual_seed(w.seed + 1)
    pool = [_batch(w, gen, dev) for _ in range(min(n, POOL))]
    val = _batch(w, gen, dev)
    return Task(w, optimizer, n, model, [pool[i % len(pool)] for i in range(n)], val,
                OPTIMIZERS[optimizer][1]["lr"], dev)
