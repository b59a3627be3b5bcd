"""Running configurations, each in fresh subprocesses, and what one run measures.

A :class:`Config` is one (workload, optimizer, n, method, schedule, device). :func:`run_config` measures it in
two fresh ``python -m unrollc.bench._worker`` processes and merges a :class:`Result`:

* the **time** process runs with the allocator as users have it: a warm-up (this traces unrollc's step graph;
  its time is ``warmup_s``), then ``repeats`` timed runs of unroll + meta-backward (median reported); the
  meta-loss and the meta-gradient's norms come from its last run;
* the **memory** process runs with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so that freed tensors
  leave the resident set (see :mod:`unrollc.bench.memory`): a short warm-up (the first ``WARMUP_STEPS`` batches:
  it traces unrollc's step graph and runs every code path once), one run measuring the peak, then, unless
  disabled, one run counting the bytes saved for backward and the FLOPs executed. Nothing it measures depends on
  the CPU time it gets, so memory processes run several at once (``memory_jobs``).

Timing under those malloc settings would be wrong: every tensor of 64 KiB or more becomes a fresh ``mmap`` whose
pages fault in on first touch, which was measured to add 40-70% to every method's time on the default workload
(higher, SGD, n=160: 5.7 s vs 3.5 s), more for methods that allocate more. On CUDA both parts run the same way.

CPU runs use one intra-op thread by default (``Config.threads``): on a small shared machine, two OpenMP threads
spin-wait whenever another process holds a core, and single runs were measured 10-30x slower at random.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Config", "Result", "combine", "measure_config", "merge", "run_config", "run_configs", "MALLOC_ENV", "PARTS"]

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Config:
    """One measured configuration."""

    workload: str
    optimizer: str
    n: int
    method: str
    schedule: str = "-"
    device: str = "cpu"
    repeats: int = 3
    slots: int = 8
    k: int = 10
    saved_bytes: bool = True
    threads: int = 1
    budget_mib: float = 64.0

    def __post_init__(self) -> None:
        from .methods import METHODS, SCHEDULES
        from .workloads import OPTIMIZERS, WORKLOADS

        choices = {"workload": WORKLOADS, "optimizer": OPTIMIZERS, "method": METHODS, "device": ("cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unrollc.bench.Config: unknown {name} {getattr(self, name)!r}; expected one of {sorted(allowed)}."
                )
        allowed_schedules = SCHEDULES if self.method == "unrollc" else ("-",)
        if self.schedule not in allowed_schedules:
            raise ValueError(
                f"unrollc.bench.Config: schedule {self.schedule!r} for method {self.method!r}; expected one of "
                f"{list(allowed_schedules)} (schedules are unrollc's checkpoint policies, '-' for the others)."
            )
        for name in ("n", "repeats", "slots", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"unrollc.bench.Config: {name} must be an int >= 1, got {getattr(self, name)!r}.")
        if self.threads < 0 or not self.budget_mib > 0:
            raise ValueError(
                f"unrollc.bench.Config: expected threads >= 0 (0: torch's default) and budget_mib > 0, got "
                f"threads={self.threads!r}, budget_mib={self.budget_mib!r}."
            )

    @property
    def label(self) -> str:
        """``"unrollc/sqrt"``, ``"higher"``, ..."""
        return self.method if self.schedule == "-" else f"{self.method}/{self.schedule}"

    def describe(self) -> str:
        """One line for progress output."""
        return f"{self.workload}/{self.optimizer} n={self.n} {self.label}"


@dataclass
class Result:
    """What one configuration measured. ``status`` is ``"ok"``, ``"not installed"`` or an error message;
    ``resolved`` is the schedule unrollc's plan implements (``Budget`` picks one, ``"sqrt"`` is ``EveryK(k)``)."""

    config: Config
    status: str = "ok"
    time_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    peak_bytes: int | None = None
    peaks_bytes: list[int] = field(default_factory=list)
    memory_how: str = ""
    saved_peak_bytes: int | None = None
    saved_total_bytes: int | None = None
    flops: int | None = None
    meta_loss: float | None = None
    grad_norm: float | None = None
    lr_grad: float | None = None
    evaluations: int | None = None
    resolved: str = ""
    loadavg: float | None = None
    torch_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A flat dict (config fields first) for JSON/CSV."""
        d = dataclasses.asdict(self)
        cfg = d.pop("config")
        return {**cfg, "label": self.config.label, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(Config)}
        cfg = Config(**{k: v for k, v in d.items() if k in names})
        rest = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name != "config" and f.name in d}
        return cls(cfg, **rest)


# ------------------------------------------------------------------------------------------- in the worker
PARTS = ("time", "memory")


def measure_config(cfg: Config, part: str = "all") -> Result:
    """Measure ``cfg`` in this process (the worker's job; call it in a fresh process for honest memory).

    ``part`` is ``"time"`` (warm-up, ``repeats`` timed runs), ``"memory"`` (a ``WARMUP_STEPS``-step warm-up, one
    run for the peak, one counting saved bytes and FLOPs) or ``"all"`` (both in this process; its times then carry
    the memory process's allocator settings, if any)."""
    import torch

    from .memory import FlopCount, SavedBytes, measure
    from .methods import MethodSpec, build, higher_available
    from .workloads import make_task

    if part not in (*PARTS, "all"):
        raise ValueError(f"unrollc.bench: unknown part {part!r}; expected one of {[*PARTS, 'all']}.")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    res = Result(cfg, torch_version=torch.__version__, loadavg=_loadavg())
    if cfg.method == "higher" and (why := higher_available()) is not None:
        res.status = why
        return res
    if cfg.device == "cuda" and not torch.cuda.is_available():
        res.status = "cuda not available"
        return res
    task = make_task(cfg.workload, cfg.optimizer, cfg.n, cfg.device)
    run = build(task, MethodSpec(cfg.method, cfg.schedule), slots=cfg.slots, k=cfg.k, budget_mib=cfg.budget_mib)
    if cfg.method == "unrollc":
        plan = run.plan()  # type: ignore[attr-defined]
        res.evaluations, res.resolved = plan.evaluations, repr(plan.resolved)
    if part == "memory":
        measure(lambda: run(steps=min(cfg.n, WARMUP_STEPS)), cfg.device)
    else:
        _, res.warmup_s, _ = measure(run, cfg.device)
    out = None
    for _ in range(cfg.repeats if part != "memory" else 1):
        out = None
        gc.collect()
        out, seconds, mem = measure(run, cfg.device)
        if part != "memory":
            res.times_s.append(seconds)
        if part != "time":
            res.peaks_bytes.append(int(mem.peak or 0))
            res.memory_how = mem.how
    assert out is not None
    meta_loss, grads = out
    res.time_s = statistics.median(res.times_s) if res.times_s else None
    res.peak_bytes = int(statistics.median(res.peaks_bytes)) if res.peaks_bytes else None
    res.meta_loss = float(meta_loss)
    res.lr_grad = float(grads[0])
    res.grad_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[1:]])))
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        res.status = "error: the meta-gradient has NaN or inf entries"
        return res
    del out, grads
    if cfg.saved_bytes and part != "time":
        gc.collect()
        counter, flops = SavedBytes(), FlopCount()
        with counter.counting(), flops:
            run()
        res.saved_peak_bytes, res.saved_total_bytes = counter.peak, counter.total
        res.flops = flops.total
    return res


def merge(timed: Result, memory: Result) -> Result:
    """The time process's result with the memory process's peak, saved bytes and FLOPs."""
    if timed.status != "ok":
        return timed
    if memory.status != "ok":
        return dataclasses.replace(timed, status=f"{memory.status} (memory process)")
    return dataclasses.replace(
        timed, peak_bytes=memory.peak_bytes, peaks_bytes=memory.peaks_bytes, memory_how=memory.memory_how,
        saved_peak_bytes=memory.saved_peak_bytes, saved_total_bytes=memory.saved_total_bytes, flops=memory.flops,
    )


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _loadavg() -> float | None:
    """The 1-minute load average before the run (other processes on the machine skew CPU timings)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def worker_main(argv: list[str]) -> int:
    """``python -m unrollc.bench._worker CONFIG_JSON OUT_PATH [PART]``: measure one config, write its result."""
    cfg_json, out_path, *part = argv
    cfg = Config(**json.loads(cfg_json))
    try:
        res = measure_config(cfg, *part)
    except Exception as e:  # noqa: BLE001 - reported in the table, the other configs still run
        res = Result(cfg, status=f"error: {type(e).__name__}: {e}")
    with open(out_path, "w") as f:
        json.dump(res.to_dict(), f)
    return 0


# ---------------------------------------------------------------------------------------- in the parent
def run_config(cfg: Config, *, timeout: float | None = None) -> Result:
    """Measure ``cfg``: its time in one fresh worker process, its memory in another (see the module docstring)."""
    return run_configs([cfg], timeout=timeout, progress=False)[0]


def _run_worker(cfg: Config, part: str, timeout: float | None, extra_env: dict[str, str] | None = None) -> Result:
    """``python -m unrollc.bench._worker CONFIG OUT PART`` in a fresh process."""
    env = {**os.environ, **(extra_env or {})}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="unrollc-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "unrollc.bench._worker", json.dumps(dataclasses.asdict(cfg)), out, part]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Result(cfg, status=f"error: {part} process timed out after {timeout:.0f} s")
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return Result(cfg, status=f"error: {part} worker exited with {proc.returncode}: {tail[0]}")
        with open(out) as f:
            return Result.from_dict(json.load(f))


def _progress(total: int) -> tuple[Callable[[str], None], Callable[[], None], Callable[[], None]]:
    """(describe, advance, close) callbacks: a tqdm bar if installed and stderr is a terminal, else plain lines on
    stderr (a log file or CI output gets one line per start, not a bar's carriage-return redraws)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        started = itertools.count(1)  # with --jobs, several parts start before the first ends: number the starts
        lock = threading.Lock()

        def describe(text: str) -> None:
            with lock:
                print(f"[{next(started)}/{total}] {text} ...", file=sys.stderr, flush=True)

        return describe, lambda: None, lambda: None
    bar = tqdm(total=total, unit="process", file=sys.stderr, dynamic_ncols=True)  # time and memory ones per config
    return bar.set_description_str, lambda: bar.update(1), bar.close


def combine(rounds: Sequence[Result]) -> Result:
    """One result from several time processes of the same config: every timed run counts, the median is the time."""
    for r in rounds:
        if r.status != "ok":
            return r
    times = [t for r in rounds for t in r.times_s]
    warmups = [r.warmup_s for r in rounds if r.warmup_s is not None]
    return dataclasses.replace(
        rounds[-1], times_s=times, time_s=statistics.median(times),
        warmup_s=statistics.median(warmups) if warmups else None,
    )


def run_configs(
    configs: Iterable[Config], *, timeout: float | None = None, progress: bool = True, jobs: int = 1, rounds: int = 1,
    memory_jobs: int | None = None, one_process: bool = False,
) -> list[Result]:
    """Measure every config in fresh processes; results keep the order of ``configs``.

    ``rounds`` > 1 times every config that many times in turn (config 1, 2, ..., then again), each in a new
    process, before measuring memory: a slow phase of a shared machine then hits every method alike instead of
    one method's only process (single fresh-process timings were seen to move by 10-20%). ``jobs`` > 1 runs that
    many processes at once (timings then compete for the CPU: use it for smoke tests, not for numbers you report).
    ``memory_jobs`` memory processes run at once (default: ``max(jobs, min(usable CPUs, 4))``); they measure
    peaks, saved bytes and FLOPs, which do not depend on how much CPU a process gets. ``one_process`` measures
    each config's time and memory in one process (``part="all"``, with the memory process's allocator settings):
    half the processes, for smoke tests (``--quick``); ``rounds`` must then be 1.
    """
    from concurrent.futures import ThreadPoolExecutor

    if rounds < 1:
        raise ValueError(f"unrollc.bench: rounds must be >= 1, got {rounds}.")
    if memory_jobs is None:
        memory_jobs = max(jobs, min(usable_cpus(), 4))
    if one_process and rounds != 1:
        raise ValueError(f"unrollc.bench: one_process measures each config once; rounds must be 1, got {rounds}.")
    configs = list(configs)
    if not configs:
        return []
    steps = len(configs) * (1 if one_process else rounds + 1)
    describe, advance, close = _progress(steps) if progress else (lambda s: None, lambda: None, lambda: None)

    def part(name: str, r: int) -> Callable[[tuple[Config, Result | None]], Result]:
        def one(item: tuple[Config, Result | None]) -> Result:
            cfg, timed = item
            describe(f"{cfg.describe()} ({name}{f' {r + 1}/{rounds}' if name == 'time' and rounds > 1 else ''})")
            if timed is not None and timed.status != "ok":
                res = timed  # no memory run for a config that failed
            elif name == "all":
                res = _run_worker(cfg, "all", timeout, MALLOC_ENV)
            elif name == "time":
                res = _run_worker(cfg, "time", timeout)
            else:
                res = merge(timed, _run_worker(cfg, "memory", timeout, MALLOC_ENV))  # type: ignore[arg-type]
            advance()
            return res

        return one

    try:
        if one_process:
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                return list(pool.map(part("all", 0), [(c, None) for c in configs]))
        timed: list[list[Result]] = [[] for _ in configs]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for r in range(rounds):
                for runs, res in zip(timed, pool.map(part("time", r), [(c, None) for c in configs]), strict=True):
                    runs.append(res)
        combined = [combine(runs) for runs in timed]
        with ThreadPoolExecutor(max_workers=max(1, memory_jobs)) as pool:
            return list(pool.map(part("memory", 0), list(zip(configs, combined, strict=True))))
    finally:
        close()
