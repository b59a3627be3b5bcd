"""What one step graph keeps alive: bytes saved for backward, peak live intermediates, and FLOPs — without running it.

``analyze_step(gm, requires_grad=...)`` predicts what autograd will save when the step graph runs eagerly with
some of its inputs requiring grad, as ``unrollc.analysis.memory.saved_bytes_per_step`` measures it. It never
touches real data; the graph is abstractly interpreted on the ``meta`` device:

1. Build a networkx ``DiGraph`` of the fx graph (``build_graph``): one vertex per fx node, one edge per data use.
2. Walk the nodes in graph order. For each op, make fresh meta tensors for its tensor arguments (shape, stride
   and dtype of the producers' values; ``requires_grad`` as propagated so far) and run the op once on them,
   under grad mode and ``torch.autograd.graph.saved_tensors_hooks``. Autograd itself then says
   (a) which outputs require grad — requires_grad is propagated forward from the sources by the real derivative
   formulas, so ``ones_like(w)`` or ``native_batch_norm``'s saved statistics correctly do not require it; and
   (b) which tensors the op saves for backward: an argument, an output, or a fresh buffer. Matching is by
   storage, so a saved view of an argument is charged to that argument's storage.
   Results are cached per (op, argument layouts, requires_grad pattern) within one call: the optimizer update
   repeats the same few ops for every parameter.
3. Every fx value is mapped to a *storage*: a placeholder or a fresh op output owns one; an output that aliases
   an argument (``t``, ``view``, ``expand``, ``getitem`` of a tuple, ...; found in step 2 by comparing the meta
   storages) shares its argument's. Saved bytes are the sum over distinct saved storages, like the measurement,
   which counts distinct ``untyped_storage()`` s.
4. Liveness: simulate the graph in order, allocating each fresh storage when its producer runs and freeing it
   after the last use of any value aliasing it (graph outputs stay live). ``peak_live_bytes`` is the peak of
   live intermediates without grad; ``peak_live_bytes_taped`` keeps saved storages alive to the end, as a
   forward pass with grad does.
5. FLOPs: ``torch.utils.flop_counter``'s formulas (mm, addmm, bmm, convolution, attention, ...) on the meta
   shapes of step 2; ops without a formula count 0 (elementwise work is not counted, as in FlopCounterMode).

Fallback: an op that cannot run on meta tensors (e.g. ``_local_scalar_dense``) is assumed to save all its
floating-point tensor arguments when any argument requires grad, and to return fresh storages whose layout is
its ``meta["val"]``; such ops are listed in ``StepAnalysis.fallback_ops``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "GRAD_ROLES", "SavedStorage", "StepAnalysis", "analyze_step", "build_graph", "grad_sources", "op_flops",
]

def op_flops(op: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one call of ``op`` by ``torch.utils.flop_counter``'s formulas (mm, addmm, bmm, convolution,
    attention, ...); 0 for ops without a formula (elementwise ops, Python callables)."""
    formula = flop_counter.flop_registry.get(getattr(op, "overloadpacket", None))
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


#: Placeholder roles that require grad by default: what a meta-gradient is taken with respect to.
GRAD_ROLES = ("param", "hyper", "meta")

_META = torch.device("meta")
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class SavedStorage:
    """One storage autograd saves: ``owner`` is the node that allocates it (a placeholder or an op); ``by`` the
    ops that save it (through any view of it); ``returned``: the graph returns it (or a view of it)."""
    owner: str
    nbytes: int
    by: tuple[str, ...]
    returned: bool = False


@dataclass(frozen=True)
class StepAnalysis:
    """Static predictions for one run of a step graph (see the module docstring).

    ``requires_grad``: names of the nodes with an output that requires grad. ``input_bytes``: the placeholders'
    bytes. ``output_bytes``: per returned tensor, its bytes (``params', buffers', opt_state', loss`` for a step).
    ``flops``: one evaluation of the graph (which already contains the inner gradient).
    ``fallback_ops``: ops with no meta kernel (estimated by the fallback rule). ``nondifferentiable``:
    ``"node.argument"`` for each argument that requires grad but that autograd refuses (eager raises there).
    """
    graph: nx.DiGraph = field(repr=False)  # node and edge lists of the whole step: too long for a repr
    requires_grad: frozenset[str] = field(repr=False)
    saved: tuple[SavedStorage, ...] = field(repr=False)
    input_bytes: int
    peak_live_bytes: int
    peak_live_bytes_taped: int
    flops: int
    output_bytes: tuple[int, ...]
    fallback_ops: tuple[str, ...] = field(default=())
    nondifferentiable: tuple[str, ...] = field(default=())

    @property
    def saved_bytes(self) -> int:
        """Bytes autograd saves for backward (distinct storages)."""
        return sum(s.nbytes for s in self.saved)

    def top_saved(self, k: int = 5) -> list[SavedStorage]:
        """The ``k`` largest saved storages, for reports."""
        return sorted(self.saved, key=lambda s: -s.nbytes)[:k]


# ----------------------------------------------------------------------------------------------- step 1
def build_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph of ``gm``: vertices are node names (attributes ``op``, ``target``, ``order``, and
    ``role`` for placeholders), an edge ``a -> b`` when ``b`` uses ``a``."""
    g = nx.DiGraph()
    for i, node in enumerate(gm.graph.nodes):
        info = node.meta.get("unrollc")
        g.add_node(node.name, op=node.op, target=str(node.target), order=i, role=getattr(info, "role", None))
        for arg in node.all_input_nodes:
            g.add_edge(arg.name, node.name)
    return g


def grad_sources(gm: fx.GraphModule, roles: Iterable[str] = GRAD_ROLES) -> frozenset[str]:
    """Names of the floating-point placeholders whose ``meta["unrollc"].role`` is in ``roles``."""
    roles = frozenset(roles)
    out = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        info, val = node.meta.get("unrollc"), node.meta.get("val")
        if info is not None and info.role in roles and isinstance(val, torch.Tensor) and _differentiable(val):
            out.add(node.name)
    return frozenset(out)


# ----------------------------------------------------------------------------------------------- step 2
@dataclass(frozen=True)
class _Out:
    """One tensor output of a probed op: its layout, whether it requires grad, and which argument leaf it
    aliases (None: a fresh storage of ``nbytes``)."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    alias_of: int | None
    nbytes: int


@dataclass(frozen=True)
class _Probe:
    """What one op does, as autograd reports it: outputs (pytree leaves; None for non-tensors), saved tensors
    as ``("arg", i)`` / ``("out", i)`` / ``("new", nbytes)``, and FLOPs."""
    outs: tuple[_Out | None, ...]
    out_spec: Any
    saved: tuple[tuple[str, int], ...]
    flops: int
    fallback: bool = False
    nondifferentiable: tuple[str, ...] = ()


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


# Ops whose meta kernel gives a workspace output of the wrong size (mkldnn_rnn_layer: (0,) on meta, the LSTM's
# saved gates on CPU): probed on small real CPU tensors of the same layout instead.
_REAL_PROBE = frozenset({torch.ops.aten.mkldnn_rnn_layer.default})


def _meta_like(layout: _Out, requires_grad: bool, device: torch.device = _META) -> torch.Tensor:
    t = torch.empty_strided(layout.shape, layout.stride, dtype=layout.dtype, device=device)
    if device != _META:
        t.zero_()
    return t.requires_grad_(requires_grad and _differentiable(t))


def _layout_of(val: torch.Tensor, requires_grad: bool) -> _Out:
    return _Out(tuple(val.shape), tuple(val.stride()), val.dtype, requires_grad, None, _storage_bytes(val))


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the smallest storage that holds ``t``'s elements (its real storage may be larger)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    return (t.storage_offset() + span) * t.element_size()


def _probe(op: Any, args: tuple, kwargs: dict, leaves: list[_Out | None], node: fx.Node) -> _Probe:
    """Run ``op`` once on fresh meta tensors shaped like ``leaves`` and record what autograd saves."""
    arg_leaves, spec = tree_flatten((args, kwargs))
    device = _CPU if op in _REAL_PROBE else _META
    metas = [_meta_like(layout, layout.requires_grad, device) if layout is not None else None for layout in leaves]
    call_args, call_kwargs = tree_unflatten(
        [m if m is not None else a for m, a in zip(metas, arg_leaves, strict=True)], spec
    )
    if "device" in call_kwargs or (not any(m is not None for m in metas) and _has_arg(op, "device")):
        call_kwargs = {**call_kwargs, "device": device}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = op(*call_args, **call_kwargs)
    except RuntimeError as e:
        # Autograd refuses an argument it has no derivative for (e.g. batch norm's running stats): eager would
        # raise too. Probe as if it did not require grad, and report it (StepAnalysis.nondifferentiable).
        names = _NOT_DIFFERENTIABLE.findall(str(e))
        drop = {i for name in names for i in _leaves_of_argument(op, args, kwargs, name)}
        if drop and any(leaves[i] is not None and leaves[i].requires_grad for i in drop):
            fixed = [dataclasses.replace(x, requires_grad=False) if i in drop and x is not None else x
                     for i, x in enumerate(leaves)]
            return dataclasses.replace(_probe(op, args, kwargs, fixed, node), nondifferentiable=tuple(names))
        return _fallback(leaves, node)
    except Exception:  # noqa: BLE001 - no meta kernel: the documented conservative fallback
        return _fallback(leaves, node)
    out_leaves, out_spec = tree_flatten(out)
    arg_storage = {m.untyped_storage()._cdata: i for i, m in enumerate(metas) if m is not None}
    outs: list[_Out | None] = []
    out_storage: dict[int, int] = {}
    for j, o in enumerate(out_leaves):
        if not isinstance(o, torch.Tensor):
            outs.append(None)
            continue
        key = o.untyped_storage()._cdata
        outs.append(_Out(tuple(o.shape), tuple(o.stride()), o.dtype, o.requires_grad, arg_storage.get(key),
                         o.untyped_storage().nbytes()))
        out_storage.setdefault(key, j)
    refs: list[tuple[str, int]] = []
    internal: dict[int, int] = {}  # storages the op allocates and saves but does not return, once each (a
    for s in saved:                # composite such as unrollc.safe_sqrt_masked saves its mask for two wheres)
        key = s.untyped_storage()._cdata
        if key in arg_storage:
            refs.append(("arg", arg_storage[key]))
        elif key in out_storage:
            refs.append(("out", out_storage[key]))
        else:
            internal[key] = s.untyped_storage().nbytes()
    flops = op_flops(op, call_args, call_kwargs, out)
    unique = tuple(dict.fromkeys(refs)) + tuple(("new", nbytes) for nbytes in internal.values())
    return _Probe(tuple(outs), out_spec, unique, flops)


_NOT_DIFFERENTIABLE = re.compile(r"not differentiable with respect to argument '(\w+)'")


def _leaves_of_argument(op: Any, args: tuple, kwargs: dict, name: str) -> range:
    """The indices, among the pytree leaves of ``(args, kwargs)``, of the schema argument ``name``."""
    schema = getattr(op, "_schema", None)
    start = 0
    for i, a in enumerate(args):
        count = len(tree_flatten(a)[0])
        if schema is not None and i < len(schema.arguments) and schema.arguments[i].name == name:
            return range(start, start + count)
        start += count
    for key, a in kwargs.items():
        count = len(tree_flatten(a)[0])
        if key == name:
            return range(start, start + count)
        start += count
    return range(0)


def _has_arg(op: Any, name: str) -> bool:
    schema = getattr(op, "_schema", None)
    return schema is not None and any(a.name == name for a in schema.arguments)


def _fallback(leaves: list[_Out | None], node: fx.Node) -> _Probe:
    """Conservative: saves every floating-point tensor argument; outputs are fresh, laid out as ``meta["val"]``."""
    any_grad = any(layout is not None and layout.requires_grad for layout in leaves)
    saved = tuple(("arg", i) for i, layout in enumerate(leaves)
                  if any_grad and layout is not None and layout.dtype.is_floating_point)
    vals, spec = tree_flatten(node.meta.get("val"))
    outs = tuple(
        _layout_of(v, any_grad and _differentiable(v)) if isinstance(v, torch.Tensor) else None for v in vals
    )
    return _Probe(outs, spec, saved, 0, fallback=True)


# ----------------------------------------------------------------------------------------------- steps 3-5
def analyze_step(gm: fx.GraphModule, *, requires_grad: Iterable[str] | None = None) -> StepAnalysis:
    """Predict what one run of ``gm`` saves for backward, its peak live bytes and its FLOPs.

    Args:
        gm: a step graph whose placeholders carry ``meta["val"]`` (an example tensor).
        requires_grad: names of the placeholders that require grad; default ``grad_sources(gm)`` (params,
            hyperparameters and meta inputs). Non-floating-point placeholders never require grad.
    """
    sources = grad_sources(gm) if requires_grad is None else frozenset(requires_grad)
    graph = build_graph(gm)
    # env: node -> (pytree spec, per-leaf (layout, storage id)); storages: id -> (owner, nbytes)
    env: dict[fx.Node, tuple[Any, list[tuple[_Out, int] | None]]] = {}
    storages: list[tuple[str, int]] = []
    saved_by: dict[int, list[str]] = {}
    cache: dict[Any, _Probe] = {}
    flops, fallback, nondiff = 0, [], []

    def new_storage(owner: str, nbytes: int) -> int:
        storages.append((owner, nbytes))
        return len(storages) - 1

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ValueError(
                    f"unrollc.analysis.liveness.analyze_step: placeholder {node.name!r} has no example tensor in "
                    f"meta['val'] (got {type(val).__name__}); analyze the final step graph (stepper.graph)."
                )
            layout = _layout_of(val, node.name in sources and _differentiable(val))
            env[node] = (None, [(layout, new_storage(node.name, layout.nbytes))])
        elif node.op == "get_attr":
            val = getattr(gm, str(node.target))
            if isinstance(val, torch.Tensor):
                layout = _layout_of(val, False)
                env[node] = (None, [(layout, new_storage(node.name, layout.nbytes))])
        elif node.op == "call_function" and node.target is operator.getitem:
            spec, leaves = env[node.args[0]]
            container = tree_unflatten(list(range(len(leaves))), spec)
            picked = container[node.args[1]]
            idx, sub_spec = tree_flatten(picked)
            env[node] = (sub_spec if not isinstance(picked, int) else None, [leaves[i] for i in idx])
        elif node.op == "call_function":
            leaves, slots = _argument_leaves(node, env)
            key = (node.target, tree_flatten((node.args, node.kwargs))[1],
                   tuple(_key(s[0]) if s is not None else _static(a) for s, a in zip(slots, leaves, strict=True)))
            probe = cache.get(key)
            if probe is None:
                probe = cache[key] = _probe(node.target, node.args, node.kwargs,
                                            [s[0] if s is not None else None for s in slots], node)
            flops += probe.flops
            if probe.fallback:
                fallback.append(node.name)
            nondiff += [f"{node.name}.{name}" for name in probe.nondifferentiable]
            outs: list[tuple[_Out, int] | None] = []
            for o in probe.outs:
                if o is None:
                    outs.append(None)
                elif o.alias_of is not None and slots[o.alias_of] is not None:
                    outs.append((o, slots[o.alias_of][1]))
                else:
                    outs.append((o, new_storage(node.name, o.nbytes)))
            env[node] = (probe.out_spec, outs)
            for kind, i in probe.saved:
                if kind == "arg" and slots[i] is not None:
                    sid = slots[i][1]
                elif kind == "out" and outs[i] is not None:
                    sid = outs[i][1]
                else:       # a fresh buffer the op saves without returning it
                    sid = new_storage(node.name, i)
                saved_by.setdefault(sid, []).append(node.name)
        elif node.op != "output":
            raise ValueError(
                f"unrollc.analysis.liveness.analyze_step: unsupported node {node.format_node()}; step graphs "
                "contain only placeholders, get_attr, call_function and output nodes."
            )
    rg = frozenset(n.name for n, (_, leaves) in env.items() if any(x is not None and x[0].requires_grad for x in leaves))
    nx.set_node_attributes(graph, {n: True for n in rg}, "requires_grad")
    returned = {leaf[1] for arg in tree_flatten(gm.graph.output_node().args[0])[0] if isinstance(arg, fx.Node)
                for leaf in env.get(arg, (None, []))[1] if leaf is not None}
    saved = tuple(SavedStorage(storages[sid][0], storages[sid][1], tuple(dict.fromkeys(by)), sid in returned)
                  for sid, by in saved_by.items())
    input_bytes = sum(nbytes for (owner, nbytes) in storages if graph.nodes[owner]["op"] == "placeholder")
    peak, peak_taped = _peak_live(gm, graph, env, storages, set(saved_by))
    output_bytes = tuple(_output_bytes(gm, env))
    return StepAnalysis(graph, rg, saved, input_bytes, peak, peak_taped, flops, output_bytes, tuple(fallback),
                        tuple(nondiff))


def _output_bytes(gm: fx.GraphModule, env: dict) -> list[int]:
    """Bytes of each tensor the graph returns (elements only; 0 for a non-tensor output, and for a node returned
    before: Adam's step counters, one tensor returned once per parameter, are counted once)."""
    out, seen = [], set()
    for arg in tree_flatten(gm.graph.output_node().args[0])[0]:
        leaves = env.get(arg, (None, [None]))[1] if isinstance(arg, fx.Node) and arg not in seen else [None]
        seen.add(arg)
        layout = leaves[0][0] if len(leaves) == 1 and leaves[0] is not None else None
        out.append(0 if layout is None else math.prod(layout.shape) * layout.dtype.itemsize)
    return out


def _key(layout: _Out) -> tuple:
    return (layout.shape, layout.stride, layout.dtype, layout.requires_grad)


def _static(a: Any) -> Any:
    """A hashable stand-in for a non-tensor argument in the probe cache key."""
    try:
        hash(a)
        return a
    except TypeError:
        return repr(a)


def _argument_leaves(node: fx.Node, env: dict) -> tuple[list[Any], list[tuple[_Out, int] | None]]:
    """The pytree leaves of ``(args, kwargs)`` and, per leaf, the (layout, storage) of a tensor argument."""
    leaves = tree_flatten((node.args, node.kwargs))[0]
    slots: list[tuple[_Out, int] | None] = []
    for a in leaves:
        if isinstance(a, fx.Node) and a in env and len(env[a][1]) == 1 and env[a][1][0] is not None:
            slots.append(env[a][1][0])
        else:
            slots.append(None)
    return leaves, slots


def _peak_live(gm: fx.GraphModule, graph: nx.DiGraph, env: dict, storages: list[tuple[str, int]],
               saved: set[int]) -> tuple[int, int]:
    """Peak bytes of live non-input storages, freeing each after its last use (step 4); and the same with the
    saved storages kept to the end."""
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    end = len(order)
    last_use: dict[int, int] = {}
    for node, (_, leaves) in env.items():
        uses = [order[u] for u in graph.successors(node.name)]
        for leaf in leaves:
            if leaf is None:
                continue
            sid = leaf[1]
            last = end if any(graph.nodes[u]["op"] == "output" for u in graph.successors(node.name)) else max(uses, default=order[node.name])
            last_use[sid] = max(last_use.get(sid, 0), last)
    born: dict[int, list[int]] = {}
    for sid, (owner, _) in enumerate(storages):
        if graph.nodes[owner]["op"] != "placeholder":
            born.setdefault(order[owner], []).append(sid)
    peaks = []
    for keep in (set(), saved):
        live, dying, peak = 0, {}, 0
        for i in range(end):
            for sid in born.get(i, []):
                live += storages[sid][1]
                dying.setdefault(end if sid in keep else last_use.get(sid, i), []).append(sid)
            peak = max(peak, live)
            for sid in dying.pop(i, []):
                live -= storages[sid][1]
        peaks.append(peak)
    return peaks[0], peaks[1]
