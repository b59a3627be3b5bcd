"""Running n steps: a plain autograd loop, or a checkpointed one under a schedule (schedules.py)."""

from __future__ import annotations

import contextlib
import operator
import warnings
import weakref
from dataclasses import replace
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from ..capture import fill_leaves
from ..errors import BatchModifiedError, InternalError, ModelChangedError
from .checkpointed import checkpointed_unroll
from .rng import cuda_devices, draws_global_rng, draws_random, step_generators, stored_rng_bytes
from .schedules import NoCheckpoint, Plan, Policy, resolve_checkpoint
from .state import UnrollState, distinct_nbytes, first_positions

if TYPE_CHECKING:
    from .stepper import Stepper

__all__ = ["hyper_count_error", "plan_unroll", "read_batches", "run_unroll", "state_bytes"]


def read_batches(batches: Iterable[Any], modes: Callable[[], Any] | None = None,
                 same: Callable[[Any, Any], bool] = operator.eq) -> list[Any]:
    """Every batch of a checkpointed unroll, read before its first step (the plan needs n, and the backward pass
    re-runs steps on them): refused if a tensor was changed in place after the iterable yielded it, as a loader
    that refills the same buffers does, since every step would then read the last batch's values. ``modes``
    (``Stepper._modes``, for an iterable other than a list or tuple): refused too if what the step graph bakes in
    changed while the batches were read (a generator annealing ``model.temp``): every step would run with the
    last value, where a plain unroll runs each step with the value its batch was yielded with."""
    read: list[Any] = []
    versions: list[tuple[int, torch.Tensor, int]] = []
    first = None
    for i, batch in enumerate(batches):
        read.append(batch)
        versions += [(i, t, t._version) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
        if modes is None:
            continue
        if i == 0:
            first = modes()  # a value set before the first batch holds for every step: as the plain unroll runs
        elif not same(first, now := modes()):
            raise _model_changed(f"before batch {i}", first, now)
    if first is not None and not same(first, now := modes()):  # code after its last yield
        raise _model_changed("after the last batch", first, now)
    for i, t, version in versions:
        if t._version != version:
            raise BatchModifiedError(
                f"Stepper.unroll: a tensor of batch {i} ({tuple(t.shape)}, {t.dtype}) was changed in place after "
                f"`batches` yielded it (its version went from {version} to {t._version}), as a loader that refills "
                "the same tensors does. A checkpointed unroll reads every batch before its first step (the schedule "
                "needs n) and re-reads them in the backward pass, so each step would see the last values. Yield new "
                "tensors (e.g. `yield x.clone(), y.clone()`), or unroll with checkpoint=None, which reads one batch "
                "per step."
            )
    return read


def _model_changed(when: str, first: Any, now: Any) -> ModelChangedError:
    return ModelChangedError(
        f"Stepper.unroll: the `batches` iterable changed what the step reads from the model or loss_fn while it "
        f"was read, {when}{_changed_values(first, now)}. A checkpointed unroll reads every batch before its first "
        "step (the schedule needs n), so every step would run with the last value, not with the one its batch was "
        "yielded with. Unroll with checkpoint=None (it reads one batch per step), or unroll each stretch of equal "
        "values separately, or pass the changing value as a meta argument or a per-step hyperparameter "
        "(unroll(hyper=...)) instead of setting it on the model."
    )


def _changed_values(first: Any, now: Any) -> str:
    """``": model.temp"``: the names of the Python values (``Stepper._modes``'s third part) that differ, if any."""
    def values(modes: Any) -> dict[tuple[str, str], Any]:
        meta = [v for module in modes[5] for v in module[-1]]  # a meta module's values: ("meta0.", "scale", ...)
        return {(v[0], v[1]): v[2:] for v in (*modes[2], *meta)}

    try:
        before, after = values(first), values(now)
    except (TypeError, IndexError, ValueError):
        return ""
    names = sorted(f"{owner.rstrip('.')}.{name}" if owner else f"model.{name}" for (owner, name) in before.keys() | after.keys()
                   if before.get((owner, name)) != after.get((owner, name)))
    return f" ({', '.join(names[:5])})" if names else " (a module's mode, hooks or code)"


def hyper_count_error(entries: int, batches: int | str) -> ValueError:
    """``unroll(hyper=...)`` does not have one entry per batch."""
    return ValueError(
        f"Stepper.unroll: `hyper` has {entries} entries for {batches} batches; give one mapping per step "
        "(an empty dict keeps a step's hyperparameters as they are in the state)."
    )


def state_bytes(state: UnrollState) -> int:
    """Bytes of one carried state: parameters, buffers and optimizer state (a tensor held under several names,
    such as the step counter the parameters share, counted once)."""
    tensors = list(state.params.values()) + list(state.buffers.values())
    tensors += [v for st in state.opt_state.values() for v in st.values()]
    return distinct_nbytes(tensors)


def plan_unroll(
    stepper: "Stepper",
    state: UnrollState,
    batches: list[Any],
    meta: tuple,
    checkpoint: Any,
    hypers: list[dict[str, Any]] | None = None,
) -> Plan:
    """The plan ``stepper.unroll`` would execute (a Budget needs the cost model: one step is traced, per batch
    layout and per graph that the steps' hyperparameters ``hypers``, if given, select)."""
    policy = resolve_checkpoint(checkpoint, api="Stepper.unroll")
    kwargs: dict[str, int] = {}
    if type(policy).__name__ == "Budget" and batches:
        from ..analysis.cost import CostModel, grad_leaf_bytes  # from the step graphs, nothing is run with grad

        # The largest of the steps' costs: every batch layout's graph, for every graph the steps run. Those are
        # found by walking the steps' hyperparameters from the state's layout: where a step creates optimizer state
        # (a fresh Adam's moments at the first step, momentum buffers where per-step hyperparameters switch
        # momentum on), the steps after it carry that state. Only graphs the unroll runs are traced.
        distinct = distinct_batches(batches)
        walk = hypers if hypers is not None else [state.hyper] * min(len(batches), 2)
        costs, seen, s = [], set(), state
        for h in walk:
            s = replace(s, hyper=h)
            gm = stepper.trace(s, batches[0], *meta)
            if id(gm) not in seen:
                seen.add(id(gm))
                costs += [CostModel.from_stepper(stepper, s, b, *meta) for b in distinct]
                s = _after_first_step(stepper, s, batches[0], meta)  # the layout this graph's steps hand on
        final = max(c.state_bytes for c in costs), state_bytes(s)  # the last layout handed on: its bytes only
        # A stored state keeps the generators' states too when a step draws random numbers (dropout).
        rng = stored_rng_bytes((stepper.trace(state, b, *meta) for b in distinct),
                               cuda_devices(tree_leaves((state.params, state.buffers))))
        # A step's model sees one batch; the backward leaves a .grad on every batch's leaves that require grad
        # (dataset distillation: n synthetic batches).
        # What a taped step saves of its own states: the least of the graphs' (a larger prediction, never a smaller).
        kwargs = {"state_bytes": max(final) + rng, "step_bytes": max(c.tape_bytes for c in costs),
                  "grad_bytes": grad_leaf_bytes(state, batches, meta),
                  "overlap_bytes": min(c.overlap_bytes for c in costs),
                  "backward_bytes": max(c.backward_bytes for c in costs)}
    return policy.plan(len(batches), **kwargs)


def distinct_batches(batches: list[Any]) -> list[Any]:
    """One batch per layout (structure; shape, dtype, device and requires_grad of each tensor; the values of
    Python numbers and strings, which a step graph holds as constants): the batches whose step graphs, or whose
    gradient sources, may differ."""
    seen: dict[Any, Any] = {}
    for b in batches:
        leaves, spec = tree_flatten(b)
        seen.setdefault((spec, tuple(map(_leaf_key, leaves))), b)
    return list(seen.values())


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device, x.requires_grad)
    if isinstance(x, float):
        return (float, x.hex())
    if x is None or isinstance(x, (bool, int, str)):
        return (type(x), x)
    return (type(x), id(x))  # anything else: its own layout


def _after_first_step(stepper: "Stepper", state: UnrollState, batch: Any, meta: tuple) -> UnrollState:
    """A state with the layout of the one after the first step (the optimizer state a fresh optimizer creates
    there), for the graph of the steps after it; nothing is run. Its values stand in for the real ones: ones for
    scalars (a step counter after one step), zeros otherwise; an entry the step graph returns as one tensor for
    several parameters (the shared step counters) is one tensor here too."""
    gm = stepper.trace(state, batch, *meta)
    sig = gm.meta["unrollc"]["signature"]
    outputs = list(gm.graph.output_node().args[0])[len(sig.params) + len(sig.buffers) : -1]
    made: dict[Any, torch.Tensor] = {}
    opt_state: dict[str, dict[str, torch.Tensor]] = {}
    for (name, key), node in zip(sig.state_out, outputs, strict=True):
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return state  # no layout to read: the first step's graph stands for all
        if node not in made:
            made[node] = (torch.ones if val.dim() == 0 else torch.zeros)(val.shape, dtype=val.dtype, device=val.device)
        opt_state.setdefault(name, {})[key] = made[node]
    return state.replace(opt_state=opt_state)


def run_unroll(
    stepper: "Stepper",
    state: UnrollState,
    batches: Iterable[Any],
    meta: tuple,
    policy: Policy,
    hypers: list[dict[str, Any]] | None = None,
    reading_drew_rng: bool = False,
) -> UnrollState:
    """Apply the step once per batch; with a checkpoint policy, keep only the states it plans. Without one,
    ``batches`` is read one batch per step, as a loop of ``stepper.step`` reads it. ``state`` and
    ``meta`` come from :meth:`Stepper.unroll`, which checks the state and binds modules in ``meta``; ``hypers``,
    if given, is each step's whole hyperparameter dict (``unroll(hyper=...)``, checked there), and ``policy`` its
    resolved ``checkpoint=``. ``reading_drew_rng``: reading the batches ahead (:func:`read_batches`) moved torch's
    global generator, which a step with dropout draws from too (warned about)."""
    advance = _advance(stepper)
    plan = None
    if not isinstance(policy, NoCheckpoint):  # the plan needs n, and the backward pass re-reads the batches
        if torch._C._functorch.peek_interpreter_stack() is not None:  # before a Budget's cost model runs there
            _refuse_transforms(policy)
        batches = list(batches)
        if not batches:
            return state.replace(losses=[])
        plan = plan_unroll(stepper, state, batches, meta, policy, hypers)
        if not isinstance(plan.resolved, NoCheckpoint):
            _refuse_transforms(policy, state.params, state.buffers, state.opt_state, state.hyper, hypers, batches, meta)
        distinct = distinct_batches(batches)
        first = state if hypers is None else replace(state, hyper=hypers[0])
        graphs = {id(gm): gm for gm in (stepper.trace(first, b, *meta) for b in distinct)}.values()
        if reading_drew_rng and any(map(draws_global_rng, graphs)):
            warnings.warn(
                "Stepper.unroll: reading `batches` drew from torch's global random generator, and the step draws from "
                f"it too (dropout or another random op). An unroll under {policy!r} reads every batch before its first "
                "step (its schedule needs n), so the steps draw after all the batches instead of in turn with them, as "
                "a loop of stepper.step or checkpoint=None does: the batches and the random masks, and so the "
                "gradients, are not those of such a run. Draw the batches into a list first, or give the data its own "
                "torch.Generator, or unroll with checkpoint=None.",
                stacklevel=3,
            )
    if plan is None or isinstance(plan.resolved, NoCheckpoint):
        # One batch per step as the iterable yields it, as a step() loop reads it; a Budget that keeps every
        # step's graph runs here too, so that it is the plain unroll (create_graph=True, forward-mode AD).
        losses = []
        # What the model and loss_fn bake in is read once per unroll from a list or tuple (no user code runs between
        # its steps), and per step from other iterables (a generator may change the model between batches).
        pinned = isinstance(batches, (list, tuple))
        with stepper._modes_pinned(stepper._modes(meta)) if pinned else contextlib.nullcontext():
            for i, batch in enumerate(batches):
                if hypers is not None:
                    if i == len(hypers):
                        raise hyper_count_error(len(hypers), f"more than {i}")
                    state = replace(state, hyper=hypers[i])
                state = advance(state, batch, meta)
                losses.append(state.loss)
        if hypers is not None and len(losses) != len(hypers):
            raise hyper_count_error(len(hypers), len(losses))
        return state.replace(losses=losses)
    n = len(batches)
    if torch.is_grad_enabled():
        for gm in graphs:
            _refuse_hidden_learned_tensors(gm, stepper)

    modes = stepper._modes(meta)
    # The executor sees flat tuples: state = params + buffers + optimizer state (whose keys appear after
    # the first step of a fresh optimizer), consts = hyperparameters + every batch's tensors + meta tensors.
    param_names, buffer_names = tuple(state.params), tuple(state.buffers)
    layouts: dict[int, tuple[tuple[str, str], ...]] = {0: _state_keys(state)}
    # Hyperparameters: the state's for every step, or each step's own (unroll(hyper=...)); a tensor several steps
    # share (betas no step overrides) is one input, so its gradient is accumulated once.
    consts: list[torch.Tensor] = []
    where: dict[int, int] = {}  # id(tensor) -> its position in consts

    def positions_of(leaves: list[Any]) -> list[int]:
        """Each tensor's position in consts, added once: a hyperparameter several steps share, or a batch repeated
        every step (dataset distillation's ``[(synthetic, labels)] * n``), is one input, whose gradient the
        checkpointed backward accumulates in one tensor, not one per step (n gradients were held until the end:
        binomial grew linearly, a Budget was exceeded)."""
        for x in leaves:
            if isinstance(x, torch.Tensor) and id(x) not in where:
                where[id(x)] = len(consts)
                consts.append(x)
        return [where[id(x)] for x in leaves if isinstance(x, torch.Tensor)]

    hyper_trees = [tree_flatten(h) for h in (hypers if hypers is not None else [state.hyper])]  # tensors only
    hyper_positions = [positions_of(leaves) for leaves, _ in hyper_trees]
    batch_trees = [tree_flatten(b) for b in batches]
    meta_leaves, meta_spec = tree_flatten(tuple(meta))
    batch_positions = [positions_of(leaves) for leaves, _ in batch_trees]
    meta_positions = positions_of(meta_leaves)

    kept: dict[Any, list[Any]] = {}  # the step graphs the steps ran, by cache key (Stepper._graphs_kept)

    def pack(s: UnrollState) -> tuple[torch.Tensor, ...]:
        flat = [s.params[k] for k in param_names] + [s.buffers[k] for k in buffer_names]
        return tuple(flat + [s.opt_state[p][k] for p, k in _state_keys(s)])

    def unpack(i: int, flat: tuple[torch.Tensor, ...], hyper: dict[str, Any], t: int) -> UnrollState:
        n_p, n_b = len(param_names), len(buffer_names)
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        for (p, k), v in zip(layouts[i], flat[n_p + n_b :], strict=True):
            opt_state.setdefault(p, {})[k] = v
        return UnrollState(
            dict(zip(param_names, flat[:n_p], strict=True)),
            dict(zip(buffer_names, flat[n_p : n_p + n_b], strict=True)),
            opt_state,
            hyper,
            t=t,
        )

    def step_fn(i: int, flat: tuple[torch.Tensor, ...], c: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        positions, (_, hyper_spec) = hyper_positions[i % len(hyper_trees)], hyper_trees[i % len(hyper_trees)]
        hyper = tree_unflatten([c[j] for j in positions], hyper_spec)
        leaves, spec = batch_trees[i]
        batch = tree_unflatten(fill_leaves(leaves, [c[j] for j in batch_positions[i]]), spec)
        m = tree_unflatten(fill_leaves(meta_leaves, [c[j] for j in meta_positions]), meta_spec)
        # Recomputed in backward after a model.eval() or with more layouts since: still the graphs it ran.
        with stepper._modes_pinned(modes), stepper._graphs_kept(kept):
            new = advance(unpack(i, flat, hyper, state.t + i), batch, m)
            # the graph step i ran; a step() the user wrapped may change the state besides: nothing is constant
            carried[i + 1] = _state_entries(new) if wrapped else _carries_gradient(stepper._last, carried[i])
            if not step_fn.draws_random and id(gm := stepper._last.gm) not in checked:
                checked.add(id(gm))  # a later graph (per-step hyperparameters, a guard) may draw: keep states from here
                step_fn.draws_random = draws_random(gm)
        layouts[i + 1] = _state_keys(new)
        packed = pack(new)
        shared[i + 1] = first_positions(packed)
        return packed, new.loss

    # Buffers are carried without gradient (BatchNorm's running stats), unless the user made one a learned
    # input (init(buffers={name: tensor requiring grad})) or the step computes it differentiably from the
    # weights (a running mean updated outside torch.no_grad): then it is differentiated like a parameter.
    learned = {k for k, v in state.buffers.items() if v.requires_grad}
    if torch.is_grad_enabled():  # any batch may be the learned one (dataset distillation)
        learned = learned.union(*(differentiated_buffers(stepper, state, b, meta) for b in distinct))
    constant_buffers = frozenset(len(param_names) + i for i, k in enumerate(buffer_names) if k not in learned)
    # State entries no gradient can reach (step counters, frozen parameters), as in the plain unroll where they
    # never require grad: tapes take them as constants instead of differentiating the step through them.
    carried: dict[int, frozenset[tuple[str, Any]]] = {0: _state_entries(state, requiring_grad=True)}
    wrapped = "step" in vars(stepper)  # see _advance

    def constant_positions(i: int) -> frozenset[int]:
        entries = _entries(param_names, buffer_names, layouts[i])
        return constant_buffers | {j for j, e in enumerate(entries) if e not in carried[i]}

    step_fn.constant_positions = constant_positions  # type: ignore[attr-defined]
    # The user's own generators any step draws from (a batch may switch noise on): every batch's graph, each
    # traced once per layout (the stepper's cache), so that every stored state keeps their states too.
    generators = {id(g): g for gm in graphs for g in step_generators(gm)}
    step_fn.generators = tuple(generators.values())  # type: ignore[attr-defined]
    # No generator state is kept with the stored states while no step has drawn (the graphs of every batch layout at
    # the first step; a graph traced later is checked when it first runs): a state stored before the first draw
    # restores the generators' state at the unroll's start, which is theirs (checkpointed.py).
    step_fn.draws_random = any(map(draws_random, graphs))  # type: ignore[attr-defined]
    checked: set[int] = set()

    def held_tensors() -> tuple[torch.Tensor, ...]:
        """The tensors the graphs the steps ran read by reference (checked for in-place changes before re-runs)."""
        found = {id(v): v for entries in kept.values() for entry in entries
                 for node in entry.gm.graph.find_nodes(op="get_attr")
                 if isinstance(v := getattr(entry.gm, str(node.target), None), torch.Tensor) and not v.is_inference()}
        return tuple(found.values())

    step_fn.held_tensors = held_tensors  # type: ignore[attr-defined]
    shared: dict[int, tuple[int, ...]] = {}  # per step, each state position's first position holding its tensor
    final, losses = checkpointed_unroll(step_fn, n, pack(state), tuple(consts), plan)
    # One tensor at several positions (the shared step counters) comes out of the autograd.Function as
    # separate tensors; sharing it again keeps the next step on the graph traced for shared counters.
    final = tuple(final[j] for j in shared[n])
    out = unpack(n, final, state.hyper if hypers is None else hypers[-1], state.t + n)
    out = out.replace(buffers={k: v if k in learned else v.detach() for k, v in out.buffers.items()})
    return out.replace(loss=losses[-1], losses=list(losses))


def _refuse_transforms(policy: Policy, *trees: Any) -> None:
    """A checkpointed unroll is one custom ``autograd.Function`` (with ``backward`` only): refused inside a
    ``torch.func`` transform and with forward-mode dual tensors among its inputs, which it cannot carry."""
    import torch.autograd.forward_ad as fwad

    if torch._C._functorch.peek_interpreter_stack() is not None:
        within = "inside a torch.func transform (grad, vjp, jvp, vmap, jacrev, ...)"
    elif fwad._current_level >= 0 and any(
            fwad.unpack_dual(t).tangent is not None for t in tree_leaves(trees) if isinstance(t, torch.Tensor)):
        within = "with forward-mode AD dual tensors (torch.autograd.forward_ad.make_dual) among its inputs"
    else:
        return
    raise RuntimeError(
        f"Stepper.unroll: called {within} with checkpoint={policy!r}; a checkpointed unroll is one custom "
        "autograd.Function that recomputes steps in torch.autograd's backward pass, and torch.func transforms and "
        "forward-mode AD cannot go through it. Unroll with checkpoint=None there (every step's graph is kept, and "
        "the transforms see the step graphs' ATen ops), or take the meta-gradient with torch.autograd.grad(...) or "
        ".backward() outside any transform."
    )


_DIFFERENTIATED: "weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[frozenset[str], frozenset[str]]]" = (
    weakref.WeakKeyDictionary()
)


def _entries(
    params: Iterable[str], buffers: Iterable[str], opt_state: Iterable[tuple[str, str]]
) -> list[tuple[str, Any]]:
    """State entries in the order of a flat state (and of a step graph's state inputs and outputs):
    ``("param", name)``, ``("buffer", name)``, ``("state", (param, key))``."""
    return [("param", k) for k in params] + [("buffer", k) for k in buffers] + [("state", pk) for pk in opt_state]


def _state_entries(state: UnrollState, *, requiring_grad: bool = False) -> frozenset[tuple[str, Any]]:
    """The entries (:func:`_entries`) of the state's tensors (those that require grad, if asked)."""
    keys = _state_keys(state)
    tensors = [*state.params.values(), *state.buffers.values(), *(state.opt_state[p][k] for p, k in keys)]
    entries = _entries(state.params, state.buffers, keys)
    return frozenset(e for e, v in zip(entries, tensors, strict=True) if v.requires_grad or not requiring_grad)


_DEPENDENCIES: "weakref.WeakKeyDictionary[torch.fx.GraphModule, _Dependencies]" = weakref.WeakKeyDictionary()
_CARRIED: "weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[frozenset, frozenset]]" = weakref.WeakKeyDictionary()


class _Dependencies(NamedTuple):
    """What each state output of a step graph is computed from, as bit masks over the graph's inputs."""
    inputs: dict[tuple[str, Any], int]  # state input entry -> its bit
    outputs: tuple[tuple[tuple[str, Any], int], ...]  # (state output entry, mask of the inputs it reads)
    others: int  # the bits of the other inputs (hyperparameters, batch and meta tensors)


def _carries_gradient(compiled: Any, before: frozenset[tuple[str, Any]]) -> frozenset[tuple[str, Any]]:
    """The state entries after a step of ``compiled`` (a ``CompiledStep``) that a gradient can reach, given those
    that ``before`` names: each output the graph computes from one of them, or from any hyperparameter, batch or
    meta tensor (taken as learned: a superset of what autograd would mark, so never too few). A step counter
    (``step + 1``) and a frozen parameter (passed through) are computed from themselves alone."""
    per_graph = _CARRIED.setdefault(compiled.gm, {})
    if before not in per_graph:
        deps = _state_dependencies(compiled)
        reach = deps.others
        for entry in before:
            reach |= deps.inputs.get(entry, 0)
        per_graph[before] = frozenset(out for out, mask in deps.outputs if mask & reach)
    return per_graph[before]


def gradient_free_inputs(compiled: Any, state: UnrollState) -> frozenset[str]:
    """Names of the step graph's parameter and optimizer-state inputs that no gradient reaches in a long unroll
    from ``state`` (its layout): neither ``state`` makes them require grad nor any step computes them from what
    does (step counters, frozen parameters). Re-run steps take these as constants (see ``run_unroll``); the cost
    model prices the taped step without them."""
    return gradient_free_from(compiled, _state_entries(state, requiring_grad=True))


def gradient_free_from(compiled: Any, reach: frozenset[tuple[str, Any]]) -> frozenset[str]:
    """:func:`gradient_free_inputs` for a state whose entries ``reach`` (:func:`_entries`) require grad."""
    deps = _state_dependencies(compiled)
    while not (grown := reach | (_carries_gradient(compiled, reach) & deps.inputs.keys())) <= reach:
        reach = grown
    placeholders = [node.name for node in compiled.gm.graph.find_nodes(op="placeholder")]
    return frozenset(placeholders[j] for j, entry in enumerate(deps.inputs) if entry[0] != "buffer" and entry not in reach)


def _state_dependencies(compiled: Any) -> _Dependencies:
    """The inputs each state output of the step graph is computed from, read from the fx graph's data edges."""
    gm, sig = compiled.gm, compiled.signature
    if gm not in _DEPENDENCIES:
        inputs = _entries(sig.params, sig.buffers, sig.state_in)
        outputs = _entries(sig.params, sig.buffers, sig.state_out)
        reads: dict[torch.fx.Node, int] = {}
        placeholders = 0
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                reads[node] = 1 << placeholders
                placeholders += 1
            elif node.op != "output":
                mask = 0
                for arg in node.all_input_nodes:
                    mask |= reads[arg]
                reads[node] = mask
        results = list(gm.graph.output_node().args[0])
        if len(results) != len(outputs) + 1 or placeholders < len(inputs):
            raise InternalError(
                f"unrollc: the step graph has {placeholders} inputs and {len(results)} outputs, but its signature "
                f"{len(inputs)} state inputs and {len(outputs)} state outputs and the loss; this is an unrollc bug."
            )
        _DEPENDENCIES[gm] = _Dependencies(
            {entry: 1 << j for j, entry in enumerate(inputs)},
            tuple((entry, reads[out] if isinstance(out, torch.fx.Node) else 0)
                  for entry, out in zip(outputs, results[:-1], strict=True)),
            ((1 << placeholders) - 1) & ~((1 << len(inputs)) - 1),
        )
    return _DEPENDENCIES[gm]


def differentiated_buffers(stepper: "Stepper", state: UnrollState, batch: Any, meta: tuple) -> frozenset[str]:
    """Buffers whose new value the step computes differentiably from what requires grad in the unroll (the
    weights, the optimizer state, learned inputs, and — from the next step on — such buffers themselves): an
    eager unroll carries their gradient to later steps, so a checkpointed one must too. BatchNorm's running
    stats and anything updated under ``torch.no_grad()`` are not among them. From the step graph, cached."""
    from ..analysis.cost import traced_with_grad_inputs
    from ..analysis.liveness import analyze_step, grad_sources

    gm, grad_inputs = traced_with_grad_inputs(stepper, state, batch, meta)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    sources = grad_sources(gm, ("param", "opt_state")) | grad_inputs
    per_graph = _DIFFERENTIATED.setdefault(gm, {})
    if frozenset(sources) not in per_graph:
        n_params, names = len(state.params), list(state.buffers)
        buffer_inputs = placeholders[n_params : n_params + len(names)]
        buffer_outputs = list(gm.graph.output_node().args[0])[n_params : n_params + len(names)]
        found, grows = set(sources), True
        while grows:  # a buffer that carries gradient makes later steps' buffers carry it too
            requires_grad = analyze_step(gm, requires_grad=frozenset(found)).requires_grad
            new = {p.name for p, out in zip(buffer_inputs, buffer_outputs, strict=True)
                   if isinstance(out, torch.fx.Node) and out.name in requires_grad}
            grows = not new <= found
            found |= new
        per_graph[frozenset(sources)] = frozenset(
            name for name, p in zip(names, buffer_inputs, strict=True) if p.name in found and p.name not in sources
        )
    return per_graph[frozenset(sources)]


def _advance(stepper: "Stepper") -> Any:
    """One step of the unroll: ``Stepper._step`` (state and meta were checked and bound once by
    ``Stepper.unroll``), or ``Stepper.step`` where the user wrapped it on the instance (counting or logging
    evaluations), so that the wrapper sees every evaluation the plan makes."""
    if "step" in vars(stepper):
        return lambda state, batch, meta: stepper.step(state, batch, *meta)
    return stepper._step


def _refuse_hidden_learned_tensors(gm: torch.fx.GraphModule, stepper: "Stepper") -> None:
    """A tensor that requires grad but reaches the step only through a closure or an attribute (not through
    ``state``, ``batch`` or ``*meta``) is a constant of the graph: autograd reaches it when the graph runs under
    a plain unroll, but a checkpointed unroll differentiates its inputs only, so its gradient would be lost."""
    held = stepper._held_parameters(gm)
    for node in gm.graph.find_nodes(op="get_attr"):
        value = getattr(gm, str(node.target), None)
        own = held.get(id(value))
        if own is not None:
            raise ValueError(
                f"Stepper.unroll: the step reads the model's parameter {own!r} as loss_fn or grad_callback holds it (a "
                "tensor or list of parameters taken before compile), not through the model: the step graph holds it "
                "as a constant, its time-0 value, and a checkpointed unroll would lose its gradient. Read it through "
                "the model inside the call (model.named_parameters(), model.layer.weight), which gives the step's "
                "weights."
            )
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError(
                f"Stepper.unroll: the step reads a tensor of shape {tuple(value.shape)} that requires grad through "
                "a closure or a module attribute (not through state, batch or *meta); a checkpointed unroll would "
                "lose its gradient. Pass it as a meta argument: stepper.unroll(state, batches, w, checkpoint=...) "
                "with loss_fn(model, batch, w) (a learned loss module can be passed itself), or use checkpoint=None."
            )


def _state_keys(state: UnrollState) -> tuple[tuple[str, str], ...]:
    return tuple((p, k) for p in state.opt_state for k in sorted(state.opt_state[p]))

