"""n=100 unroll with meta-gradient (w.r.t. initial weights and lr): unrollc (no checkpoint) vs higher.

Both run in this one process, alternating, on the default MLP; medians of ``--repeats`` runs after a warm-up
each (unrollc's warm-up traces its step graph). For memory, use ``python -m unrollc.bench`` (fresh processes).

    python benchmarks/unroll_vs_higher.py [--optimizer sgd|adam] [--n 100] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unrollc.bench.methods import MethodSpec, build, higher_available
from unrollc.bench.workloads import WORKLOADS, make_task


def main() -> None:
    """Print each method's median time, meta-gradient norm and the ratio unrollc / higher."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if (why := higher_available()) is not None:
        raise SystemExit(f"benchmarks/unroll_vs_higher.py: needs higher ({why}); pip install --no-deps higher==0.2.1")
    task = make_task("mlp", args.optimizer, args.n)
    runners = {label: build(task, MethodSpec(*spec)) for label, spec in
               (("unrollc", ("unrollc", "none")), ("higher", ("higher",)))}
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
    print(f"{WORKLOADS['mlp'].describe()}, {args.optimizer}, n={args.n}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    for label in runners:
        print(f"  {label:8s} {med[label]:7.3f} s   meta-grad norm {norms[label]:.6g}")
    print(f"  unrollc / higher: {med['unrollc'] / med['higher']:.2f}x time")


if __name__ == "__main__":
    main()
