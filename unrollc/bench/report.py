"""Reporting results: the printed table, CSV, JSON and the PNG (memory vs n, time vs n).

Ratios compare with ``higher`` on the same workload, optimizer, n and device ("-" where higher did not run).
``grad Δ`` is the relative difference of the meta-gradient norm from the ``eager`` reference of the same
configuration (higher's Adam differs from torch.optim's by design: eps outside the bias correction).
``GFLOP`` counts the matrix products executed (forward, backward, recomputation); ``flop/higher`` is the floor
of ``time/higher`` where matrix products dominate the time (SGD on the default MLP on one CPU thread: ~80% of
higher's time; Adam's elementwise update makes them a smaller share).

The CSV and JSON hold one record per configuration (:data:`COLUMNS` says what each field is); :func:`read_json`
and :func:`read_csv` read them back (``python -m unrollc.bench --replot FILE`` prints and plots a past run).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .runner import Config, Result

__all__ = ["COLUMNS", "table", "write_csv", "write_json", "read_csv", "read_json", "plot", "plot_path", "ratio", "reference", "PlotUnavailable"]

MIB = 2**20

COLUMNS: dict[str, str] = {
    "workload": "the built-in workload (unrollc.bench.workloads.WORKLOADS)",
    "optimizer": "sgd (SGD-momentum) or adam",
    "n": "unrolled steps",
    "method": "unrollc, higher or eager (a hand-written autograd.grad(create_graph=True) unroll)",
    "schedule": "unrollc's checkpoint schedule (none, sqrt, binomial, every-k, budget); '-' for the others",
    "device": "cpu or cuda",
    "repeats": "timed runs after the warm-up",
    "slots": "stored states of the binomial schedule",
    "k": "segment length of the every-k schedule",
    "saved_bytes": "whether the memory process also counted saved bytes and FLOPs",
    "threads": "intra-op threads per worker (0: torch's default)",
    "budget_mib": "the budget schedule's memory budget, MiB",
    "label": "method/schedule, as in the plot's legend",
    "status": "ok, 'not installed', or the error that stopped the configuration",
    "time_s": "median seconds of unroll + meta-backward over the timed runs",
    "times_s": "every timed run, seconds (';'-separated in the CSV)",
    "warmup_s": "seconds of the warm-up run (for unrollc it includes tracing the step graph)",
    "peak_bytes": "peak memory above the pre-unroll baseline: RSS on the CPU, max_memory_allocated on CUDA",
    "peaks_bytes": "every memory measurement, bytes",
    "memory_how": "how peak_bytes was measured",
    "saved_peak_bytes": "peak bytes autograd held saved for backward (saved-tensor hooks)",
    "saved_total_bytes": "all bytes autograd saved over the run",
    "flops": "FLOPs of the matrix products executed (forward, backward and recomputation)",
    "meta_loss": "the validation loss after the unroll",
    "grad_norm": "norm of the meta-gradient w.r.t. the initial weights",
    "lr_grad": "meta-gradient w.r.t. the learning rate",
    "evaluations": "step evaluations unrollc ran (n plus recomputation)",
    "resolved": "the schedule unrollc's plan implements (what the budget picked; sqrt is EveryK(k))",
    "loadavg": "the machine's 1-minute load average when the timing ran",
    "torch_version": "torch.__version__ in the worker",
    "time_vs_higher": "time_s / higher's in the same (workload, optimizer, n, device)",
    "mem_vs_higher": "peak_bytes / higher's",
    "flops_vs_higher": "flops / higher's",
    "grad_rel_diff_vs_eager": "abs(grad_norm - eager's) / eager's",
}


class PlotUnavailable(RuntimeError):
    """Raised by :func:`plot` when matplotlib is not installed."""


def _group(r: Result) -> tuple[str, str, int, str]:
    c = r.config
    return (c.workload, c.optimizer, c.n, c.device)


def reference(results: Sequence[Result], r: Result, method: str) -> Result | None:
    """The successful result of ``method`` (no schedule) in ``r``'s group, if any."""
    for other in results:
        if other.config.method == method and _group(other) == _group(r) and other.status == "ok":
            return other
    return None


def ratio(results: Sequence[Result], r: Result, attr: str, method: str = "higher") -> float | None:
    """``r.attr / ref.attr`` against ``method`` in the same group (None if either is missing)."""
    ref = reference(results, r, method)
    a, b = getattr(r, attr), getattr(ref, attr) if ref else None
    if not a or not b:  # missing, or a peak of 0 bytes: below what RSS resolves (small workloads)
        return None
    return a / b


def grad_rel_diff(results: Sequence[Result], r: Result) -> float | None:
    """Relative difference of ``r``'s meta-gradient norm from eager's in the same group."""
    ref = reference(results, r, "eager")
    if ref is None or r.grad_norm is None or not ref.grad_norm:
        return None
    return abs(r.grad_norm - ref.grad_norm) / abs(ref.grad_norm)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _schedule(r: Result) -> str:
    """The schedule column: a budget shows the schedule it picked (``budget: Binomial(slots=19)``)."""
    return f"{r.config.schedule}: {r.resolved}" if r.config.schedule == "budget" and r.resolved else r.config.schedule


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: they become null (strict parsers reject Python's bare ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def table(results: Sequence[Result]) -> str:
    """A plain-text table, one row per configuration."""
    head = ["workload", "opt", "method", "schedule", "n", "time (s)", "peak (MiB)", "saved (MiB)",
            "time/higher", "mem/higher", "GFLOP", "flop/higher", "grad norm", "lr grad", "grad Δ vs eager", "status"]
    rows = []
    for r in results:
        c = r.config
        rows.append([
            c.workload, c.optimizer, c.method, _schedule(r), str(c.n),
            _fmt(r.time_s, ".3f"),
            _fmt(None if r.peak_bytes is None else r.peak_bytes / MIB, ".1f"),
            _fmt(None if r.saved_peak_bytes is None else r.saved_peak_bytes / MIB, ".1f"),
            _fmt(ratio(results, r, "time_s"), ".2f"),
            _fmt(ratio(results, r, "peak_bytes"), ".3f"),
            _fmt(None if r.flops is None else r.flops / 1e9, ".1f" if (r.flops or 0) >= 1e9 else ".3g"),  # --quick
            _fmt(ratio(results, r, "flops"), ".2f"),
            _fmt(r.grad_norm, ".6g"),
            _fmt(r.lr_grad, ".6g"),
            _fmt(grad_rel_diff(results, r), ".1e"),
            r.status if len(r.status) <= _STATUS_WIDTH else r.status[: _STATUS_WIDTH - 9] + "… (below)",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])  # the last column is not padded: a long status does not widen the rule
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    long = [r for r in results if len(r.status) > _STATUS_WIDTH]
    if long:
        out += ["", "statuses in full:"]
        out += [f"  {r.config.describe()}: {r.status}" for r in long]
    return "\n".join(out)


_STATUS_WIDTH = 40  # a longer status (an error message) is shortened in its row and printed in full below the table


def _records(results: Sequence[Result]) -> list[dict[str, Any]]:
    recs = []
    for r in results:
        d = r.to_dict()
        d["time_vs_higher"] = ratio(results, r, "time_s")
        d["mem_vs_higher"] = ratio(results, r, "peak_bytes")
        d["flops_vs_higher"] = ratio(results, r, "flops")
        d["grad_rel_diff_vs_eager"] = grad_rel_diff(results, r)
        recs.append(d)
    return recs


def write_json(results: Sequence[Result], path: str, meta: dict[str, Any] | None = None) -> None:
    """``{"meta": ..., "results": [...]}`` with ratios included."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite({"meta": meta or {}, "results": _records(results)}), f, indent=1, allow_nan=False)


def read_json(path: str) -> list[Result]:
    """Results written by :func:`write_json`."""
    with open(path) as f:
        return [Result.from_dict(d) for d in json.load(f)["results"]]


def read_csv(path: str) -> list[Result]:
    """Results written by :func:`write_csv` (the ratio columns are recomputed, not read)."""
    types = {f.name: str(f.type) for cls in (Config, Result) for f in dataclasses.fields(cls)}
    with open(path, newline="") as f:
        return [Result.from_dict(_typed(row, types)) for row in csv.DictReader(f)]


def _typed(row: dict[str, str], types: dict[str, str]) -> dict[str, Any]:
    """A CSV row's strings as the types of :class:`Config` and :class:`Result` fields (``types``: name -> type)."""
    out: dict[str, Any] = {}
    for name, text in row.items():
        kind = types.get(name)
        if kind is None or kind == "Config":
            continue
        if kind.startswith("list["):
            item = float if "float" in kind else int
            out[name] = [item(v) for v in text.split(";")] if text else []
        elif text == "" and "None" in kind:
            out[name] = None
        elif kind.startswith("bool"):
            out[name] = text == "True"
        elif kind.startswith(("int", "float")):
            out[name] = (int if kind.startswith("int") else float)(text)
        else:
            out[name] = text
    return out


def write_csv(results: Sequence[Result], path: str) -> None:
    """One row per configuration; list-valued fields are joined with ``;``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    recs = _records(results)
    if not recs:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        for rec in recs:
            w.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in rec.items()})


def plot_path(path: str) -> str:
    """The file :func:`plot` will write for ``path``: ``.png`` is added to a path without a suffix; a suffix
    matplotlib cannot write raises ValueError (checked before a run, not after it)."""
    root, ext = os.path.splitext(path)
    if not ext:
        return path + ".png"
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:  # plot() says what to install
        return path
    formats = FigureCanvasAgg.get_supported_filetypes()
    if ext[1:].lower() not in formats:
        raise ValueError(
            f"unrollc.bench: cannot write a plot to {path!r}: matplotlib writes {', '.join(sorted(formats))}; "
            f"use e.g. {root}.png or {root}.svg."
        )
    return path


def plot(results: Sequence[Result], path: str, title: str = "") -> None:
    """Two log-log panels, peak memory vs n and time vs n, one line per (optimizer, method, schedule): a colour
    per method and schedule, a line style per optimizer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise PlotUnavailable(
            "unrollc.bench: no plot written: matplotlib is not installed; install it with `pip install matplotlib` "
            "(or `pip install 'unrollc[bench]'`). The table, CSV and JSON do not need it."
        ) from e
    lines: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.status == "ok":
            lines.setdefault((r.config.label, r.config.optimizer), []).append(r)
    # One colour per method, one line style per optimizer: a method keeps its colour across optimizers, and no
    # two lines share both (matplotlib's cycle repeats its 10 colours from the 11th line on).
    methods = sorted({label for label, _ in lines})
    opts = list(dict.fromkeys(r.config.optimizer for r in results if r.status == "ok"))  # the first is drawn solid
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (label, opt), rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: r.config.n)
        key = label if len(opts) == 1 else f"{label} ({opt})"
        style = {"marker": "o", "label": key, "color": palette(methods.index(label) % palette.N),
                 "linestyle": ("-", "--", ":", "-.")[opts.index(opt) % 4]}
        # a peak of 0 bytes is below what peak RSS resolves on a small workload: no point, not a fake 1 byte
        mem = [(r.config.n, r.peak_bytes / MIB) for r in rs if r.peak_bytes]
        if mem:
            ax_mem.plot([n for n, _ in mem], [m for _, m in mem], **style)
        times = [(r.config.n, r.time_s) for r in rs if r.time_s]
        if times:
            ax_time.plot([n for n, _ in times], [t for _, t in times], **style)
    for ax, what in ((ax_mem, "peak memory (MiB)"), (ax_time, "unroll + meta-backward (s)")):
        ax.set_xscale("log", base=2)  # n labelled at powers of two (16, 32, ..., 1024), as plain numbers
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        if ax.has_data():  # a log axis needs a positive value; an empty panel says why it is empty
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())  # 600, not 6 x 10^2
            ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
        else:
            ax.text(0.5, 0.5, "nothing measured above 0", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("unrolled steps n")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    if ax_time.has_data():
        ax_time.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
