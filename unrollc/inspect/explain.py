"""``unrollc.explain(stepper)``: what each pass of the pipeline did to the step graph, and what a step costs.

The report is built from the graphs the stepper keeps after every pass (``stepper.graphs``: ``"captured"``,
then ``"after <pass>"`` for each pass of :data:`unrollc.passes.PIPELINE`, ``"after lift_inputs"`` to
``"after safe_sqrt"``), so it describes the most recent trace.
Bytes and FLOPs come from :class:`unrollc.analysis.cost.CostModel` when it is available, else from a
simple estimate over the nodes' ``meta["val"]`` (marked as such).
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .diff import PassDiff, diff_pass, input_summary, op_histogram

from ..runtime.state import UnrollState
from ..runtime.stepper import GRAPHS_KEPT, Stepper
from ..runtime.unroll import gradient_free_from

__all__ = ["Report", "explain", "step_costs"]

_MAX_LIFTED_LINES = 40


@dataclass
class Report:
    """The result of :func:`explain`; ``str(report)`` is the text, notebooks render it as well."""

    title: str
    passes: list[PassDiff]
    histogram: Counter
    inputs: Counter  # role -> count
    outputs: dict[str, int]  # "params'", "buffers'", "opt_state'", "loss" -> count
    guards: list[str]
    state_bytes: int
    saved_bytes: int | None
    flops: int | None
    cost_note: str = ""
    graph_names: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------------------------------------- text
    def format(self, *, costs: bool = True) -> str:
        """The report as text; ``costs=False`` leaves out the bytes and FLOPs section."""
        lines = [self.title]
        if self.passes:  # none when the stepper has released this graph's pass graphs
            lines += ["", "Passes (nodes before -> after):", f"  {'captured':<22}{self.passes[0].nodes_before:>5}"]
        for d in self.passes:
            note = "" if d.changed else "   (no change)"
            lines.append(f"  {d.name:<22}{d.nodes_before:>5} -> {d.nodes_after:<5}{note}".rstrip())
            lines += [f"      {x}" for x in _pass_details(d)]
        n_out = sum(self.outputs.values())
        lines += [
            "",
            "Step graph:",
            f"  inputs  {sum(self.inputs.values()):>4}: " + _counts(self.inputs, ("param", "buffer", "opt_state", "hyper", "batch", "meta")),
            f"  outputs {n_out:>4}: " + ", ".join(f"{v} {k}" for k, v in self.outputs.items()),
            f"  ops     {sum(self.histogram.values()):>4}: " + _wrap(", ".join(f"{k} {v}" for k, v in _sorted(self.histogram)), 12),
            "  guards:  " + (_guard_text(self.guards) if self.guards else "none (no Python branch on optimizer scalars)"),
        ]
        if costs:
            saved = _fmt_bytes(self.saved_bytes) if self.saved_bytes is not None else "n/a"
            flops = f"{self.flops:,}" if self.flops is not None else "n/a"
            lines += [
                "",
                "One step:",
                f"  carried state          {_fmt_bytes(self.state_bytes)}  (params + buffers + optimizer state)",
                f"  saved for backward     {saved} per taped step (trainable params and the state they reach requiring grad)",
                f"  FLOPs                  ~{flops} per step",
            ]
            if self.cost_note:
                lines.append(f"  ({self.cost_note})")
        if self.graph_names:
            lines += ["", "Kept graphs: stepper.graphs[" + ", ".join(repr(n) for n in self.graph_names) + "]"]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return self.format()

    def _repr_markdown_(self) -> str:
        return "```text\n" + self.format() + "```\n"

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(self.format()) + "</pre>"


def _sorted(c: Counter) -> list[tuple[str, int]]:
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))


def _counts(c: Counter, order: tuple[str, ...]) -> str:
    return ", ".join(f"{c[k]} {k}" for k in order if c.get(k))


def _wrap(text: str, indent: int, width: int = 100, sep: str = ", ") -> str:
    """Wrap a ``sep``-separated list at item boundaries."""
    items, lines, line = text.split(sep), [], ""
    for item in items:
        if line and len(line) + len(sep) + len(item) > width - indent:
            lines.append(line + sep.rstrip())
            line = item
        else:
            line = f"{line}{sep}{item}" if line else item
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


_STATE_REF = re.compile(r"state:(?P<param>[\w.]+)\.(?P<key>\w+)")


def _guard_text(guards: list[str]) -> str:
    """Guards, each once; the same guard on every parameter's state (RAdam's ``rho_t > 5`` per step counter)
    is shown once with ``state:*`` and the parameters it holds for."""
    groups: dict[str, list[str]] = {}
    for g in guards:
        params = {m.group("param") for m in _STATE_REF.finditer(g)}
        template = _STATE_REF.sub(lambda m: f"state:*.{m.group('key')}", g) if len(params) == 1 else g
        groups.setdefault(template, []).append(next(iter(params)) if len(params) == 1 else "")
    parts = []
    for template, owners in groups.items():
        named = list(dict.fromkeys(o for o in owners if o))
        if len(named) > 1:
            parts.append(f"{template} (for each of {len(named)} parameters: {', '.join(named)})")
        else:
            original = _STATE_REF.sub(lambda m: f"state:{named[0]}.{m.group('key')}", template) if named else template
            parts.append(original if len(owners) == 1 else f"{original} (x{len(owners)})")
    return _wrap("; ".join(parts), 11, sep="; ")


def _counter_text(c: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in _sorted(c))


def _pass_details(d: PassDiff) -> list[str]:
    out = []
    shown = d.lifted[:_MAX_LIFTED_LINES]
    w_name = max((len(x.name) for x in shown), default=0)
    w_where = max((len(x.module) + 2 for x in shown if x.module), default=0)
    for x in shown:
        where = f"[{x.module}]" if x.module else ""
        attrs = ", ".join(x.attributes) or "(new)"
        out.append(f"{x.role:<9} {x.name:<{w_name}}  {where:<{w_where}}  {attrs} -> input {x.placeholder}")
    if len(d.lifted) > len(shown):
        out.append(f"... and {len(d.lifted) - len(shown)} more inputs")
    out += [f"in-place -> functional: {a} x{n} -> {b}" for a, n, b in d.rewritten]
    if d.removed:
        out.append("removed: " + _wrap(_counter_text(d.removed), 15))
    if d.added:
        out.append("added: " + _wrap(_counter_text(d.added), 13))
    return out


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return str(n)


# --------------------------------------------------------------------------------------------------- costs
def step_costs(gm: fx.GraphModule, constant: frozenset[str] = frozenset()) -> tuple[int, int | None, int | None, str]:
    """``(state_bytes, saved_bytes, flops, note)`` of one step graph (see the module docstring); ``constant``: the
    state inputs a taped step takes as constants (step counters, frozen parameters), as ``CostModel.from_graph``."""
    try:
        from ..analysis.cost import CostModel
    except ImportError:
        CostModel = None  # noqa: N806
    if CostModel is not None:
        try:
            cm = CostModel.from_graph(gm, constant=constant)
            return cm.state_bytes, cm.taped_step_bytes, cm.flops_per_step, ""
        except Exception as exc:  # noqa: BLE001 - the report must not fail on an analysis problem
            note = f"unrollc.analysis.cost failed ({type(exc).__name__}: {exc}); rough estimate"
    else:
        note = "unrollc.analysis.cost not available; FLOPs are a rough estimate, saved bytes unknown"
    return _state_bytes(gm), None, _estimate_flops(gm), note


def _nbytes(v: Any) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _state_bytes(gm: fx.GraphModule) -> int:
    output = next(iter(gm.graph.find_nodes(op="output")))
    return sum(_nbytes(getattr(a, "meta", {}).get("val")) for a in dict.fromkeys(output.args[0][:-1]))  # once each


_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul"}


def _estimate_flops(gm: fx.GraphModule) -> int:
    total = 0
    for node in gm.graph.nodes:
        out = node.meta.get("val")
        if node.op != "call_function" or not isinstance(out, torch.Tensor):
            continue
        name = str(node.target).split(".")[1] if isinstance(node.target, torch._ops.OpOverload) else ""
        if name in _MATMUL:
            a = node.args[1] if name in ("addmm", "baddbmm") else node.args[0]
            k = a.meta["val"].shape[-1] if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) else 1
            total += 2 * out.numel() * k
        elif name == "convolution":
            w = node.args[1].meta.get("val")
            total += 2 * out.numel() * (math.prod(w.shape[1:]) if isinstance(w, torch.Tensor) else 1)
        elif out.is_floating_point():
            total += out.numel()
    return total


# ------------------------------------------------------------------------------------------------- explain
_NOT_GIVEN: Any = type("NotGiven", (), {"__repr__": lambda self: "<not given>"})()


def explain(stepper: "Stepper", state: "UnrollState | None" = None, batch: Any = _NOT_GIVEN, *meta: Any) -> Report:
    """What each pass did to ``stepper``'s most recent step graph, and what a step costs.

    Args:
        stepper: a :class:`unrollc.Stepper` (``unrollc.compile``) that has run a step, or give ``state``
            and ``batch`` (and ``*meta``) to trace the graph for their layout (``stepper.trace``; no step is run).

    Returns:
        A :class:`Report`: ``print(report)`` in a terminal; notebooks render it (``_repr_html_``).
    """
    if not isinstance(stepper, Stepper):
        raise TypeError(
            f"unrollc.explain: expected the Stepper returned by unrollc.compile(model, opt, loss_fn), got "
            f"{type(stepper).__name__}."
        )
    if (state is None) != (batch is _NOT_GIVEN):
        raise TypeError(
            "unrollc.explain: give both `state` and `batch` (the graph depends on the batch's shapes), or neither "
            f"to explain the most recent step; got {'a batch without a state' if state is None else 'a state without a batch'}."
        )
    if state is not None:
        stepper.trace(state, batch, *meta)
    if getattr(stepper, "_last", True) is None:
        raise RuntimeError(
            "unrollc.explain: the stepper has not traced a step yet (the graph depends on the batch's shapes); "
            "call unrollc.explain(stepper, state, batch) to trace one, or run stepper.step(state, batch) first."
        )
    gm = stepper.graph
    released = "captured" not in stepper._last.graphs  # noqa: SLF001 - an old trace's pass graphs (Stepper.graphs)
    graphs = {} if released else stepper.graphs
    names = list(graphs)
    module_of = _owners(stepper)
    diffs = [
        diff_pass(after.removeprefix("after "), graphs[before], graphs[after], module_of)
        for before, after in zip(names, names[1:])
    ]
    sig = stepper._last.signature  # noqa: SLF001 - the most recent trace's layout
    outputs = {"params'": len(sig.params), "buffers'": len(sig.buffers), "opt_state'": len(sig.state_out), "loss": 1}
    # a taped step as the unroll's: the trainable parameters require grad, what no gradient reaches is constant
    trainable = stepper._trainable()  # noqa: SLF001
    reach = frozenset(("param", n) for n in sig.params if n in trainable)
    state_bytes, saved, flops, note = step_costs(gm, gradient_free_from(stepper._last, reach))  # noqa: SLF001
    spec = stepper._spec  # noqa: SLF001
    n_groups = len(spec.hyper)
    loss_name = getattr(stepper.loss_fn, "__qualname__", type(stepper.loss_fn).__name__)
    title = (
        f"unrollc.explain: {type(stepper.model).__name__} + {spec.cls.__name__} "
        f"({n_groups} parameter group{'s' if n_groups != 1 else ''}), loss_fn {loss_name}"
    )
    if stepper.grad_callback is not None:  # a clipping object shows its settings, a function its name
        cb = stepper.grad_callback
        title += f", grad_callback {getattr(cb, '__qualname__', None) or repr(cb)}"
    if released:
        title += (f"\nThis step graph was traced more than {GRAPHS_KEPT} traces ago and the stepper has released its "
                  f"graphs after each pass (it keeps them for its {GRAPHS_KEPT} most recent traces), so the passes are "
                  "not shown; a fresh stepper on this layout shows them.")
    if sig.state_out and not sig.state_in:
        title += ("\nThe graph of a first step: the optimizer has no state yet and this step creates it; the steps "
                  "after it run another graph (explain after a second step to see that one).")
    return Report(
        title=title,
        passes=diffs,
        histogram=op_histogram(gm),
        inputs=input_summary(gm),
        outputs={k: v for k, v in outputs.items() if v},
        guards=[str(g) for g in stepper.guards],
        state_bytes=state_bytes,
        saved_bytes=saved,
        flops=flops,
        cost_note=note,
        graph_names=names,
    )


def _owners(stepper: "Stepper") -> dict[str, str]:
    """Parameter/buffer name -> ``"path: Class"`` of the module that owns it."""
    modules = dict(stepper.model.named_modules(remove_duplicate=False))
    out = {}
    for name, _ in [*stepper.model.named_parameters(), *stepper.model.named_buffers()]:
        path = name.rpartition(".")[0]
        module = modules.get(path)
        out[name] = f"{path or '<model>'}: {type(module).__name__}" if module is not None else path
    return out
