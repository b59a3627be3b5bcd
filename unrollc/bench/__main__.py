"""``python -m unrollc.bench``: meta-gradient benchmarks of unrollc against higher and an eager unroll.

What the default runs (a few minutes on 2 CPU cores): the ``mlp`` workload (MLP 256-512-512-10, batch 256,
cross-entropy, seeded random data) with SGD (lr 0.01, momentum 0.9), n = 16, 64, 160 unrolled steps, methods
unrollc (schedules none, sqrt, binomial with 8 slots), higher and eager; one timed run after one warm-up
(``--repeats`` for more), each configuration in two fresh processes (one times it, one measures its memory;
the timing processes run one at a time, the memory processes side by side), one intra-op thread. Results go to
``bench_out/`` (``results.json``, ``results.csv``, ``bench.png``) and a table is printed.

``--figures`` runs the README's figure set instead: n=160 with SGD-momentum and Adam (unrollc none, unrollc
sqrt, higher; timed in 3 alternating rounds of fresh processes, 3 runs each), and memory and time vs n
(16 .. 1024) for unrollc none, sqrt, binomial(8 slots) and higher with SGD-momentum.
``--quick`` runs a tiny workload for tests.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from .methods import METHODS, SCHEDULES
from .report import PlotUnavailable, plot, table, write_csv, write_json
from .runner import Config, Result, run_configs, usable_cpus
from .workloads import OPTIMIZERS, WORKLOADS

FIGURE_N = 160
FIGURE_SWEEP = (16, 32, 64, 128, 256, 512, 1024)
FIGURE_ROUNDS = 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring for what the defaults run)."""
    p = argparse.ArgumentParser(prog="python -m unrollc.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS))
    p.add_argument("--optimizer", nargs="+", default=["sgd"], choices=sorted(OPTIMIZERS))
    p.add_argument("--n", nargs="+", type=int, default=[16, 64, 160], help="unrolled steps (default 16 64 160)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--schedules", nargs="+", default=["none", "sqrt", "binomial"], choices=SCHEDULES,
                   help="unrollc checkpoint schedules (default none sqrt binomial)")
    p.add_argument("--slots", type=int, default=8, help="stored states of the binomial schedule (default 8)")
    p.add_argument("--every-k", type=int, default=10, help="segment length of the every-k schedule (default 10)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median reported; default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every configuration this many times in turn, each in a new process (default 1; "
                        "--figures uses 3): robust ratios on a shared machine")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in each worker (default 1: stable timings on a shared machine; 0 = torch's default)")
    p.add_argument("--no-saved-bytes", action="store_true", help="skip the extra run counting bytes saved for backward")
    p.add_argument("--jobs", type=int, default=1,
                   help="configurations run at once (default 1; more skews timings, --quick uses 2)")
    p.add_argument("--memory-jobs", type=int, default=None,
                   help="memory processes run at once (default: the usable CPUs, at most 4; they measure peaks, saved "
                        "bytes and FLOPs, which CPU contention does not change)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--out-dir", default="bench_out", help="where results.json/.csv and bench.png go (default bench_out/)")
    p.add_argument("--csv", help="CSV path (default OUT_DIR/results.csv)")
    p.add_argument("--json", help="JSON path (default OUT_DIR/results.json)")
    p.add_argument("--plot", help="PNG path (default OUT_DIR/bench.png; needs matplotlib)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny workload (mlp-small, n 4 8, 1 repeat) for tests")
    mode.add_argument("--figures", action="store_true", help="the README figure set (takes ~30 minutes on 2 cores)")
    args = p.parse_args(argv)
    if args.quick:
        args.workload, args.n, args.repeats, args.slots, args.every_k = "mlp-small", [4, 8], 1, 3, 3
        args.schedules = list(SCHEDULES)
        args.jobs = max(args.jobs, 2)
    return args


def _config(args: argparse.Namespace, optimizer: str, n: int, method: str, schedule: str = "-", **kw: Any) -> Config:
    fields: dict[str, Any] = dict(workload=args.workload, optimizer=optimizer, n=n, method=method, schedule=schedule,
                                  device=args.device, repeats=args.repeats, slots=args.slots, k=args.every_k,
                                  saved_bytes=not args.no_saved_bytes, threads=args.threads)
    fields.update(kw)
    return Config(**fields)


def default_configs(args: argparse.Namespace) -> list[Config]:
    """Every (optimizer, n, method[, schedule]) the options ask for."""
    out = []
    for opt in args.optimizer:
        for n in args.n:
            for method in args.methods:
                schedules = args.schedules if method == "unrollc" else ["-"]
                out += [_config(args, opt, n, method, s) for s in schedules]
    return out


def figure_configs(args: argparse.Namespace) -> tuple[list[Config], list[Config]]:
    """The figure set: ``(compared, sweeps)``. ``compared``: n=160 with sgd and adam (unrollc none/sqrt, higher),
    timed in FIGURE_ROUNDS alternating rounds; ``sweeps``: every method vs n with sgd (unrollc none, sqrt and
    binomial, higher: the linear growth next to the schedules'), timed once."""
    args.workload = "mlp"
    compared = [_config(args, opt, FIGURE_N, m, s, repeats=max(args.repeats, 3))
                for opt in ("sgd", "adam") for m, s in (("unrollc", "none"), ("unrollc", "sqrt"), ("higher", "-"))]
    methods = (("unrollc", "none"), ("unrollc", "sqrt"), ("unrollc", "binomial"), ("higher", "-"))
    sweeps = [_config(args, "sgd", n, m, s, repeats=1) for m, s in methods for n in FIGURE_SWEEP]
    return compared, sweeps


def _meta(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    import torch

    return {"argv": sys.argv[1:], "workload": WORKLOADS[args.workload].describe(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": usable_cpus(),
            "threads_per_worker": args.threads, "wall_s": round(seconds, 1),
            "optimizers": {k: v[1] for k, v in OPTIMIZERS.items()}}


def _write(results: list[Result], args: argparse.Namespace, seconds: float) -> list[str]:
    import os

    paths = []
    json_path = args.json or os.path.join(args.out_dir, "results.json")
    csv_path = args.csv or os.path.join(args.out_dir, "results.csv")
    write_json(results, json_path, _meta(args, seconds))
    write_csv(results, csv_path)
    paths += [json_path, csv_path]
    png = args.plot or os.path.join(args.out_dir, "bench.png")
    try:
        plot([r for r in results if r.config.optimizer == "sgd"] if args.figures else results, png,
             title=f"{WORKLOADS[args.workload].describe()}, meta-gradient w.r.t. initial weights and lr")
        paths.append(png)
    except PlotUnavailable as e:
        print(e, file=sys.stderr)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints the table and where the files went."""
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"python -m unrollc.bench: --device cuda, but this torch ({torch.__version__}) sees no CUDA device "
                  "(torch.cuda.is_available() is False); install a CUDA build of torch on a machine with a GPU, "
                  "or use --device cpu.", file=sys.stderr)
            return 2
    compared, sweeps = figure_configs(args) if args.figures else ([], default_configs(args))
    configs = compared + sweeps
    print(f"unrollc.bench: {len(configs)} configurations on {args.device}, "
          f"{WORKLOADS[args.workload].describe()}, each in fresh processes (time, then memory)", file=sys.stderr)
    start = time.perf_counter()
    common = dict(timeout=args.timeout, jobs=args.jobs, memory_jobs=args.memory_jobs)
    results = run_configs(compared, rounds=max(args.rounds, FIGURE_ROUNDS), **common)
    results += run_configs(sweeps, rounds=args.rounds, **common)
    seconds = time.perf_counter() - start
    print(table(results))
    if any(r.config.method == "higher" and r.config.optimizer == "adam" and r.status == "ok" for r in results):
        print("note: higher's Adam puts eps outside the bias correction, so its Adam meta-gradient differs "
              "slightly from torch.optim's (and unrollc's, which traces torch.optim).")
    for path in _write(results, args, seconds):
        print(f"wrote {path}")
    print(f"total {seconds:.0f} s")
    return 0 if all(r.status in ("ok", "not installed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
