"""Drawings of a step graph: DOT via pydot (``pip install unrollc[draw]``), SVG/PNG/PDF via Graphviz's ``dot``.

Inputs and outputs are boxes coloured by role — parameters blue, buffers grey, optimizer state orange,
hyperparameters yellow, batch green, meta inputs pink; outputs have a double border and the loss is red.
Operations are grouped in clusters by where they came from: the module path (``encoder.0: Linear``), the
loss function, the traced backward (``autograd``) and the optimizer. ``collapse=True`` draws each group as
one node (with its op count) and each role's inputs per module as one box, so graphs of thousands of nodes
stay readable; ``depth=k`` merges modules below depth k (``encoder.layers.3.attn`` -> ``encoder`` for k=1).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any

from torch import fx

from .source import module_class, source_of

__all__ = ["to_dot", "draw", "MISSING_PYDOT"]

MISSING_PYDOT = (
    "unrollc.inspect.draw needs pydot to draw graphs: pip install 'unrollc[draw]' (or pip install pydot); "
    "writing .svg/.png/.pdf also needs Graphviz's `dot` program (apt-get install graphviz, brew install "
    "graphviz or conda install graphviz); a .dot file needs only pydot."
)

ROLE_COLORS = {
    "param": "#9ecae1",
    "buffer": "#d9d9d9",
    "opt_state": "#fdae6b",
    "hyper": "#fee391",
    "batch": "#a1d99b",
    "meta": "#fbb4ae",
    "loss": "#ef3b2c",
}
_GROUP_COLORS = {"module": "#deebf7", "loss": "#fff5eb", "autograd": "#f2f0f7", "optimizer": "#fff7bc", "other": "#ffffff"}


def _pydot() -> Any:
    try:
        import pydot
    except ImportError as exc:
        raise ImportError(MISSING_PYDOT) from exc
    return pydot


def _graph_of(obj: Any, api: str = "unrollc.inspect.to_dot") -> fx.GraphModule:
    """The step graph of a Stepper (its latest) or a GraphModule itself."""
    if isinstance(obj, fx.GraphModule):
        return obj
    graph = getattr(obj, "graph", None)  # a Stepper without a traced step raises its own helpful error here
    if isinstance(graph, fx.GraphModule):
        return graph
    raise TypeError(
        f"{api}: expected a Stepper or an fx.GraphModule (stepper.graph, stepper.graphs['after functionalize']), "
        f"got {type(obj).__name__}."
    )


def _group(node: fx.Node, depth: int | None) -> tuple[str, str]:
    """(kind, label) of the cluster an op node belongs to."""
    src = source_of(node)
    if src is None or src.kind == "autograd" and src.module is None:
        return "autograd", "backward (autograd)"
    if src.kind == "optimizer":
        return "optimizer", "optimizer step"
    if src.module is not None:
        path = _truncated(src.module, depth)
        cls = module_class(node) if path == src.module else _class_at(node, path)
        return "module", f"{path or '<model>'}" + (f": {cls}" if cls else "")
    if src.kind == "user":
        return "loss", f"{src.function} ({os.path.basename(src.filename)})"
    return "other", "other"


def _truncated(path: str, depth: int | None) -> str:
    """``path`` (``"enc.a.fc"``) cut to its first ``depth`` names (``None``: all)."""
    return path if depth is None or not path else ".".join(path.split(".")[:depth])


def _class_at(node: fx.Node, path: str) -> str | None:
    """The class name of the module at ``path`` among those ``node`` ran inside (for a group cut to a depth: one
    label for the module, whether an op ran in its own forward or in a submodule's)."""
    for entry_path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if entry_path == path:
            return str(cls).rsplit(".", 1)[-1]
    return None


def _outputs(gm: fx.GraphModule) -> list[tuple[fx.Node | Any, str, str]]:
    """(value, role, label) for each output of the step: ``param' fc.weight``, ..., ``loss``."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    values = list(output.args[0])
    sig = gm.meta.get("unrollc", {}).get("signature")
    if sig is None or len(values) != len(sig.params) + len(sig.buffers) + len(sig.state_out) + 1:
        return [(v, "meta", f"out[{i}]") for i, v in enumerate(values)]
    labels = [("param", f"{n}'") for n in sig.params] + [("buffer", f"{n}'") for n in sig.buffers]
    labels += [("opt_state", f"{p}.{k}'") for p, k in sig.state_out] + [("loss", "loss")]
    return [(v, role, label) for v, (role, label) in zip(values, labels, strict=True)]


def _owner(name: str, role: str) -> str:
    if role in ("param", "buffer"):
        return name.rpartition(".")[0]
    if role == "opt_state":
        return name.rsplit(".", 1)[0].rpartition(".")[0]
    return ""


def to_dot(graph: Any, *, collapse: bool = False, depth: int | None = None, name: str = "step") -> Any:
    """A ``pydot.Dot`` of a step graph (a :class:`unrollc.Stepper`'s ``graph`` or any of ``stepper.graphs``).

    Args:
        graph: a Stepper (its final graph) or an ``fx.GraphModule``.
        collapse: one node per module / loss / backward / optimizer group and per role and module of inputs.
        depth: merge module paths below this depth (``None``: keep full paths).
    """
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"unrollc.inspect.to_dot: expected `depth` as an int >= 1 (or None), got {depth!r}.")
    pydot = _pydot()
    gm = _graph_of(graph)
    dot = pydot.Dot(name, graph_type="digraph", rankdir="TB", compound="true", fontname="Helvetica")
    dot.set_node_defaults(fontname="Helvetica", fontsize="10")
    ids: dict[fx.Node, str] = {}
    clusters: dict[tuple[str, str], Any] = {}
    counts: Counter = Counter()
    groups: dict[tuple[str, str], str] = {}  # collapse: (kind, label) -> node id

    def cluster(kind: str, label: str) -> Any:
        if (kind, label) not in clusters:
            sub = pydot.Cluster(f"c{len(clusters)}", label=_q(label), style="filled", fillcolor=_GROUP_COLORS[kind])
            clusters[(kind, label)] = sub
            dot.add_subgraph(sub)
        return clusters[(kind, label)]

    input_groups: dict[tuple[str, str], list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            info = node.meta.get("unrollc")
            role, uname = (info.role, info.name) if info is not None else ("meta", node.name)
            if collapse and role not in ("batch", "meta"):
                key = (role, "" if role == "hyper" else _truncated(_owner(uname, role), depth))
                input_groups[key].append(node)
                ids[node] = f"in_{role}_{key[1] or 'all'}".replace(".", "_")
            else:
                ids[node] = node.name
                dot.add_node(pydot.Node(node.name, label=_q(f"{role} {uname}"), shape="box", style="filled", fillcolor=ROLE_COLORS[role]))
        elif node.op in ("call_function", "get_attr"):
            kind, label = _group(node, depth)
            if collapse:
                ids[node] = groups.setdefault((kind, label), f"g{len(groups)}")
                counts[ids[node]] += 1
            else:
                ids[node] = node.name
                cluster(kind, label).add_node(pydot.Node(node.name, label=_q(_op_label(node)), shape="ellipse"))
    for (role, owner), nodes in input_groups.items():
        text = f"{role} x{len(nodes)}" + (f"\n{owner or '<model>'}" if role != "hyper" else "\n" + ", ".join(n.meta["unrollc"].name for n in nodes))
        dot.add_node(pydot.Node(ids[nodes[0]], label=_q(text), shape="box", style="filled", fillcolor=ROLE_COLORS[role]))
    for (kind, label), gid in groups.items():
        dot.add_node(pydot.Node(gid, label=_q(f"{label}\n{counts[gid]} ops"), shape="box", style="rounded,filled",
                                fillcolor=_GROUP_COLORS[kind]))
    edges: set[tuple[str, str]] = set()
    for node in gm.graph.nodes:
        if node not in ids or node.op == "placeholder":
            continue
        for arg in node.all_input_nodes:
            if arg in ids and ids[arg] != ids[node]:
                edges.add((ids[arg], ids[node]))
    out_groups: dict[tuple[str, str], int] = Counter()
    for i, (value, role, label) in enumerate(_outputs(gm)):
        if collapse and role not in ("loss",):
            owner = _truncated(_owner(label.rstrip("'"), role), depth)
            oid = f"out_{role}_{owner or 'all'}".replace(".", "_")
            if (role, owner) not in out_groups:
                dot.add_node(pydot.Node(oid, shape="box", style="filled", peripheries="2", fillcolor=ROLE_COLORS[role]))
            out_groups[(role, owner)] += 1
        else:
            oid = f"out_{i}"
            dot.add_node(pydot.Node(oid, label=_q(f"{role} {label}" if role != "loss" else "loss"), shape="box",
                                    style="filled", peripheries="2", fillcolor=ROLE_COLORS[role]))
        if isinstance(value, fx.Node) and value in ids:
            edges.add((ids[value], oid))
    for (role, owner), n in out_groups.items():
        oid = f"out_{role}_{owner or 'all'}".replace(".", "_")
        dot.get_node(oid)[0].set("label", _q(f"{role}' x{n}\n{owner or '<model>'}"))
    for src, dst in sorted(edges):
        dot.add_edge(pydot.Edge(src, dst))
    return dot


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _op_label(node: fx.Node) -> str:
    from .diff import op_name

    return f"{node.name}\n{op_name(node)}"


_FORMATS = ("dot", "gv", "svg", "png", "pdf", "jpg", "jpeg", "ps", "eps")


def draw(graph: Any, path: str | os.PathLike, *, collapse: bool = False, depth: int | None = None) -> str:
    """Write a drawing of the step graph; the format follows the suffix (``.dot``, ``.svg``, ``.png``, ``.pdf``).

    Returns:
        The path written.
    """
    gm = _graph_of(graph, "unrollc.inspect.draw")  # refuse a wrong argument before looking at the path
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in _FORMATS:
        raise ValueError(
            f"unrollc.inspect.draw: cannot tell the format of {path!r} from its suffix; use one of "
            f"{', '.join('.' + f for f in _FORMATS)} (e.g. step.svg)."
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"unrollc.inspect.draw: no folder {folder!r} to write {os.path.basename(path)!r} into; create it first.")
    dot = to_dot(gm, collapse=collapse, depth=depth)
    if fmt in ("dot", "gv"):
        with open(path, "w") as f:
            f.write(dot.to_string())
        return path
    try:
        dot.write(path, format=fmt)
    except FileNotFoundError as exc:
        raise RuntimeError(
            f"unrollc.inspect.draw: writing a .{fmt} file needs Graphviz's `dot` program, which was not found: "
            "apt-get install graphviz, brew install graphviz or conda install graphviz; or write a .dot file."
        ) from exc
    return path
