"""One compiled ``stepper.step`` vs the same eager step (forward, backward, ``opt.step()``).

Same model (the default MLP 256-512-512-10), optimizer, batch; median over many steps after a warm-up
(the compiled step is traced during the warm-up). The compiled step runs without a graph here (plain
training), as does the eager one.

    python benchmarks/step_speed.py [--optimizer sgd|adam] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import unrollc
from unrollc.bench.workloads import WORKLOADS, loss_fn, make_optimizer, make_task


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
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task("mlp", args.optimizer, 1)
    batch = task.batches[0]

    model = copy.deepcopy(task.model)
    opt = make_optimizer(args.optimizer, model.parameters())

    def eager_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    stepper = unrollc.compile(task.model, task.new_optimizer(), loss_fn)
    state = {"s": stepper.init(params={n: p.detach().clone() for n, p in task.model.named_parameters()})}

    def compiled_step() -> None:
        with torch.no_grad():
            state["s"] = stepper.step(state["s"], batch)

    eager = _median_seconds(eager_step, args.steps, 10)
    compiled = _median_seconds(compiled_step, args.steps, 10)
    print(f"{WORKLOADS['mlp'].describe()}, {args.optimizer}, {args.threads} thread(s), median of {args.steps} steps")
    print(f"  eager forward+backward+opt.step(): {eager * 1e3:8.3f} ms")
    print(f"  unrollc stepper.step:              {compiled * 1e3:8.3f} ms   ({compiled / eager:.2f}x eager)")


if __name__ == "__main__":
    main()
