"""n-step unroll with meta-gradient (w.r.t. initial weights and lr): unrollc (each schedule) vs higher, paired.

All methods run in this one process, alternating, on the default MLP; medians of ``--repeats`` runs after a
warm-up each (unrollc's warm-up traces its step graph). Alternating makes the ratios robust to a shared machine's
slow phases, which move fresh-process timings by 10-20%. For memory, use ``python -m unrollc.bench``.

    python benchmarks/unroll_vs_higher.py [--workload mlp|mlp-small] [--optimizer sgd|adam] [--n 100] [--schedules none sqrt] [--repeats 5]
                                          [--matmul-share] [--phases]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from unrollc.bench.methods import SCHEDULES, MethodSpec, build, higher_available
from unrollc.bench.workloads import WORKLOADS, Task, make_task


def main() -> None:
    """Print each method's median time, meta-gradient norm and the ratio unrollc / higher."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS),
                   help="mlp (FLOP-bound on a CPU) or mlp-small (overhead-bound, like mlp on a GPU)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--schedules", nargs="+", default=["none"], choices=SCHEDULES)
    p.add_argument("--matmul-share", action="store_true",
                   help="also profile one run per method: the share of its CPU time spent in matrix products")
    p.add_argument("--phases", action="store_true",
                   help="also time unrollc's phases: the no-grad sweep, the taped forward, and the meta-backward")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if (why := higher_available()) is not None:
        raise SystemExit(f"benchmarks/unroll_vs_higher.py: needs higher ({why}); pip install --no-deps higher==0.2.1")
    task = make_task(args.workload, args.optimizer, args.n)
    specs = [MethodSpec("unrollc", s) for s in args.schedules] + [MethodSpec("higher")]
    runners = {spec.label: build(task, spec) for spec in specs}
    times: dict[str, list[float]] = {label: [] for label in runners}
    norms: dict[str, float] = {}
    for run in runners.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for label, run in runners.items():
            start = time.perf_counter()
            _, grads = run()
            times[label].append(time.perf_counter() - start)
            norms[label] = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[1:]])))
    med = {label: statistics.median(ts) for label, ts in times.items()}
    print(f"{WORKLOADS[args.workload].describe()}, {args.optimizer}, n={args.n}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    for label in runners:
        print(f"  {label:14s} {med[label]:7.3f} s   meta-grad norm {norms[label]:.6g}")
    if args.matmul_share:
        for label, run in runners.items():
            print(f"  {label:14s} matrix products: {100 * matmul_share(run):.0f}% of the profiled CPU time")
    if args.phases:
        phases = phase_times(task, args.repeats)
        for name, seconds in phases.items():
            print(f"  unrollc phase  {name:28s} {seconds:7.3f} s")
    for label in runners:
        if label != "higher":
            print(f"  {label} / higher: {med[label] / med['higher']:.2f}x time")


def phase_times(task: Task, repeats: int) -> dict[str, float]:
    """Medians of unrollc's phases on ``task``, alternating: the forward sweep without a graph (what checkpointing
    runs first), the forward with its graph (what it re-runs), the whole unroll + meta-backward without
    checkpointing, and the meta-backward alone (the difference of the last two)."""
    import unrollc

    stepper = unrollc.compile(task.model, task.new_optimizer(), task.loss_fn)

    def sweep() -> None:
        with torch.no_grad():
            stepper.unroll(stepper.init(), task.batches)

    def taped() -> object:
        return stepper.unroll(stepper.init(hyper={"lr": torch.tensor(task.lr, requires_grad=True)}), task.batches)

    runs = {"forward sweep, no graph": sweep, "forward with graph": taped,
            "forward + meta-backward": build(task, MethodSpec("unrollc", "none"))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up (traces the step graph)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med["meta-backward (difference)"] = med["forward + meta-backward"] - med["forward with graph"]
    return med


def matmul_share(run: Callable[[], object]) -> float:
    """The fraction of ``run()``'s profiled self CPU time spent in ``mm``/``addmm``/``bmm``/``addbmm``/``baddbmm``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addbmm", "aten::baddbmm"}
    return sum(e.self_cpu_time_total for e in events if e.key in products) / total


if __name__ == "__main__":
    main()
