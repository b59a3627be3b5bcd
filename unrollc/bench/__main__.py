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
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from .methods import BINOMIAL_SLOTS, BUDGET_MIB, EVERY_K, METHODS, SCHEDULES
from .report import PlotUnavailable, plot, plot_path, read_csv, read_json, table, write_csv, write_json
from .runner import Config, Result, run_configs, usable_cpus
from .workloads import OPTIMIZERS, WORKLOADS

FIGURE_N = 160
FIGURE_SWEEP = (16, 32, 64, 128, 256, 512, 1024)
FIGURE_ROUNDS = 3


DEFAULTS: dict[str, Any] = {
    "workload": "mlp", "optimizer": ["sgd"], "n": [16, 64, 160], "methods": list(METHODS),
    "schedules": ["none", "sqrt", "binomial"], "slots": BINOMIAL_SLOTS, "every_k": EVERY_K, "budget_mib": BUDGET_MIB, "repeats": 1, "jobs": 1,
    "one_process": False,
}
QUICK: dict[str, Any] = {
    "workload": "mlp-small", "n": [4, 8], "schedules": list(SCHEDULES), "slots": 3, "every_k": 3, "repeats": 1, "jobs": 2,
    # per optimizer, small enough that the budget row picks a checkpointing schedule (SGD: EveryK(2), Binomial(2);
    # Adam: EveryK(2), Binomial(3)); Adam's larger state needs 0.67 MiB at least
    "budget_mib": {"sgd": 0.45, "adam": 0.9},
    "one_process": True,
}
FIGURES_FIXED = ("workload", "optimizer", "n", "methods", "schedules", "slots", "every_k", "budget_mib", "one_process")


def _at_least(lowest: float, kind: type = int) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring for what the defaults run). ``--quick`` changes the defaults of
    the options it sets, not options given explicitly; ``--figures`` runs a fixed set and refuses the options that
    would change it."""
    p = argparse.ArgumentParser(prog="python -m unrollc.bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    positive, positive_float = _at_least(1), _at_least(1e-9, float)
    p.add_argument("--workload", choices=sorted(WORKLOADS), help=f"default {DEFAULTS['workload']}")
    p.add_argument("--optimizer", nargs="+", choices=sorted(OPTIMIZERS), help="default sgd")
    p.add_argument("--n", nargs="+", type=positive, help="unrolled steps (default 16 64 160)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help=f"default {' '.join(METHODS)}")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES,
                   help="unrollc checkpoint schedules (default none sqrt binomial)")
    p.add_argument("--slots", type=positive, help="stored states of the binomial schedule (default 8)")
    p.add_argument("--every-k", type=positive, help="segment length of the every-k schedule (default 10)")
    p.add_argument("--budget-mib", type=positive_float,
                   help="memory budget of the budget schedule, unrollc.Budget, in MiB (default 64)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument("--repeats", type=positive, help="timed runs after the warm-up (median reported; default 1)")
    p.add_argument("--rounds", type=positive, default=1,
                   help="time every configuration this many times in turn, each in a new process "
                        "(default 1; --figures uses 3): robust ratios on a shared machine")
    p.add_argument("--threads", type=_at_least(0), default=1,
                   help="torch intra-op threads in each worker (default 1: stable timings on a shared machine; 0 = torch's default)")
    p.add_argument("--no-saved-bytes", action="store_true", help="skip the extra run counting bytes saved for backward (and FLOPs)")
    p.add_argument("--jobs", type=positive,
                   help="configurations run at once (default 1; more skews timings, --quick uses 2)")
    p.add_argument("--one-process", action="store_true", default=None,
                   help="measure time and memory of each configuration in one process (half the processes, for smoke "
                        "tests; its times carry the memory run's allocator settings; --quick uses it)")
    p.add_argument("--memory-jobs", type=positive,
                   help="memory processes run at once (default: the usable CPUs, at most 4; they measure peaks, saved "
                        "bytes and FLOPs, which CPU contention does not change)")
    p.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds per worker process (default 1800)")
    p.add_argument("--out-dir", default="bench_out", help="where results.json/.csv and bench.png go (default bench_out/)")
    p.add_argument("--csv", help="CSV path (default OUT_DIR/results.csv)")
    p.add_argument("--json", help="JSON path (default OUT_DIR/results.json)")
    p.add_argument("--plot", help="plot path, .png unless another suffix matplotlib writes (default OUT_DIR/bench.png)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=(
        f"tiny run for tests: {QUICK['workload']}, n {' '.join(map(str, QUICK['n']))}, every schedule (slots "
        f"{QUICK['slots']}, every-k {QUICK['every_k']}, budget "
        f"{', '.join(f'{v} MiB ({k})' for k, v in QUICK['budget_mib'].items())}), {QUICK['repeats']} repeat, "
        f"{QUICK['jobs']} jobs, one process per configuration; options given explicitly still apply"))
    mode.add_argument("--figures", action="store_true", help="the README figure set (takes ~30 minutes on 2 cores)")
    mode.add_argument("--replot", metavar="FILE", help="run nothing: print the table of a past run's results.json or "
                      "results.csv and write its plot (--plot; --csv/--json convert it, if given)")
    args = p.parse_args(argv)
    fixed = [f"--{k.replace('_', '-')}" for k in FIGURES_FIXED if getattr(args, k) is not None]
    if args.replot and fixed:
        p.error(f"--replot runs nothing, so {' '.join(fixed)} would change nothing; leave it out.")
    if args.replot:
        if not os.path.isfile(args.replot) or not args.replot.endswith((".json", ".csv")):
            p.error(f"--replot {args.replot!r}: expected an existing .json or .csv file written by python -m "
                    "unrollc.bench (results.json / results.csv)")
        # a replot writes a results file only when asked to, and never over the file it reads
        args.write_json, args.write_csv = bool(args.json), bool(args.csv)
        for option, path in (("json", args.json), ("csv", args.csv)):
            if path and os.path.abspath(path) == os.path.abspath(args.replot):
                p.error(f"--{option} {path!r} is the file --replot reads; give another path to convert it to.")
    if args.figures and fixed:
        p.error(f"--figures runs a fixed set of configurations (see --help); leave out {' '.join(fixed)}, or run "
                "without --figures to choose them.")
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.one_process and args.rounds > 1:
        p.error(f"--one-process measures each configuration once; leave out --rounds {args.rounds}, or --one-process.")
    args.n = list(dict.fromkeys(args.n))  # --n 4 4 runs n=4 once
    for option, path in (("csv", args.csv), ("json", args.json)):  # checked before the run, not after it
        if path and os.path.isdir(path):
            p.error(f"--{option} {path!r} is a folder; give a file path, e.g. {os.path.join(path, 'results.' + option)}.")
    try:
        args.plot = plot_path(args.plot or os.path.join(args.out_dir, "bench.png"))
    except ValueError as e:
        p.error(str(e).removeprefix("unrollc.bench: "))  # argparse prefixes the program's name
    args.json = args.json or os.path.join(args.out_dir, "results.json")
    args.csv = args.csv or os.path.join(args.out_dir, "results.csv")
    for option, path in (("json", args.json), ("csv", args.csv), ("plot", args.plot)):  # before the run, too
        if (why := _unwritable(path)) is not None:
            p.error(f"cannot write --{option} {path!r}: {why}.")
    return args


def _unwritable(path: str) -> str | None:
    """Why ``path`` could not be written after the run (its folder, made then, needs a writable ancestor)."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder"
    try:  # os.access says yes to root everywhere, /proc included: try it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        where = f"the folder {existing!r}" if existing == folder else f"{folder!r} cannot be made: {existing!r}"
        return f"{where} is not writable ({e.strerror})"
    return None


def _config(args: argparse.Namespace, optimizer: str, n: int, method: str, schedule: str = "-", **kw: Any) -> Config:
    fields: dict[str, Any] = dict(workload=args.workload, optimizer=optimizer, n=n, method=method, schedule=schedule,
                                  device=args.device, repeats=args.repeats, slots=args.slots, k=args.every_k,
                                  saved_bytes=not args.no_saved_bytes, threads=args.threads,
                                  budget_mib=args.budget_mib[optimizer] if isinstance(args.budget_mib, dict) else args.budget_mib)
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
            "threads_per_worker": args.threads, "one_process": bool(args.one_process), "wall_s": round(seconds, 1),
            "optimizers": {k: v[1] for k, v in OPTIMIZERS.items()}}


def _write(results: list[Result], args: argparse.Namespace, seconds: float) -> list[str]:
    paths = []
    json_path, csv_path = args.json, args.csv  # resolved and checked by parse_args
    write_json(results, json_path, _meta(args, seconds))
    write_csv(results, csv_path)
    paths += [json_path, csv_path]
    png = args.plot
    try:
        plot([r for r in results if r.config.optimizer == "sgd"] if args.figures else results, png,
             title=_title([args.workload]))
        paths.append(png)
    except PlotUnavailable as e:
        print(e, file=sys.stderr)
    return paths


def _title(workloads: Sequence[str]) -> str:
    """The plot's title: what was run, and what the meta-gradient is taken with respect to."""
    described = ", ".join(WORKLOADS[w].describe() if w in WORKLOADS else w for w in workloads)
    return f"{described}, meta-gradient w.r.t. initial weights and lr"


def replot(args: argparse.Namespace) -> int:
    """``--replot FILE``: the table and plot of a past run's results, running nothing."""
    results = read_json(args.replot) if args.replot.endswith(".json") else read_csv(args.replot)
    if not results:
        print(f"python -m unrollc.bench: --replot {args.replot!r} holds no results.", file=sys.stderr)
        return 2
    print(table(results))
    paths = []
    if args.write_json:
        write_json(results, args.json, {**_meta_of(args.replot), "replot_of": os.path.abspath(args.replot)})
        paths.append(args.json)
    if args.write_csv:
        write_csv(results, args.csv)
        paths.append(args.csv)
    try:
        plot(results, args.plot, title=_title(sorted({r.config.workload for r in results})))
        paths.append(args.plot)
    except PlotUnavailable as e:
        print(e, file=sys.stderr)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _meta_of(path: str) -> dict[str, Any]:
    """The ``meta`` of a results.json (how that run was made), kept when a replot converts it; none for a CSV."""
    if not path.endswith(".json"):
        return {}
    with open(path) as f:
        meta = json.load(f).get("meta", {})
    return meta if isinstance(meta, dict) else {}


def _warn_if_busy(args: argparse.Namespace) -> None:
    """A note when other processes already use the CPUs the timings need (each row's ``loadavg`` keeps the load)."""
    if args.device != "cpu" or not hasattr(os, "getloadavg"):
        return
    load, cpus = os.getloadavg()[0], usable_cpus()
    if load > cpus - 0.5:
        print(f"unrollc.bench: note: the load average is {load:.1f} on {cpus} usable CPUs before the run: other "
              "processes compete for the CPU, so timings will be slower and noisier than on an idle machine "
              "(memory, saved bytes and FLOPs are not affected; --rounds 3 --repeats 3 pools timings over time).",
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints the table and where the files went."""
    args = parse_args(argv)
    if args.replot:
        return replot(args)
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
          f"{WORKLOADS[args.workload].describe()}, each in "
          f"{'one fresh process (time and memory)' if args.one_process else 'fresh processes (time, then memory)'}",
          file=sys.stderr)
    _warn_if_busy(args)
    start = time.perf_counter()
    common = dict(timeout=args.timeout, jobs=args.jobs, memory_jobs=args.memory_jobs)
    results = run_configs(compared, rounds=max(args.rounds, FIGURE_ROUNDS), **common)
    results += run_configs(sweeps, rounds=args.rounds, one_process=args.one_process, **common)
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
