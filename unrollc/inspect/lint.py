"""``check=True``: after each pass, lint the graph and verify every guarantee established so far.

A guarantee belongs to the pass whose docstring states it and holds for every later pass: once
``functionalize`` has run, no pass may bring back an in-place op. A violation raises
:class:`PassCheckError`, naming the pass that broke it, the passes run before it and the pass that
established the guarantee. Op properties are read from schemas (:mod:`unrollc.passes.schema`), never
from names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import InternalError
from ..passes.schema import mutated_args, namespace

__all__ = ["Guarantee", "GUARANTEES", "PassCheckError", "check_after", "lint_graph"]

_aten = torch.ops.aten
_ROLE_ORDER = ("param", "buffer", "opt_state", "hyper", "batch", "meta")


class PassCheckError(InternalError):
    """A pass broke a guarantee of the pipeline (found by ``check=True``)."""


@dataclass(frozen=True)
class Guarantee:
    """``check(gm)`` lists violations of ``description``, which holds from ``established_by`` on."""

    established_by: str
    description: str
    check: Callable[[fx.GraphModule], list[str]]


def _calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _no_lifted_attrs(gm: fx.GraphModule) -> list[str]:
    constants = gm.meta.get("unrollc", {}).get("constants", {})
    bad = []
    for node in gm.graph.find_nodes(op="get_attr"):
        value = getattr(gm, str(node.target), None)
        if id(value) in constants or isinstance(value, nn.Parameter):
            bad.append(f"`{node.name}` still reads attribute `{node.target}`, a lifted parameter/buffer/state/hyperparameter")
    return bad


def _input_roles(gm: fx.GraphModule) -> list[str]:
    roles = []
    for node in gm.graph.find_nodes(op="placeholder"):
        info = node.meta.get("unrollc")
        if info is None or info.role not in _ROLE_ORDER:
            return [f"input `{node.name}` has no unrollc NodeInfo (node.meta['unrollc'])"]
        roles.append(_ROLE_ORDER.index(info.role))
    if roles != sorted(roles):
        return [f"inputs are not ordered {', '.join(_ROLE_ORDER)}"]
    return []


def _no_mutation(gm: fx.GraphModule) -> list[str]:
    return [
        f"`{n.name}` calls {n.target}, whose schema writes to {', '.join(mutated_args(n.target))}"
        for n in _calls(gm)
        if mutated_args(n.target)
    ]


def _only_user_detach(gm: fx.GraphModule) -> list[str]:
    from ..passes.strip_detach import strippable

    return [f"`{n.name}` ({n.target}) was not written by the user nor ends a no_grad block" for n in _calls(gm) if strippable(n)]


def _no_profiler(gm: fx.GraphModule) -> list[str]:
    return [f"`{n.name}` calls {n.target}" for n in _calls(gm) if namespace(n.target) == "profiler"]


def _no_copies(gm: fx.GraphModule) -> list[str]:
    from ..passes.remove_copies import _source

    return [f"`{n.name}` ({n.target}) only copies `{_source(n)}`" for n in _calls(gm) if isinstance(_source(n), fx.Node)]


def _no_dead_nodes(gm: fx.GraphModule) -> list[str]:
    return [
        f"`{n.name}` has no users" for n in gm.graph.nodes
        if n.op in ("call_function", "get_attr") and not n.users and not n.is_impure()  # an assertion has none
    ]


def _safe_sqrts(gm: fx.GraphModule) -> list[str]:
    from ..passes.strip_detach import written_by_user

    return [
        f"`{node.name}` = aten.sqrt outside the user's code: its derivative at 0 is inf (NaN meta-gradients)"
        for node in _calls(gm)
        if node.target is _aten.sqrt.default and not written_by_user(node)
    ]


def _python_pows(gm: fx.GraphModule) -> list[str]:
    from ..passes.python_pow import pows_of_python_numbers

    return [
        f"`{node.name}` = aten.pow.Tensor_Scalar on a number eager torch.optim computes in Python: ATen's fast paths "
        "(0.5 -> sqrt) round differently from Python's **"
        for node in pows_of_python_numbers(gm)
    ]


def _no_duplicates(gm: fx.GraphModule) -> list[str]:
    from ..passes.cse import cse_key

    first: dict[object, fx.Node] = {}
    bad = []
    for node in _calls(gm):
        key = cse_key(node)
        if key is not None and first.setdefault(key, node) is not node:
            bad.append(f"`{node.name}` computes what `{first[key].name}` computes ({node.target} on the same arguments)")
    return bad


GUARANTEES: tuple[Guarantee, ...] = (
    Guarantee("lift_inputs", "no parameter, buffer, optimizer-state or hyperparameter attribute is read (get_attr)", _no_lifted_attrs),
    Guarantee("lift_inputs", "inputs carry NodeInfo, ordered params, buffers, opt_state, hyper, batch, meta", _input_roles),
    Guarantee("functionalize", "no operator writes to an argument (schema alias_info.is_write)", _no_mutation),
    Guarantee("strip_detach", "every detach was written by the user or ends a torch.no_grad() block", _only_user_detach),
    Guarantee("strip_profiler", "no profiler op remains", _no_profiler),
    Guarantee("remove_copies", "no clone, lift_fresh_copy or same-layout copy remains", _no_copies),
    Guarantee("python_pow", "no power of a Python number of the optimizer's is computed by ATen's scalar fast paths", _python_pows),
    Guarantee("cse", "no two nodes call the same deterministic operator on the same arguments", _no_duplicates),
    Guarantee("eliminate_dead_code", "every node is used", _no_dead_nodes),
    Guarantee("safe_sqrt", "every sqrt outside the user's code has derivative 0 at 0", _safe_sqrts),
)


def lint_graph(gm: fx.GraphModule) -> list[str]:
    """Structural problems: fx's own lint, and outputs the step signature does not allow."""
    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001 - reported with the pass's name
        return [f"fx lint: {exc}"]
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        return [f"the graph has {len(outputs)} output nodes"]
    return []


def check_after(gm: fx.GraphModule, done: Sequence[str], n_outputs: int | None = None) -> None:
    """Raise :class:`PassCheckError` if the graph after ``done[-1]`` breaks lint or an established guarantee.

    Args:
        gm: the graph after the last pass.
        done: names of the passes run so far, in order (the last one just ran).
        n_outputs: the number of step outputs before this pass (passes never change it), if known.
    """
    name, before = done[-1], list(done[:-1])
    ran = " → ".join(before) if before else "none"
    if not isinstance(gm, fx.GraphModule):
        raise PassCheckError(
            f"unrollc (check=True): pass `{name}` (passes run before it: {ran}) returned {type(gm).__name__}, not "
            "the fx.GraphModule a pass must return."
        )
    problems = [(None, p) for p in lint_graph(gm)]
    if not isinstance(gm.meta.get("unrollc"), dict):
        problems.append((None, "the graph lost gm.meta['unrollc'] (the step's signature); a pass that builds a new "
                               "GraphModule must copy gm.meta over"))
    outputs = next(iter(gm.graph.find_nodes(op="output")), None)
    if n_outputs is not None and outputs is not None and len(outputs.args[0]) != n_outputs:
        problems.append((None, f"the step returns {len(outputs.args[0])} values instead of {n_outputs}"))
    for g in GUARANTEES:
        if g.established_by in done:
            problems += [(g, v) for v in g.check(gm)]
    if not problems:
        return
    lines = [f"unrollc (check=True): pass `{name}` (passes run before it: {ran}) left a broken graph:"]
    for g, violation in problems[:10]:
        if g is None:
            lines.append(f"  - {violation}")
        elif g.established_by == name:
            lines.append(f"  - `{name}` does not establish its guarantee '{g.description}': {violation}")
        else:
            lines.append(f"  - breaks '{g.description}' (established by `{g.established_by}`): {violation}")
    if len(problems) > 10:
        lines.append(f"  ... and {len(problems) - 10} more")
    raise PassCheckError("\n".join(lines))
