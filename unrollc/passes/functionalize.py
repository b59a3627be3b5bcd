"""functionalize: every in-place update becomes a functional one.

Invariant established: no node calls an operator whose schema writes to an argument
(``alias_info.is_write``), and no input is mutated; outputs carry the updated values.

1. Re-trace the graph through ``torch.func.functionalize(remove="mutations")`` on fake tensors,
   keeping each node's metadata (stack trace, module stack) on the nodes it turns into::

       add_ = aten.add_.Tensor(p_fc_weight, mul)       # optimizer: param.add_(...)
       return [p_fc_weight, ...]

   becomes::

       add = aten.add.Tensor(p_fc_weight, mul)
       copy_ = aten.copy_.default(p_fc_weight, add)    # epilogue: write the result back into the input
       return [add, ...]

   Views stay views (``remove="mutations"``, not ``"mutations_and_views"``, which would turn every
   view into a copy and make the graph slower than eager code).
2. Drop the epilogue ``copy_`` into inputs: the step graph returns new values and never writes to its
   inputs (which may be leaf tensors that require grad).
3. A random draw into a fresh non-contiguous CPU tensor (``empty_like(x).bernoulli_(p)``, CPU dropout of a
   transposed activation) became ``aten.bernoulli.p``, which fills a contiguous tensor; it becomes
   ``unrollc.bernoulli_like``, which draws in the tensor's own memory order, as the eager in-place draw does.
5. (:func:`_exact_scatters`) An in-place update of a view of an activation (``z.t().mul_(c)``,
   ``z[1:4, 2:7].mul_(c)``, ``dropout(h.t(), inplace=True)``) leaves ``as_strided_scatter(x, src, size, stride,
   offset)`` in the traced backward; torch's derivative of that op with respect to ``x`` is wrong (identity where
   it is 0: ``gradcheck`` fails on torch 2.13), which made meta-gradients 1-10% off. Where the view is a box of
   slices of ``x`` (any steps, permuted, some dimensions indexed), it becomes ``src`` permuted into ``x``'s order
   and nested ``slice_scatter``s (a contiguous copy where the view covers all of ``x``): the same values, with
   ATen's exact derivatives. Each reading is checked on integers against ``as_strided_scatter`` before it is used.
   Any other non-overlapping view of a contiguous tensor (a slice of a Linear's 3-D output, whose base is the 2-D
   product; a diagonal) becomes ``index_put`` at the view's positions, a constant index.
4. A value whose size depends on the data (boolean-mask indexing, ``nonzero``, ``unique``: ops tagged
   ``dynamic_output_shape``) passes through :func:`check_traced_size` where the ops after it were traced with its
   size (a shape argument holds it, or the user's code read it into Python: ``x[mask].shape[0]``), so another
   size must stop the step with an explanation instead of broadcasting or dividing by the old size silently.
6. (:func:`_rrelu_exact_gradient`) ``nn.RReLU``'s output in training becomes ``x * detach(noise_out)``: torch's
   derivative of ``rrelu_with_noise_functional`` reads the wrong noise tensor.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_leaves, tree_map

from .. import ops  # noqa: F401 - registers torch.ops.unrollc.bernoulli_like
from ..errors import CaptureError, InternalError
from ..traced_functions import SIZE_READ
from .schema import mutated_args

__all__ = ["check_traced_size", "functionalize"]


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite in-place ops into functional ones (see module docstring)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = [n.meta.get("val") for n in placeholders]
    if any(not isinstance(e, torch.Tensor) for e in examples):
        raise InternalError("functionalize: every placeholder needs a tensor example in meta['val']")

    if _rewrite_in_place(gm.graph):  # step 0: the common case, without a re-trace
        _exact_scatters(gm)
        _renorm_without_gradient(gm.graph)
        _rrelu_exact_gradient(gm.graph)
        _differentiable_copies(gm.graph)
        gm.graph.lint()
        gm.recompile()
        return gm
    _record_data_dependent_sizes(gm.graph)  # the traced sizes, from the real trace (see step 4)

    def run(*args: torch.Tensor) -> object:
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(gm).run(*args)

    # Tensors the user's code closes over (a loss's class weights, a plain tensor attribute of the model) stay
    # constants of the graph: real tensors, which the fake-mode re-trace must accept.
    new = make_fx(
        torch.func.functionalize(run, remove="mutations"), tracing_mode="fake", record_stack_traces=True,
        _allow_non_fake_inputs=True,
    )(*examples)
    # Step 2: drop the copy-back epilogue into inputs.
    for node in list(new.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder":
            if node.users:
                raise InternalError("functionalize: an input copy-back has users")
            new.graph.erase_node(node)
    # Step 3: random draws keep eager's order.
    for node in new.graph.nodes:
        in_place = (node.meta.get("custom") or {}).get(_IN_PLACE_DRAW)
        if node.op == "call_function" and node.target is torch.ops.aten.bernoulli.p and in_place and not node.kwargs:
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if isinstance(val, torch.Tensor) and val.device.type == "cpu" and not val.is_contiguous():
                node.target = torch.ops.unrollc.bernoulli_like.default
                node.args = (node.args[0], node.args[1] if len(node.args) > 1 else 0.5)
    _check_data_dependent_sizes(new.graph)
    _exact_scatters(new)
    _renorm_without_gradient(new.graph)
    _rrelu_exact_gradient(new.graph)
    _differentiable_copies(new.graph)
    for old, node in zip(placeholders, (n for n in new.graph.nodes if n.op == "placeholder"), strict=True):
        node.name = old.name
        node.target = old.target
        node.meta.update({k: v for k, v in old.meta.items() if k in ("unrollc", "val")})
    for node in list(new.graph.nodes):  # _out_of_place replaces nodes
        if node.op == "call_function" and mutated_args(node.target):
            names = [a.name for a in node.target._schema.arguments]
            bound = {**dict(zip(names, node.args)), **node.kwargs}
            written = [bound.get(name) for name in mutated_args(node.target)]
            if any(isinstance(a, fx.Node) and a.op == "get_attr" for a in written):
                raise _constant_mutated(node)
            if not _out_of_place(new.graph, node, written):
                raise InternalError(f"functionalize: {node.format_node()} still mutates an argument")
    new.meta.update(gm.meta)
    new.graph.lint()
    new.recompile()
    return new


def _differentiable_copies(graph: fx.Graph) -> None:
    """A functional ``copy(dst, src)`` that converts, broadcasts or changes the layout becomes ``unrollc.copy_into``:
    the same values, and eager ``copy_``'s derivative, which ATen's ``copy`` lacks (the meta-gradient failed with
    "derivative for aten::copy is not implemented"). A copy that changes nothing is left for ``remove_copies``."""
    from .remove_copies import _same_layout

    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.copy.default):
        dst, src = node.args[0], node.args[1]
        if not (_same_layout(node, src) and _same_layout(dst, src)) and not node.kwargs.get("non_blocking"):
            node.target = ops.copy_into
            node.args = (dst, src)


def _renorm_without_gradient(graph: fx.Graph) -> None:
    """``nn.Embedding(max_norm=...)`` renormalizes the looked-up rows of its weight in place under ``torch.no_grad()``
    (``F.embedding``): eager autograd then sees the new values and differentiates as if the weight were unchanged.
    Functionalized, that write is ``w2 = embedding_renorm(w, ...)``, which has no derivative (the meta-gradient
    failed with torch's NotImplementedError; found in review). It becomes ``detach(embedding_renorm(detach(w))) +
    (w - detach(w))``: the renormed values exactly, and an identity gradient to ``w``, as in eager."""
    from ..capture import keep_stop_gradient

    detach = torch.ops.aten.detach.default
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding_renorm.default:
            continue
        weight = node.args[0]
        with graph.inserting_before(node):
            frozen = graph.call_function(detach, (weight,))
            renormed = graph.call_function(node.target, (frozen, *node.args[1:]), dict(node.kwargs))
            values = graph.call_function(detach, (renormed,))
            zero = graph.call_function(torch.ops.aten.sub.Tensor, (weight, frozen))
            out = graph.call_function(torch.ops.aten.add.Tensor, (values, zero))
        for added in (frozen, renormed, values, zero, out):
            added.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "val")})
        keep_stop_gradient(frozen)
        keep_stop_gradient(values)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _rrelu_exact_gradient(graph: fx.Graph) -> None:
    """``nn.RReLU`` in training draws a slope per element into its ``noise`` buffer in place
    (``rrelu_with_noise``). Functionalized, that is ``out, noise_out = rrelu_with_noise_functional(x, noise)``,
    whose derivative in torch 2.13 reads the *input* ``noise`` (an uninitialised ``empty_like``) instead of the
    slopes drawn: the meta-gradient through the activation was garbage (found in review). The output becomes
    ``x * detach(noise_out)``: the same values bit for bit (``x * r`` where ``x < 0``, ``x * 1`` elsewhere, as the
    kernel computes them) and eager's derivative, the drawn slopes. Eval mode (``training=False``) draws nothing
    and is left alone."""
    from ..capture import keep_stop_gradient

    op = torch.ops.aten.rrelu_with_noise_functional.default
    names = [a.name for a in op._schema.arguments]
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not op:
            continue
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        if bound.get("training") is not True:
            continue
        outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if not outs:
            continue
        noise_out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 1), None)
        with graph.inserting_after(node):
            if noise_out is None:
                noise_out = graph.call_function(operator.getitem, (node, 1))
                noise_out.meta["val"] = node.meta["val"][1]
        with graph.inserting_after(noise_out):
            slopes = graph.call_function(torch.ops.aten.detach.default, (noise_out,))
        with graph.inserting_after(slopes):
            out = graph.call_function(torch.ops.aten.mul.Tensor, (bound["self"], slopes))
        for added in (slopes, out):
            added.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        slopes.meta["val"], out.meta["val"] = node.meta["val"][1], node.meta["val"][0]
        keep_stop_gradient(slopes)
        for old in outs:
            old.replace_all_uses_with(out)
            graph.erase_node(old)


def _rewrite_in_place(graph: fx.Graph) -> bool:
    """Step 0: rewrite every in-place op of ``graph`` into its out-of-place variant directly, where that is exact
    without tracking aliases, and return True; else change nothing and return False (the re-trace, step 1, does
    it). Exact when every write is ``op_(self, ...)`` (an op whose functional ``op`` takes the same arguments) into
    a tensor that is not a view, and no view of a written tensor is read after a write that it would see: the
    optimizer's ``param.add_(...)``, ``exp_avg.lerp_(...)``, an activation's ``relu_``. Then later readers of the
    written tensor read the op's new value. Data-dependent sizes and random draws take the re-trace, whose
    steps 3 and 4 they need. A third to a half of a trace's time was the re-trace (make_fx's per-op cost)."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    storages = [_storage(n.meta.get("val")) for n in nodes if n.op == "placeholder"]
    if len(set(storages) - {None}) < len([k for k in storages if k is not None]):
        return False  # inputs sharing memory: a write into one is seen by the other (the re-trace tracks that)
    plan: list[tuple[fx.Node, Any, dict[int, int | None]]] = []  # (op, its functional op, {written arg: output})
    root_of: dict[fx.Node, fx.Node] = {}  # an in-place op's result -> the tensor it wrote into (its chain's root)
    writes: dict[fx.Node, list[int]] = {}  # root -> positions of the writes into it
    casts: dict[fx.Node, torch.dtype | None] = {}  # op_ -> the dtype its functional op's result is cast to
    for node in nodes:
        if node.op != "call_function":
            continue
        if _data_dependent(node) or torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            return False
        written = mutated_args(node.target)
        if not written:
            continue
        if node.target in _WRITES_TO_OUTPUTS:
            functional, outputs = _WRITES_TO_OUTPUTS[node.target]
        else:
            functional = _functional_variant(node.target)
            if functional is None or written != [node.target._schema.arguments[0].name]:
                return False
            outputs = {0: None}  # op_(self, ...): the functional op's result is self's new value
            cast = _cast_needed(node, functional)
            if cast is False:
                return False
            casts[node] = cast
        if len(node.args) <= max(outputs) or any(not isinstance(node.args[i], fx.Node) for i in outputs):
            return False
        for i in outputs:
            target = node.args[i]
            root = root_of.get(target, target)
            if root.op not in ("placeholder", "call_function") or (root.op == "call_function" and _returns_alias(root)):
                return False  # a write into a view, or into a graph constant (the re-trace explains that one)
            if outputs[i] is None:
                root_of[node] = root
            writes.setdefault(root, []).append(order[node])
        plan.append((node, functional, outputs))
    if not plan:
        return True
    for root, positions in writes.items():  # a view of a written tensor must not be read across a write
        members = [root, *(n for n, r in root_of.items() if r is root)]
        pending = [u for m in members for u in m.users if u.op == "call_function" and u not in root_of and _returns_alias(u)]
        seen: set[fx.Node] = set()
        while pending:
            view = pending.pop()
            if view in seen:
                continue
            seen.add(view)
            last_read = max((order[u] for u in view.users), default=order[view])
            if any(order[view] < p < last_read for p in positions):
                return False
            pending += [u for u in view.users if u.op == "call_function" and _returns_alias(u)]
    for node, functional, outputs in plan:
        with graph.inserting_after(node):
            out = graph.call_function(functional, node.args, node.kwargs)
        out.meta.update(node.meta)
        if "unrollc functional val" in out.meta:  # promoted: float64 where the in-place op stores float32
            out.meta["val"] = out.meta.pop("unrollc functional val")
        order[out] = order[node]
        result = out
        if casts.get(node) is not None:  # float32 self, float64 other: computed in float64, stored in self
            with graph.inserting_after(out):
                result = graph.call_function(torch.ops.aten._to_copy.default, (out,), {"dtype": casts[node]})
            result.meta.update({k: v for k, v in node.meta.items() if k != "unrollc functional val"})
            order[result] = order[node]
        node.replace_all_uses_with(result)  # a multi-output op's first outputs are its in-place form's outputs
        for i, k in outputs.items():
            target = out.args[i]
            value = result
            if k is not None:
                with graph.inserting_after(out):
                    value = graph.call_function(operator.getitem, (out, k))
                value.meta.update({**node.meta, "val": target.meta.get("val")})
                order[value] = order[node]
            _later_readers_read(target, value, order[node], order, (out, result, value))
        graph.erase_node(node)
    return True


def _later_readers_read(target: fx.Node, value: fx.Node, written_at: int, order: dict[fx.Node, int],
                        keep: tuple[fx.Node, ...]) -> None:
    """The nodes after position ``written_at`` that read ``target`` read ``value`` (its new value) instead, except
    ``keep`` (the nodes that compute it); nodes missing from ``order`` are new ones, after everything."""
    for user in list(target.users):
        if user not in keep and order.get(user, len(order)) > written_at:
            user.replace_input_with(target, value)


def _cast_needed(node: fx.Node, functional: Any) -> torch.dtype | None | bool:
    """For ``node = op_(self, ...)``: None if ``functional(self, ...)`` gives a tensor of self's dtype and shape,
    self's dtype if it gives another dtype (an in-place op computes in the promoted dtype and stores in self's),
    False if another shape or unknown."""
    from ..capture import fake_mode

    self_val = node.args[0].meta.get("val")
    vals = tree_map(lambda a: a.meta.get("val", _MISSING) if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
    if not isinstance(self_val, torch.Tensor) or any(v is _MISSING for v in tree_leaves(vals)):
        return False
    try:
        with fake_mode():
            result = functional(*vals[0], **vals[1])
    except Exception:  # noqa: BLE001 - whatever the reason, the re-trace decides
        return False
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(self_val.shape):
        return False
    if result.dtype == self_val.dtype:
        return None
    node.meta["unrollc functional val"] = result  # the functional op's own value (its dtype), for its node
    return self_val.dtype


_MISSING = object()


@functools.cache
def _functional_variant(op: Any) -> Any:
    """``aten.op`` for an in-place ``aten.op_``: its overload taking the same arguments (names and types; the
    overload names may differ: ``pow_.Scalar(Tensor self, Scalar exponent)`` is ``pow.Tensor_Scalar``), or None."""
    schema = op._schema
    packet = schema.name.split("::")[-1]
    if schema.name.split("::")[0] != "aten" or not packet.endswith("_") or packet.startswith("_") or packet in _ALIASING:
        return None
    functional = getattr(torch.ops.aten, packet.removesuffix("_"), None)

    def arguments(s: Any) -> list[tuple[str, str, bool]]:
        return [(a.name, str(a.type), a.kwarg_only) for a in s.arguments]

    for name in getattr(functional, "overloads", lambda: [])():
        candidate = getattr(functional, name)
        returns_view = any(r.alias_info is not None for r in candidate._schema.returns)  # t_ -> t: metadata, not values
        if arguments(candidate._schema) == arguments(schema) and not mutated_args(candidate) and not returns_view:
            return candidate
    return None


# In-place ops that make ``self`` share another tensor's memory, which their schema does not mark (``set_(source)``:
# a later write into ``source`` is seen through ``self``; found in review): left to the re-trace.
_ALIASING = frozenset({"set_", "resize_"})


# Ops that write into arguments other than their first, with the functional op that returns the new values:
# {written argument's position: functional output's position}.
_WRITES_TO_OUTPUTS: dict[Any, tuple[Any, dict[int, int | None]]] = {
    torch.ops.aten._native_batch_norm_legit.default: (  # BatchNorm in training: the running statistics
        torch.ops.aten._native_batch_norm_legit_functional.default, {3: 3, 4: 4}),
}


def _storage(val: Any) -> tuple | None:
    """Which memory a real example tensor uses (None for other values and empty storages)."""
    if not isinstance(val, torch.Tensor) or isinstance(val, FakeTensor) or val.device.type == "meta":
        return None
    if val.layout != torch.strided:  # a sparse batch (torch.sparse.mm(adj, x)): no storage to compare
        return ("layout", id(val))
    ptr = val.untyped_storage().data_ptr()
    return (val.device, ptr) if ptr else None


def _returns_alias(node: fx.Node) -> bool:
    """Whether ``node``'s op returns a view of (or the same tensor as) one of its arguments."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _out_of_place(graph: fx.Graph, node: fx.Node, written: list[Any]) -> bool:
    """Rewrite an in-place op that ``torch.func.functionalize`` left in place into its out-of-place variant, when
    that is exact: it writes into one fresh, unaliased tensor the step made (``zeros_like(mask).masked_fill_(mask,
    -inf)``, as ``F.multi_head_attention_forward`` does with a key padding mask the loss closes over: an argument
    that is a real tensor constant, not a functional one, keeps functionalize from rewriting the op). Later uses
    of the written tensor read the new value. Returns False (nothing changed) otherwise."""
    if len(written) != 1 or not isinstance(target := written[0], fx.Node) or target.op != "call_function":
        return False
    if _returns_alias(target) or any(u is not node and u.op == "call_function" and _returns_alias(u) for u in target.users):
        return False  # a view of something, or viewed: the write would have to reach the other aliases too
    functional = _functional_variant(node.target)
    if functional is None:
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_after(node):
        out = graph.call_function(functional, node.args, node.kwargs)
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    _later_readers_read(target, out, order[node], order, (out,))
    graph.erase_node(node)
    return True


def _constant_mutated(node: fx.Node) -> CaptureError:
    """The step writes in place into a tensor it closes over (not a parameter, buffer or optimizer state):
    the step graph cannot carry that write from one step to the next."""
    from ..inspect.source import source_of

    where = source_of(node)
    at = f" at {where.short()}" if where is not None and where.filename else ""
    return CaptureError(
        f"unrollc.compile: the step writes in place ({node.target}) into a tensor it closes over{at}: a tensor "
        "that is not a parameter, a buffer or optimizer state (a class attribute of the optimizer, a global, a "
        "plain tensor attribute of the model). A step graph carries only those three from one step to the next, "
        "so the write would be lost. Keep such a tensor in the optimizer's per-parameter state "
        "(self.state[p][...]) or register it as a buffer of the model (module.register_buffer), or compute it "
        "out of place."
    )


@fx.node.has_side_effect  # kept where only its check is used (a size read into Python: ``y[y > 0].shape[0]``)
def check_traced_size(x: torch.Tensor, size: tuple[int, ...], source: str) -> torch.Tensor:
    """``x`` itself, if it has the size the step graph was traced with; else a :class:`CaptureError` (a value
    whose size depends on the data, see the module docstring, step 4)."""
    if tuple(x.shape) != size:
        raise CaptureError(
            f"unrollc: {source} gives a tensor of shape {tuple(x.shape)} for this batch, but the step graph was "
            f"traced with shape {size}. Its size depends on the values of the data (boolean-mask indexing, "
            "nonzero, unique, masked_select), and the ops after it were traced with the first size, so the step "
            "cannot run. Keep shapes fixed, e.g. with a mask: (err.pow(2) * mask).sum() / mask.sum() instead "
            "of err[mask].pow(2).mean()."
        )
    return x


_TRACED_SIZE = "unrollc traced size"  # in node.meta["custom"], which the re-trace copies to the new nodes
_IN_PLACE_DRAW = "unrollc in-place draw"  # the same: a bernoulli_ whose functional form must keep its order


def _data_dependent(node: fx.Node) -> bool:
    """A node whose output size depends on the data: an op tagged ``dynamic_output_shape``, or an output of one."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return torch.Tag.dynamic_output_shape in getattr(node.target, "tags", ())


def _sizes(val: Any) -> Any:
    """The sizes of a node's value as ints: a tuple for a tensor, a tuple of them for a tuple of tensors (None for
    an entry that is not a tensor); None where a size has no value."""
    try:
        if isinstance(val, torch.Tensor):
            return tuple(int(d) for d in val.shape)
        if isinstance(val, (tuple, list)):
            return tuple(_sizes(v) if isinstance(v, torch.Tensor) else None for v in val)
    except Exception:  # noqa: BLE001 - a size without a value: nothing to compare with
        return None
    return None


def _record_data_dependent_sizes(graph: fx.Graph) -> None:
    """Before the re-trace: the traced sizes of data-dependent values, and which random draws were in place."""
    for node in graph.nodes:
        marks = {}
        if _data_dependent(node) and node.target is not operator.getitem and (size := _sizes(node.meta.get("val"))):
            marks[_TRACED_SIZE] = size  # on the op: its getitem nodes are re-made under the op's metadata
        if node.op == "call_function" and node.target is torch.ops.aten.bernoulli_.float:
            marks[_IN_PLACE_DRAW] = True
        if marks:
            node.meta["custom"] = {**node.meta.get("custom", {}), **marks}


def _check_data_dependent_sizes(graph: fx.Graph) -> None:
    from ..inspect.source import source_of

    for node in list(graph.nodes):
        size = (node.meta.get("custom") or {}).get(_TRACED_SIZE)
        if size is None or not _data_dependent(node):
            continue
        if isinstance(node.meta.get("val"), (tuple, list)) and node.target is not operator.getitem:
            node.meta["val"] = _concrete(node.meta["val"], size)  # a multi-output op: its sizes for the cost analysis
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if node.target is operator.getitem:  # one output of a multi-output op (torch.unique's values, counts)
            size = size[node.args[1]] if isinstance(node.args[1], int) and node.args[1] < len(size) else None
        if not isinstance(size, tuple) or not all(isinstance(d, int) for d in size):
            continue
        val = node.meta["val"]
        if not all(isinstance(d, int) for d in val.shape):  # the re-trace left the size symbolic: the traced one
            node.meta["val"] = torch.empty(size, dtype=val.dtype, device="meta")  # (for the cost analysis)
        if not (node.meta.get("custom") or {}).get(SIZE_READ) and not _size_baked_in(node, size):
            continue
        where = source_of(node)
        source = f"`{where.code}` ({where.short().rsplit(': ', 1)[0]})" if where and where.code else str(node.target)
        with graph.inserting_after(node):
            check = graph.call_function(check_traced_size, (node, size, source))
        check.meta.update(node.meta)
        node.replace_all_uses_with(check, delete_user_cb=lambda user, check=check: user is not check)


def _concrete(vals: Any, sizes: tuple) -> Any:
    """``vals`` (a tuple of example tensors) with the symbolic sizes replaced by the traced ones."""
    return type(vals)(
        torch.empty(size, dtype=v.dtype, device="meta")
        if isinstance(v, torch.Tensor) and isinstance(size, tuple) and not all(isinstance(d, int) for d in v.shape)
        else v
        for v, size in zip(vals, (*sizes, *[None] * (len(vals) - len(sizes))))
    )


def _size_baked_in(node: fx.Node, size: tuple[int, ...]) -> bool:
    """Whether an op computed from ``node`` was traced with its data-dependent length as a constant: a shape
    argument (``expand(g, [n])``, ``view(x, [n, 4])``) holding the length of dim 0, where the data decide it
    (``nonzero``, ``x[mask]``, ``unique``). Without one (``x[mask].sum()``, ``index_fill(0, nonzero(m), 1.)``)
    another length runs correctly and is not refused."""
    if not size:
        return False
    length, seen, todo = size[0], set(), list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        for arg in (*user.args, *user.kwargs.values()):
            if isinstance(arg, (list, tuple)) and any(type(a) is int and a == length for a in arg):
                return True
        todo.extend(user.users)
    return False


def _exact_scatters(gm: fx.GraphModule) -> None:
    """Step 5: each ``as_strided_scatter`` whose view is a box of slices (see :func:`_view_as_slices`) becomes
    ``slice_scatter``s, or a ``permute`` made contiguous where the view covers the whole tensor; another view
    (a diagonal, a slice of a reshaped tensor) of a contiguous tensor becomes ``index_put`` at the view's
    positions, a constant index (:func:`_view_positions`)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.as_strided_scatter.default:
            continue
        base, src, size, stride = node.args[:4]
        offset = node.args[4] if len(node.args) > 4 else node.kwargs.get("storage_offset", 0)
        val = base.meta.get("val") if isinstance(base, fx.Node) else None
        recipe = _view_as_slices(val, size, stride, offset)
        positions = _view_positions(val, size, stride, offset) if recipe is None else None
        if recipe is None and positions is None:
            continue

        def emit(target: Any, *args: Any, **kwargs: Any) -> fx.Node:
            new = graph.call_function(target, args, kwargs)
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            new.meta["val"] = _fake_run(target, args, kwargs)
            return new

        with graph.inserting_before(node):
            if recipe is not None:
                result = _scatter_as_slices(emit, base, src, recipe)
            else:
                name = f"_unrollc_view_positions_{sum(n.startswith('_unrollc_view_positions_') for n in gm._buffers)}"
                gm.register_buffer(name, positions.to(val.device))
                index = graph.get_attr(name)
                mode = getattr(val, "fake_mode", None)
                index.meta["val"] = mode.from_tensor(getattr(gm, name)) if mode is not None else None
                flat = emit(torch.ops.aten.view.default, base, [-1])
                values = emit(torch.ops.aten.reshape.default, src, [-1])
                put = emit(torch.ops.aten.index_put.default, flat, [index], values)
                result = emit(torch.ops.aten.view.default, put, list(val.shape))
        result.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(result)
        graph.erase_node(node)


def _fake_run(target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The example value of ``target(*args, **kwargs)`` from the arguments' fake values (None without them)."""
    vals = tree_map(lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, args)  # also inside lists
    mode = next((v.fake_mode for v in tree_leaves(vals) if hasattr(v, "fake_mode")), None)
    if mode is None:
        return None
    with mode:
        return target(*vals, **kwargs)


# Per view dimension of more than one element, the base dimension it walks; per base dimension, the
# (start, end, step) of the view in it (a dimension the view does not walk holds one index: a select).
_Slices = tuple[tuple[int, ...], tuple[tuple[int, int, int], ...], tuple[int, ...]]


def _view_as_slices(val: Any, size: Any, stride: Any, offset: Any) -> _Slices | None:
    """How ``val.as_strided(size, stride, offset)`` of a contiguous ``val`` reads as ``val[s0, s1, ...]`` with one
    slice ``start:end:step`` per dimension, possibly permuted and with some dimensions indexed (``z.t()``,
    ``z[:, :4]``, ``z[1:4, 2:7]``, ``z[:, 1::3]``, ``z[:, 2]``); None where it does not (overlapping or
    expanded views). Checked by running the rewrite on integers, so a wrong reading is never used."""
    offset = _readable_offset(val, size, stride, offset)
    if offset is None or not offset < val.numel():
        return None
    shape = tuple(val.shape)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]  # row-major (val.stride() may differ in size-1 dims)
    starts, rest = [], offset
    for st in strides:
        starts.append(rest // st)
        rest %= st
    walked: list[int] = []
    bounds = {d: (starts[d], starts[d] + 1, 1) for d in range(len(shape))}
    for n, st in zip(size, stride, strict=True):
        if n == 1:
            continue
        fits = [d for d in range(len(shape)) if d not in walked and st > 0 and st % strides[d] == 0
                and starts[d] + (n - 1) * (st // strides[d]) < shape[d]]
        if not fits:
            return None
        d = max(fits, key=lambda d: strides[d])
        walked.append(d)
        bounds[d] = (starts[d], starts[d] + (n - 1) * (st // strides[d]) + 1, st // strides[d])
    recipe = (tuple(walked), tuple(bounds[d] for d in range(len(shape))), tuple(size))
    if val.numel() > _CHECKED_NUMEL:  # the reading is exact by construction; the check costs memory this size
        return recipe
    base = torch.zeros(shape, dtype=torch.int32)
    src = torch.arange(1, math.prod(size) + 1, dtype=torch.int32).reshape(size)
    try:
        expected = torch.as_strided_scatter(base, src, size, stride, offset)
        got = _scatter_as_slices(lambda target, *args, **kwargs: target(*args, **kwargs), base, src, recipe)
    except RuntimeError:
        return None
    return recipe if torch.equal(got, expected) else None


_CHECKED_NUMEL = 1 << 22  # views of tensors up to this size are checked on integers before they are rewritten


def _readable_offset(val: Any, size: Any, stride: Any, offset: Any) -> int | None:
    """The storage offset of ``val.as_strided(size, stride, offset)`` as an int, where the view can be read: ``val``
    a non-empty contiguous tensor and every size, stride and the offset concrete ints (None otherwise)."""
    offset = offset or 0
    if not isinstance(val, torch.Tensor) or not val.is_contiguous() or val.numel() == 0 or type(offset) is not int:
        return None
    if not all(type(d) is int for d in (*size, *stride, *val.shape)) or len(size) != len(stride) or offset < 0:
        return None
    return offset


def _view_positions(val: Any, size: Any, stride: Any, offset: Any) -> torch.Tensor | None:
    """The flat positions in a contiguous ``val`` that ``val.as_strided(size, stride, offset)`` reads, in its
    order, if no two coincide (int64; None otherwise, or for tensors over :data:`_CHECKED_NUMEL` elements)."""
    offset = _readable_offset(val, size, stride, offset)
    if offset is None or val.numel() > _CHECKED_NUMEL:
        return None
    try:
        positions = torch.arange(val.numel()).as_strided(tuple(size), tuple(stride), offset).reshape(-1)
    except RuntimeError:
        return None
    return positions if positions.unique().numel() == positions.numel() else None


def _scatter_as_slices(emit: Callable[..., Any], base: Any, src: Any, recipe: _Slices) -> Any:
    """``as_strided_scatter(base, src, ...)`` built from views and ``slice_scatter`` (ATen's exact derivatives),
    each op made by ``emit(target, *args)``: called eagerly to check a recipe, inserted as nodes to use it."""
    aten = torch.ops.aten
    walked, bounds, size = recipe
    ones = [i for i, n in enumerate(size) if n == 1]
    if ones:
        src = emit(aten.squeeze.dims, src, ones)  # dims of one element walk no base dimension
    order = sorted(range(len(walked)), key=lambda i: walked[i])
    if order != list(range(len(walked))):
        src = emit(aten.permute.default, src, order)  # base dimension order
    for d in range(len(bounds)):
        if d not in walked:
            src = emit(aten.unsqueeze.default, src, d)  # an indexed dimension, of length 1
    shape = _shape_of(base)
    sliced = [d for d, (start, end, step) in enumerate(bounds) if (start, end, step) != (0, shape[d], 1)]
    if not sliced:  # the whole tensor, maybe permuted
        return emit(aten.clone.default, src, memory_format=torch.contiguous_format)

    def put(t: Any, k: int) -> Any:
        d = sliced[k]
        inner = src if k == len(sliced) - 1 else put(emit(aten.slice.Tensor, t, d, *bounds[d]), k + 1)
        return emit(aten.slice_scatter.default, t, inner, d, *bounds[d])

    return put(base, 0)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple((x.meta["val"] if isinstance(x, fx.Node) else x).shape)
