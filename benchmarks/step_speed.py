"""One compiled ``stepper.step`` vs the same eager step (forward, backward, ``opt.step()``).

Same model (the default MLP 256-512-512-10, or ``--workload mlp-small``, where the time is mostly Python per
op), optimizer, batch; median over many steps after a warm-up (the compiled step is traced during the warm-up).
The compiled step runs without a graph here (plain training), as does the eager one. ``--optimizer`` is the
benchmark's ``sgd`` (momentum 0.9) or ``adam``, or any ``torch.optim`` class by name with ``lr=1e-3``
(``RAdam``, whose guard on the step count is checked at every step).

    python benchmarks/step_speed.py [--workload mlp|mlp-small] [--optimizer sgd|adam|RAdam|...] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import unrollc
from unrollc.bench.workloads import OPTIMIZERS, WORKLOADS, loss_fn, make_optimizer, make_task


def _optimizer(name: str, params: object) -> torch.optim.Optimizer:
    if name in OPTIMIZERS:
        return make_optimizer(name, params)
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise SystemExit(f"step_speed: --optimizer {name!r} is neither {sorted(OPTIMIZERS)} nor a torch.optim class name.")
    return cls(params, lr=1e-3)  # type: ignore[call-arg]


def _median_seconds(fn: object, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()  # type: ignore[operator]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Print the median step time of each and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS))
    p.add_argument("--optimizer", default="sgd", help="sgd, adam, or a torch.optim class name (RAdam, NAdam, ...)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task(args.workload, "sgd", 1)
    batch = task.batches[0]

    model = copy.deepcopy(task.model)
    opt = _optimizer(args.optimizer, model.parameters())

    def eager_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    stepper = unrollc.compile(task.model, _optimizer(args.optimizer, task.model.parameters()), loss_fn)
    state = {"s": stepper.init(params={n: p.detach().clone() for n, p in task.model.named_parameters()})}

    def compiled_step() -> None:
        with torch.no_grad():
            state["s"] = stepper.step(state["s"], batch)

    eager = _median_seconds(eager_step, args.steps, 10)
    compiled = _median_seconds(compiled_step, args.steps, 10)
    print(f"{WORKLOADS[args.workload].describe()}, {args.optimizer}, {args.threads} thread(s), median of {args.steps} steps")
    print(f"  eager forward+backward+opt.step(): {eager * 1e3:8.3f} ms")
    print(f"  unrollc stepper.step:              {compiled * 1e3:8.3f} ms   ({compiled / eager:.2f}x eager)")


if __name__ == "__main__":
    main()
