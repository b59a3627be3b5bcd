"""`python -m unrollc.bench --quick` end to end: table, CSV, JSON and PNG, and the methods agree."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

# The module-scoped quick run is made once: pyproject runs each test file on one xdist worker (--dist loadfile;
# --dist loadgroup ignores xdist_group marks with pytest 9.2 and xdist 3.8, and ran the quick run on both workers).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], str]:
    out = str(tmp_path_factory.mktemp("bench"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "unrollc.bench", "--quick", "--out-dir", out],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # ~4-5 min next to the other worker
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def _results(out: str) -> list[dict]:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["results"]


def test_table_and_files(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    proc, out = quick_run
    for column in ("method", "schedule", "time (s)", "peak (MiB)", "time/higher", "mem/higher", "grad norm"):
        assert column in proc.stdout
    for name in ("results.json", "results.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    pytest.importorskip("matplotlib")
    with open(os.path.join(out, "bench.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_configuration_ran(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    _, out = quick_run
    results = _results(out)
    labels = {r["label"] for r in results}
    assert {"unrollc/none", "unrollc/sqrt", "unrollc/binomial", "unrollc/every-k", "eager"} <= labels
    budget = {r["n"]: r["resolved"] for r in results if r["schedule"] == "budget"}
    assert budget == {4: "EveryK(k=2)", 8: "Binomial(slots=2)"}  # --quick's budget makes a real choice
    for r in results:
        if r["method"] == "higher" and r["status"] == "not installed":
            continue
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and r["peak_bytes"] is not None and r["saved_peak_bytes"] > 0
    with open(os.path.join(out, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(results)


def test_meta_gradients_agree(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    _, out = quick_run
    results = [r for r in _results(out) if r["status"] == "ok"]
    eager = {(r["optimizer"], r["n"]): r for r in results if r["method"] == "eager"}
    for r in results:
        ref = eager[(r["optimizer"], r["n"])]
        if r["method"] == "higher" and r["optimizer"] == "adam":
            continue  # higher's Adam differs from torch.optim's by design
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), r["label"]
        assert r["lr_grad"] == pytest.approx(ref["lr_grad"], rel=1e-4, abs=1e-7), r["label"]
        assert r["meta_loss"] == pytest.approx(ref["meta_loss"], rel=1e-5), r["label"]


def test_flop_count_prices_forward_and_backward_matrix_products() -> None:
    import torch

    from unrollc.bench.memory import FlopCount

    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(5, 6, requires_grad=True)
    with FlopCount() as f:
        (a @ b).relu().sum().backward()  # forward a@b; backward g@b.T and a.T@g: three products of 4*5*6 MACs
    assert f.total == 3 * 2 * 4 * 5 * 6
    assert set(f.by_op) == {"aten.mm"}


def test_flops_grow_with_the_planned_recomputation(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    """A checkpointed unroll re-runs (evaluations - n) forward steps and nothing else: its extra FLOPs over the
    unrollc/none run are the same per re-run step for every schedule and n; eager, higher and unrollc/none
    execute the same products."""
    _, out = quick_run
    results = [r for r in _results(out) if r["status"] == "ok"]
    per_step: dict[str, set[float]] = {}
    for r in results:
        none = next(o for o in results if o["label"] == "unrollc/none" and (o["optimizer"], o["n"]) == (r["optimizer"], r["n"]))
        if r["method"] in ("eager", "higher"):
            assert r["flops"] == none["flops"], r["label"]
        elif r["evaluations"] > r["n"]:
            extra = (r["flops"] - none["flops"]) / (r["evaluations"] - r["n"])
            per_step.setdefault(r["optimizer"], set()).add(extra)
    assert per_step and all(len(v) == 1 and min(v) > 0 for v in per_step.values()), per_step


def test_time_and_memory_are_measured_apart() -> None:
    """The time process does not measure memory (and is not run with the memory process's malloc settings);
    the memory process does not time; merge() takes each from its own process."""
    from unrollc.bench.runner import Config, measure_config, merge

    cfg = Config("mlp-small", "sgd", 3, "unrollc", "sqrt", repeats=2)
    timed, memory = measure_config(cfg, "time"), measure_config(cfg, "memory")
    assert len(timed.times_s) == 2 and timed.peak_bytes is None and timed.flops is None
    assert memory.times_s == [] and memory.peak_bytes is not None and memory.flops > 0
    both = merge(timed, memory)
    assert both.times_s == timed.times_s and both.peak_bytes == memory.peak_bytes and both.flops == memory.flops
    assert both.grad_norm == timed.grad_norm == memory.grad_norm
    with pytest.raises(ValueError, match="unknown part"):
        measure_config(cfg, "speed")


def test_rounds_time_every_config_in_turn_and_pool_the_runs() -> None:
    from unrollc.bench.runner import Config, run_configs

    cfgs = [Config("mlp-small", "sgd", 2, "unrollc", "none", repeats=2, saved_bytes=False)]
    results = run_configs(cfgs, progress=False, rounds=2, jobs=2)  # 2 at once: only counts are checked
    assert [r.config for r in results] == cfgs
    for r in results:
        assert r.status == "ok" and len(r.times_s) == 4 and r.peak_bytes is not None
        assert sorted(r.times_s)[1] <= r.time_s <= sorted(r.times_s)[2]
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run_configs(cfgs, progress=False, rounds=0)
    with pytest.raises(ValueError, match="one_process measures each config once; rounds must be 1, got 2"):
        run_configs(cfgs, progress=False, rounds=2, one_process=True)


@pytest.mark.parametrize("method,schedule", [("unrollc", "sqrt"), ("higher", "-"), ("eager", "-")])
def test_a_runner_limited_to_k_steps_is_the_k_step_unroll(method: str, schedule: str) -> None:
    """``run(steps=k)`` (the memory process's short warm-up) is the k-step task's meta-gradient, not a variant."""
    import torch

    from unrollc.bench.methods import MethodSpec, build, higher_available
    from unrollc.bench.workloads import make_task

    if method == "higher" and higher_available() is not None:
        pytest.skip("higher is not installed")
    spec = MethodSpec(method, schedule)
    # n >= POOL (16): the tasks then draw the same batches and the same validation batch
    run = build(make_task("mlp-small", "sgd", 20), spec)
    short_loss, short = run(steps=17)
    loss, full = build(make_task("mlp-small", "sgd", 17), spec)()
    all_loss, _ = run()
    assert torch.equal(short_loss, loss) and not torch.equal(short_loss, all_loss)
    for a, b in zip(short, full, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    from unrollc.bench.__main__ import main

    assert main(["--device", "cuda", "--workload", "mlp-small", "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "torch.cuda.is_available() is False" in err and "--device cpu" in err


def test_figure_set_compares_at_160_and_sweeps_every_method_over_n() -> None:
    from unrollc.bench.__main__ import FIGURE_SWEEP, figure_configs, parse_args

    compared, sweeps = figure_configs(parse_args(["--figures"]))
    assert {(c.optimizer, c.n, c.method, c.schedule) for c in compared} == {
        (o, 160, m, s) for o in ("sgd", "adam") for m, s in (("unrollc", "none"), ("unrollc", "sqrt"), ("higher", "-"))}
    assert all(c.repeats >= 3 for c in compared)
    labels = {(c.method, c.schedule) for c in sweeps}
    assert labels == {("unrollc", "none"), ("unrollc", "sqrt"), ("unrollc", "binomial"), ("higher", "-")}
    for label in labels:
        assert sorted(c.n for c in sweeps if (c.method, c.schedule) == label) == sorted(FIGURE_SWEEP)


def test_adam_reference_is_finite_and_agrees_with_unrollc() -> None:
    """The eager Adam differentiates sqrt(v) at v == 0 (a weight behind a dead ReLU) with derivative 0, as
    unrollc's safe_sqrt does: plain sqrt made the reference NaN while the row still said "ok"."""
    import torch

    from unrollc.bench.runner import Config, measure_config

    eager = measure_config(Config("mlp", "adam", 2, "eager", repeats=1, saved_bytes=False), "time")
    ours = measure_config(Config("mlp", "adam", 2, "unrollc", "none", repeats=1, saved_bytes=False), "time")
    assert eager.status == ours.status == "ok"
    assert eager.grad_norm == pytest.approx(ours.grad_norm, rel=1e-3) and torch.isfinite(torch.tensor(eager.grad_norm))


def test_a_nan_meta_gradient_is_an_error_and_json_stays_valid(tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from unrollc.bench import methods
    from unrollc.bench.report import read_json, write_json
    from unrollc.bench.runner import Config, Result, measure_config

    monkeypatch.setattr(methods, "_safe_sqrt", torch.sqrt)  # the reference as it was: NaN behind dead units
    res = measure_config(Config("mlp", "adam", 2, "eager", repeats=1, saved_bytes=False), "time")
    assert res.status == "error: the meta-gradient has NaN or inf entries"
    path = str(tmp_path) + "/r.json"
    write_json([res, Result(Config("mlp-small", "sgd", 2, "eager"), grad_norm=float("inf"))], path)
    def strict(constant: str) -> None:
        raise AssertionError(f"results.json holds {constant}, which is not JSON")

    with open(path) as f:
        json.load(f, parse_constant=strict)
    assert read_json(path)[1].grad_norm is None


def test_command_line_checks_values_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    from unrollc.bench.__main__ import default_configs, parse_args

    for argv, message in [
        (["--n", "0"], "argument --n: must be >= 1, got 0"),
        (["--rounds", "0"], "argument --rounds: must be >= 1"),
        (["--repeats", "-1"], "argument --repeats: must be >= 1"),
        (["--slots", "0"], "argument --slots: must be >= 1"),
        (["--plot", "x.txt"], "cannot write a plot to 'x.txt': matplotlib writes"),
        (["--figures", "--n", "4", "--optimizer", "adam"], "leave out --optimizer --n"),
        (["--figures", "--slots", "3"], "leave out --slots"),  # the README's binomial(8) sweep stays binomial(8)
        (["--json", "."], "--json '.' is a folder; give a file path"),
        (["--one-process", "--rounds", "3"], "--one-process measures each configuration once; leave out --rounds 3"),
        (["--figures", "--one-process"], "leave out --one-process"),
    ]:
        if "--plot" in argv:
            pytest.importorskip("matplotlib")
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err, argv
    args = parse_args(["--quick", "--n", "5", "5", "--schedules", "none", "--slots", "2"])  # explicit options win
    assert (args.workload, args.n, args.schedules, args.slots, args.every_k) == ("mlp-small", [5], ["none"], 2, 3)
    assert parse_args(["--quick", "--jobs", "1"]).jobs == 1 and parse_args(["--quick"]).jobs == 2
    assert parse_args(["--quick"]).one_process and not parse_args([]).one_process
    # --quick's budget fits each optimizer (0.45 MiB was under Adam's smallest schedule: error rows), unless given
    budgets = {(c.optimizer, c.budget_mib) for c in default_configs(parse_args(["--quick", "--optimizer", "sgd", "adam"]))}
    assert budgets == {("sgd", 0.45), ("adam", 0.9)}
    assert {c.budget_mib for c in default_configs(parse_args(["--quick", "--optimizer", "adam", "--budget-mib", "2"]))} == {2.0}
    assert parse_args(["--plot", "out/fig"]).plot == "out/fig.png"  # the path the plot is written to
    for option, path, why in [("--csv", "/proc/nope/a.csv", "'/proc/nope' cannot be made"),
                              ("--json", f"{__file__}/x.json", "is a file, not a folder"),
                              ("--out-dir", "/proc/nope", "cannot write --json '/proc/nope/results.json'")]:
        if path.startswith("/proc") and not os.path.isdir("/proc"):
            continue
        with pytest.raises(SystemExit):  # before the run: a typo must not cost the results
            parse_args([option, path])
        assert why in capsys.readouterr().err
    assert parse_args([]).n == [16, 64, 160] and parse_args([]).workload == "mlp"


def test_budget_schedule_runs_the_schedule_its_plan_picks() -> None:
    from unrollc.bench.report import table
    from unrollc.bench.runner import Config, measure_config

    res = measure_config(Config("mlp-small", "sgd", 6, "unrollc", "budget", repeats=1, saved_bytes=False,
                                budget_mib=0.4), "time")  # 0.4 MiB: a Binomial schedule
    assert res.status == "ok" and res.resolved.startswith("Binomial(slots=") and res.evaluations > 6
    assert f"budget: {res.resolved}" in table([res])
    with pytest.raises(ValueError, match="schedule 'budget' for method 'eager'"):
        Config("mlp-small", "sgd", 6, "eager", "budget")


def test_plot_of_results_with_no_measured_peak(tmp_path) -> None:
    """On a tiny workload peak RSS can be 0 for every configuration: the plot is still written, with the
    memory panel saying it has nothing to show (a log axis over no positive value raised in matplotlib)."""
    pytest.importorskip("matplotlib")
    from unrollc.bench.report import plot
    from unrollc.bench.runner import Config, Result

    results = [Result(Config("mlp-small", "sgd", n, "unrollc", "sqrt"), time_s=0.01 * n, peak_bytes=0) for n in (3, 5)]
    path = tmp_path / "zero.png"
    plot(results, str(path), title="no peaks")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_lines_of_every_method_and_optimizer_look_different(tmp_path, monkeypatch) -> None:
    """14 lines (7 methods x 2 optimizers): a colour per method and a style per optimizer, so no two lines look
    alike (matplotlib's default cycle repeats its 10 colours)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from unrollc.bench.report import plot
    from unrollc.bench.runner import Config, Result

    methods = [("unrollc", s) for s in ("none", "sqrt", "binomial", "every-k", "budget")] + [("higher", "-"), ("eager", "-")]
    results = [Result(Config("mlp-small", opt, n, m, s), time_s=0.01 * n, peak_bytes=n << 20)
               for opt in ("sgd", "adam") for m, s in methods for n in (4, 8)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(results, str(tmp_path / "all.png"))
    for ax in figures[0].axes:
        looks = {(line.get_label(), line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
        assert len(looks) == 14 and len({look[1:] for look in looks}) == 14
        by_method = {}
        for label, color, _ in looks:
            by_method.setdefault(label.rsplit(" (", 1)[0], set()).add(color)
        assert len(by_method) == 7 and all(len(c) == 1 for c in by_method.values())


def test_progress_without_tqdm_numbers_each_start_once(monkeypatch, capsys):
    from concurrent.futures import ThreadPoolExecutor

    from unrollc.bench.runner import _progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    describe, advance, close = _progress(6)
    with ThreadPoolExecutor(3) as pool:  # as with --jobs 3: starts overlap, ends come later
        list(pool.map(lambda i: describe(f"config {i}"), range(6)))
    advance()
    close()
    lines = capsys.readouterr().err.splitlines()
    assert sorted(line.split("]")[0] for line in lines) == [f"[{i}/6" for i in range(1, 7)]


def test_a_long_error_keeps_the_table_narrow_and_is_printed_in_full_below_it() -> None:
    """An error message in the status column widened every row and the rule under the header to its length."""
    from unrollc.bench.report import table
    from unrollc.bench.runner import Config, Result

    error = "error: RuntimeError: " + "a long message from the worker " * 6
    results = [Result(Config("mlp-small", "sgd", 4, "unrollc", "sqrt"), time_s=0.5, peak_bytes=2**20),
               Result(Config("mlp-small", "sgd", 4, "higher"), status=error)]
    lines = table(results).splitlines()
    header, rule, ok, failed = lines[:4]
    assert len(rule) == len(header) and header.endswith("status") and ok.endswith("ok")
    assert failed.endswith("… (below)") and len(failed) <= len(header) + 40
    assert lines[4:] == ["", "statuses in full:", f"  mlp-small/sgd n=4 higher: {error}"]


def test_replot_reads_back_a_runs_csv_and_json_and_runs_nothing(quick_run, tmp_path, capsys, monkeypatch) -> None:
    """`--replot` prints the same table from results.csv as from results.json (every field typed back), and
    writes the plot and only the results file asked for, never over the file it reads; the CSV/JSON columns
    are the documented ones."""
    from unrollc.bench.__main__ import main
    from unrollc.bench.report import COLUMNS, read_csv, read_json, table

    proc, out = quick_run
    from_json, from_csv = read_json(os.path.join(out, "results.json")), read_csv(os.path.join(out, "results.csv"))
    assert from_csv == from_json and table(from_csv) in proc.stdout
    with open(os.path.join(out, "results.csv")) as f:
        assert list(csv.DictReader(f).fieldnames) == list(COLUMNS)
    assert list(_results(out)[0]) == list(COLUMNS)
    plot = tmp_path / "again.png"
    assert main(["--replot", os.path.join(out, "results.csv"), "--plot", str(plot), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert table(from_csv) in printed and f"wrote {plot}" in printed
    assert read_json(str(tmp_path / "r.json")) == from_json
    monkeypatch.chdir(tmp_path)  # where the default OUT_DIR (bench_out) would be made
    source = os.path.join(out, "results.json")
    with open(source) as f:
        before = f.read()
    assert main(["--replot", source, "--plot", str(plot), "--csv", str(tmp_path / "r.csv")]) == 0
    assert read_csv(str(tmp_path / "r.csv")) == from_json and not (tmp_path / "bench_out").exists()
    assert main(["--replot", source, "--plot", str(plot), "--json", str(tmp_path / "r2.json")]) == 0
    with open(tmp_path / "r2.json") as f, open(source) as g:  # how the run was made is kept
        assert json.load(f)["meta"] == {**json.load(g)["meta"], "replot_of": source}
    with pytest.raises(SystemExit):
        main(["--replot", source, "--plot", str(plot), "--json", source])
    assert "is the file --replot reads" in capsys.readouterr().err
    with open(source) as f:
        assert f.read() == before
    if pytest.importorskip("matplotlib"):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main(["--replot", os.path.join(out, "results.csv"), "--n", "4"])
    assert "--replot runs nothing, so --n would change nothing" in capsys.readouterr().err


@pytest.mark.parametrize("load, noted", [(0.2, False), (3.0, True)])
def test_a_busy_machine_is_noted_before_the_run(monkeypatch, capsys, load, noted) -> None:
    import unrollc.bench.__main__ as bench

    monkeypatch.setattr(bench.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(bench, "usable_cpus", lambda: 2)
    bench._warn_if_busy(bench.parse_args(["--quick"]))
    assert ("the load average is 3.0 on 2 usable CPUs" in capsys.readouterr().err) == noted


def test_a_run_that_frees_memory_has_a_peak_of_zero_not_a_negative_one() -> None:
    """Under the benchmark's malloc settings a region that frees memory read a negative peak in 81 of 100 tries (the
    kernel's high-water mark, just reset, can read below VmRSS), and --quick printed mem/higher -1.333."""
    code = (
        "import torch\n"
        "from unrollc.bench.memory import PeakMemory\n"
        "peaks = []\n"
        "for _ in range(30):\n"
        "    keep = [torch.empty(1 << 14) for _ in range(50)]\n"
        "    with PeakMemory('cpu') as m:\n"
        "        del keep\n"
        "        x = torch.randn(100, 100) @ torch.randn(100, 100)\n"
        "    peaks.append(m.peak)\n"
        "print(m.how, min(peaks))\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.split()[-1]) >= 0, out.stdout


def test_progress_into_a_log_is_plain_lines_even_with_tqdm(monkeypatch, capsys):
    """stderr not a terminal (a log file, CI): one line per start, not a tqdm bar's carriage-return redraws."""
    pytest.importorskip("tqdm")
    from unrollc.bench.runner import _progress

    describe, advance, close = _progress(2)
    for i in range(2):
        describe(f"config {i}")
        advance()
    close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == ["[1/2] config 0 ...", "[2/2] config 1 ..."]
