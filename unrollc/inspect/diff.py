"""What one pass changed, read from the graphs before and after it (``Stepper.graphs``).

* ``lifted``: for ``lift_inputs``, which closed-over tensor (``get_attr _tensor_constant3``) became which
  input, with its role, user-facing name and module path;
* ``rewritten``: operators whose schema writes to an argument that disappeared, paired with the functional
  operator of the same name that appeared (``add_.Tensor x8 -> add.Tensor``);
* ``removed`` / ``added``: the rest of the change in the operator histogram.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from ..passes.schema import mutated_args
from .source import describe_input

__all__ = ["Lifted", "PassDiff", "diff_pass", "op_name", "op_histogram"]


def op_name(node: fx.Node) -> str:
    """``add.Tensor`` for ``aten.add.Tensor``, ``profiler._record_function_exit._RecordFunction`` ..."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        text = str(target)
        return text[len("aten.") :] if ns == "aten" else text
    if node.op == "get_attr":
        return "get_attr"
    return getattr(target, "__name__", str(target))


def op_histogram(gm: fx.GraphModule) -> Counter:
    """Operator name -> number of nodes (``call_function`` and ``get_attr`` nodes)."""
    return Counter(op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "get_attr"))


@dataclass(frozen=True)
class Lifted:
    """A closed-over tensor that became a graph input."""

    role: str
    name: str
    attributes: tuple[str, ...]  # the get_attr targets it replaced
    placeholder: str
    module: str | None  # "fc" for "fc.weight"; None for optimizer hyperparameters


@dataclass
class PassDiff:
    """The change one pass made (see the module docstring)."""

    name: str
    nodes_before: int
    nodes_after: int
    lifted: list[Lifted] = field(default_factory=list)
    rewritten: list[tuple[str, int, str]] = field(default_factory=list)  # (in-place op, count, functional op)
    removed: Counter = field(default_factory=Counter)
    added: Counter = field(default_factory=Counter)

    @property
    def changed(self) -> bool:
        return bool(self.lifted or self.rewritten or self.removed or self.added or self.nodes_before != self.nodes_after)


def _functional_twin(name: str, candidates: set[str]) -> str | None:
    """The functional op (of ``candidates``) matching in-place ``name``: ``add_.Tensor`` -> ``add.Tensor``."""
    packet, _, overload = name.partition(".")
    base = packet.rstrip("_")
    for cand in (f"{base}.{overload}", f"{base}_functional.{overload}", f"{base}.default", f"{base}_functional.default"):
        if cand in candidates:
            return cand
    return next((c for c in sorted(candidates) if c.partition(".")[0] in (base, f"{base}_functional")), None)


def _mutating_names(gm: fx.GraphModule) -> set[str]:
    return {op_name(n) for n in gm.graph.nodes if n.op == "call_function" and mutated_args(n.target)}


def _lifted(before: fx.GraphModule, after: fx.GraphModule, module_of: dict[str, str]) -> list[Lifted]:
    constants = before.meta.get("unrollc", {}).get("constants", {})
    placeholders = [n for n in after.graph.nodes if n.op == "placeholder"]
    attrs: dict[int, list[str]] = {}
    for node in before.graph.find_nodes(op="get_attr"):
        position = constants.get(id(getattr(before, str(node.target), None)))
        if position is not None and node.target not in attrs.setdefault(position, []):
            attrs[position].append(str(node.target))
    out = []
    for position, node in enumerate(placeholders):
        info = node.meta.get("unrollc")
        if info is None or info.role in ("batch", "meta"):
            continue
        owner = info.name if info.role in ("param", "buffer") else None
        if info.role == "opt_state":
            owner = next((p for p in sorted(module_of, key=len, reverse=True) if info.name.startswith(p + ".")), None)
        module = module_of.get(owner) if owner is not None else None
        out.append(Lifted(info.role, info.name, tuple(attrs.get(position, ())), node.name, module))
    return out


def diff_pass(name: str, before: fx.GraphModule, after: fx.GraphModule, module_of: dict[str, str] | None = None) -> PassDiff:
    """What pass ``name`` changed from ``before`` to ``after``.

    Args:
        module_of: parameter/buffer name -> ``"path (Class)"`` of the module that owns it.
    """
    hb, ha = op_histogram(before), op_histogram(after)
    removed, added = hb - ha, ha - hb
    diff = PassDiff(name, len(before.graph.nodes), len(after.graph.nodes))
    constants = before.meta.get("unrollc", {}).get("constants") or {}

    def closed_over(gm: fx.GraphModule) -> int:  # get_attr nodes that read a tensor lift_inputs turns into an input
        return sum(id(getattr(gm, str(n.target), None)) in constants for n in gm.graph.find_nodes(op="get_attr"))

    n_lifted = closed_over(before) - closed_over(after) if constants else 0
    if n_lifted > 0:  # only the pass that lifted them (later passes still see other constants, e.g. Adam's step)
        diff.lifted = _lifted(before, after, module_of or {})
        removed["get_attr"] -= min(removed["get_attr"], n_lifted)
        removed = +removed
    mutating = _mutating_names(before) - _mutating_names(after)
    for op in sorted(o for o in mutating if o in removed):
        twin = _functional_twin(op, set(added))
        diff.rewritten.append((op, removed[op], twin or "(removed)"))
        del removed[op]
        if twin is not None:
            added[twin] -= min(added[twin], diff.rewritten[-1][1])
    diff.removed, diff.added = +removed, +added
    return diff


def input_summary(gm: fx.GraphModule) -> Counter:
    """Role -> number of inputs of a step graph."""
    return Counter(getattr(n.meta.get("unrollc"), "role", "?") for n in gm.graph.nodes if n.op == "placeholder")


def describe_inputs(gm: fx.GraphModule) -> list[str]:
    """One line per input: ``p_fc_weight  param fc.weight``."""
    return [f"{n.name}  {describe_input(n)}" for n in gm.graph.nodes if n.op == "placeholder"]
