"""The methods compared, each computing the same meta-gradient.

The task: train ``task.model`` for ``n`` steps with the workload's optimizer, starting from the model's weights
and with the learning rate a tensor ``lr``; the meta-loss is the cross-entropy on a validation batch after the
last step; the meta-gradient is d meta-loss / d (lr, initial weights). Every method returns
``(meta_loss, [d/d lr, d/d w_1, ...])``; ``run(steps=k)`` unrolls only the first k batches (the memory process's
short warm-up).

* ``unrollc`` — ``unrollc.compile(model, opt, loss_fn).unroll(..., checkpoint=schedule)``;
* ``higher`` — ``higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]})`` (0.2.1; its
  Adam puts eps outside the bias correction, ``lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps)``, so its Adam gradients differ
  slightly from torch.optim's and unrollc's);
* ``eager`` — a hand-written unroll: ``torch.autograd.grad(create_graph=True)`` plus the SGD-momentum / Adam update
  of ``torch.optim`` written out (the momentum buffer starts as the first gradient, keeping its graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.func import functional_call

from .workloads import OPTIMIZERS, Task

__all__ = ["METHODS", "SCHEDULES", "MetaResult", "MethodSpec", "Runner", "build", "higher_available", "schedule_policy"]

MetaResult = tuple[torch.Tensor, list[torch.Tensor]]


class Runner(Protocol):
    """One method on one task: ``run()`` unrolls every batch; ``run(steps=k)`` only the first ``k``."""

    def __call__(self, steps: int | None = None) -> MetaResult:
        """Unroll the first ``steps`` batches (all if None); ``(meta_loss, [d/d lr, d/d w_1, ...])``."""
        ...


METHODS = ("unrollc", "higher", "eager")
SCHEDULES = ("none", "sqrt", "binomial", "every-k", "budget")
BINOMIAL_SLOTS = 8
EVERY_K = 10
BUDGET_MIB = 64.0


def higher_available() -> str | None:
    """None if ``higher`` imports, else why not (``"not installed"`` or the import error)."""
    try:
        import higher  # noqa: F401
    except ImportError:
        return "not installed"
    except Exception as e:  # noqa: BLE001 - any import-time failure means "skip it"
        return f"import failed: {type(e).__name__}: {e}"
    return None


def schedule_policy(schedule: str, *, slots: int = BINOMIAL_SLOTS, k: int = EVERY_K, budget_mib: float = BUDGET_MIB) -> object:
    """The unrollc checkpoint policy for a schedule name (binomial uses a fixed number of slots; budget is
    ``unrollc.Budget`` of ``budget_mib`` MiB: the cheapest schedule whose predicted peak fits)."""
    from unrollc.runtime.schedules import Binomial, Budget, EveryK, NoCheckpoint, Sqrt

    policies = {"none": NoCheckpoint(), "sqrt": Sqrt(), "binomial": Binomial(slots=slots), "every-k": EveryK(k),
                "budget": Budget(int(budget_mib * 2**20))}
    if schedule not in policies:
        raise ValueError(f"unrollc.bench: unknown schedule {schedule!r}; expected one of {list(policies)}.")
    return policies[schedule]


def _lr(task: Task) -> torch.Tensor:
    return torch.tensor(task.lr, device=task.device, requires_grad=True)


def _meta_grads(meta_loss: torch.Tensor, lr: torch.Tensor, task: Task) -> MetaResult:
    grads = torch.autograd.grad(meta_loss, [lr, *task.model.parameters()])
    return meta_loss.detach(), list(grads)


# ----------------------------------------------------------------------------------------------- unrollc
def unrollc_runner(
    task: Task, schedule: str, *, slots: int = BINOMIAL_SLOTS, k: int = EVERY_K, budget_mib: float = BUDGET_MIB
) -> Runner:
    """The meta-gradient with unrollc; the step graph is traced by the first call. ``run.plan(steps)`` is the
    plan the unroll executes (a budget's needs the step graph's bytes, so it is asked of the stepper)."""
    import unrollc
    from unrollc.runtime.unroll import plan_unroll

    stepper = unrollc.compile(task.model, task.new_optimizer(), task.loss_fn)
    policy = schedule_policy(schedule, slots=slots, k=k, budget_mib=budget_mib)

    def run(steps: int | None = None) -> MetaResult:
        lr = _lr(task)
        state = stepper.init(hyper={"lr": lr})
        state = stepper.unroll(state, task.batches[:steps], checkpoint=policy)
        meta_loss = task.loss_fn(lambda x: stepper.forward(state, x), task.val)  # type: ignore[arg-type]
        return _meta_grads(meta_loss, lr, task)

    def plan(steps: int | None = None) -> object:
        state = stepper.init(hyper={"lr": _lr(task)})
        return plan_unroll(stepper, state, task.batches[:steps], (), policy)

    run.plan = plan  # type: ignore[attr-defined]
    return run


# ------------------------------------------------------------------------------------------------ higher
def higher_runner(task: Task) -> Runner:
    """The meta-gradient with higher 0.2.1's differentiable optimizers."""
    import higher

    def run(steps: int | None = None) -> MetaResult:
        lr = _lr(task)
        opt = task.new_optimizer()
        with higher.innerloop_ctx(task.model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fm, diffopt):
            for batch in task.batches[:steps]:
                diffopt.step(task.loss_fn(fm, batch))
            meta_loss = task.loss_fn(fm, task.val)
            return _meta_grads(meta_loss, lr, task)

    return run


# ------------------------------------------------------------------------------------------------- eager
def eager_runner(task: Task) -> Runner:
    """A hand-written eager unroll with torch.optim's update rules (SGD with momentum, Adam)."""
    names = [n for n, _ in task.model.named_parameters()]
    kwargs = OPTIMIZERS[task.optimizer][1]
    update = _sgd_update(kwargs["momentum"]) if task.optimizer == "sgd" else _adam_update()

    def run(steps: int | None = None) -> MetaResult:
        lr = _lr(task)
        params = list(task.model.parameters())
        state: list[dict[str, torch.Tensor]] = [{} for _ in params]
        for t, batch in enumerate(task.batches[:steps], start=1):
            loss = task.loss_fn(lambda x: functional_call(task.model, dict(zip(names, params)), (x,)), batch)  # type: ignore[arg-type]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = [update(p, g, s, lr, t) for p, g, s in zip(params, grads, state, strict=True)]
        meta_loss = task.loss_fn(lambda x: functional_call(task.model, dict(zip(names, params)), (x,)), task.val)  # type: ignore[arg-type]
        return _meta_grads(meta_loss, lr, task)

    return run


Update = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int], torch.Tensor]


def _sgd_update(momentum: float) -> Update:
    def update(p: torch.Tensor, g: torch.Tensor, s: dict[str, torch.Tensor], lr: torch.Tensor, t: int) -> torch.Tensor:
        s["buf"] = g if "buf" not in s else s["buf"] * momentum + g
        return p - lr * s["buf"]

    return update


def _adam_update(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Update:
    b1, b2 = betas

    def update(p: torch.Tensor, g: torch.Tensor, s: dict[str, torch.Tensor], lr: torch.Tensor, t: int) -> torch.Tensor:
        s["m"] = (1 - b1) * g if t == 1 else s["m"] * b1 + (1 - b1) * g
        s["v"] = (1 - b2) * g * g if t == 1 else s["v"] * b2 + (1 - b2) * g * g
        denom = _safe_sqrt(s["v"]) / math.sqrt(1 - b2**t) + eps
        return p - (lr / (1 - b1**t)) * (s["m"] / denom)

    return update


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 where v == 0 (a weight whose gradient has been exactly 0, e.g. behind a dead ReLU):
    plain sqrt's infinite derivative there makes the meta-gradient NaN. unrollc's safe_sqrt pass and higher's
    Adam do the same."""
    positive = v > 0
    return torch.where(positive, v, torch.ones_like(v)).sqrt() * positive


# ------------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class MethodSpec:
    """One method (and, for unrollc, one schedule)."""

    method: str
    schedule: str = "-"

    @property
    def label(self) -> str:
        """E.g. ``"unrollc/sqrt"`` or ``"higher"``."""
        return self.method if self.schedule == "-" else f"{self.method}/{self.schedule}"


def build(
    task: Task, spec: MethodSpec, *, slots: int = BINOMIAL_SLOTS, k: int = EVERY_K, budget_mib: float = BUDGET_MIB
) -> Runner:
    """The runner of ``spec`` on ``task``."""
    if spec.method == "unrollc":
        return unrollc_runner(task, spec.schedule, slots=slots, k=k, budget_mib=budget_mib)
    if spec.method == "higher":
        return higher_runner(task)
    if spec.method == "eager":
        return eager_runner(task)
    raise ValueError(f"unrollc.bench: unknown method {spec.method!r}; expected one of {list(METHODS)}.")
