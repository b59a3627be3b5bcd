"""Run an n-step unroll under a checkpoint ``Plan``, differentiably, with one custom autograd Function.

``checkpointed_unroll(step_fn, n, state0, consts, plan)`` returns the final state and the n step losses as
if the steps had run in a plain autograd loop, but keeps only what the plan says:

1. forward (no graph): interpret ``plan.forward_actions`` — ``Advance`` runs steps without a graph, ``Store``
   keeps a state, and the final ``Tape`` runs the last step (revolve) or segment (every-k) with its graph,
   which the backward sweep uses first. Losses are recorded once, in this sweep.
2. backward: interpret ``plan.backward_actions`` — ``Restore``/``Advance`` recompute a state from a checkpoint,
   ``Tape`` re-runs steps with grad enabled on detached inputs, ``Backprop`` calls ``torch.autograd.grad`` with
   the state gradient at the tape's end plus the loss gradients of its steps, accumulates the gradients of
   ``consts`` and carries the state gradient back to the tape's start.

The step function must be a function of (i, state, consts) and the random generators only, without in-place
updates of its inputs (stored states are reused). Random draws (dropout) are replayed exactly: every stored
state keeps the generators' state of its moment (:class:`~unrollc.runtime.rng.RngState`: the default ones, and
the ``torch.Generator`` objects listed in ``step_fn.generators`` if it has that attribute), restored with it,
so a recomputed step draws what it drew in the forward sweep (while a ``step_fn``'s attribute ``draws_random`` is
False, no step has drawn yet and no generator state is kept: the states stored meanwhile restore the generators'
state at the start; the step function sets it True before its first draw); the backward sweep leaves the user's
generators as it found them. Double backward is not supported (``create_graph=True`` raises); a second backward through
the same unroll (``retain_graph=True``) replays the forward sweep first (``plan.evaluations`` more calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from unrollc.errors import InternalError
from unrollc.runtime.rng import RngState, cuda_devices, fork_rng
from unrollc.runtime.schedules import Advance, Backprop, Free, Plan, Restore, Return, Store, Tape

__all__ = ["ExecutionStats", "StepFn", "checkpointed_unroll"]

State = tuple[Tensor, ...]
StepFn = Callable[[int, State, State], tuple[State, Tensor]]


@dataclass
class ExecutionStats:
    """Counts observed by the executor (pass one to ``checkpointed_unroll(stats=...)`` to compare with the plan)."""
    evaluations: int = 0
    peak_states: int = 0
    peak_taped_steps: int = 0


def _differentiable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _leaf(t: Tensor, requires_grad: bool) -> Tensor:
    """A detached alias of ``t`` that is a graph leaf (requiring grad only for float tensors)."""
    return t.detach().requires_grad_(requires_grad and _differentiable(t))


def _leaves(state: State, constant_positions: frozenset[int]) -> State:
    """:func:`_leaf` of every state tensor; a tensor held at several positions (a shared step counter) becomes
    one leaf, so that the taped steps see it as one tensor, as the forward sweep did."""
    made: dict[tuple[int, bool], Tensor] = {}
    out = []
    for j, t in enumerate(state):
        requires_grad = j not in constant_positions
        key = (id(t), requires_grad)
        if key not in made:
            made[key] = _leaf(t, requires_grad)
        out.append(made[key])
    return tuple(out)


@dataclass
class _Tape:
    """The live graph of steps ``start..stop-1``: leaf inputs, the state at ``stop``, one loss per step."""
    start: int
    stop: int
    inputs: State
    outputs: State
    losses: list[Tensor]


class _Runner:
    """Interprets plan actions: the working state, the stored states, the tape, and (backward) the gradients."""

    def __init__(self, step_fn: StepFn, n: int, consts: State, const_leaves: State, stats: ExecutionStats) -> None:
        self.step_fn, self.consts, self.const_leaves, self.stats = step_fn, consts, const_leaves, stats
        self.cur: State = ()
        self.cur_index: int | None = 0
        self.stored: dict[int, State] = {}
        self.rng: dict[int, RngState | None] = {}           # the generators' state at each stored state
        self.rng0: RngState | None = None                   # theirs at the start: of every state stored before a draw
        self.rng_devices: tuple[int, ...] = ()              # CUDA devices whose generators are kept too
        self.rng_generators: tuple[torch.Generator, ...] = getattr(step_fn, "generators", ())  # the user's own
        self.tape: _Tape | None = None
        self.losses: list[Tensor | None] = [None] * n      # recorded once, by the forward sweep, detached
        self.state_grad: list[Tensor | None] = []           # gradient of the state at the live tape's end
        self.loss_grads: Tensor | None = None
        self.const_grads: list[Tensor | None] = [None] * len(consts)
        # State positions never differentiated (BatchNorm running stats, step counters), declared by the step
        # function: one set, or a function of the step a tape starts at (the state's layout may change).
        self.constant_positions: frozenset[int] | Callable[[int], frozenset[int]] = getattr(
            step_fn, "constant_positions", frozenset())

    def call(self, i: int, state: State, consts: State) -> tuple[State, Tensor]:
        """One evaluation of the step function, counted and checked."""
        self.stats.evaluations += 1
        result = self.step_fn(i, state, consts)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], tuple)
                and all(isinstance(t, Tensor) for t in result[0])
                and isinstance(result[1], Tensor) and result[1].numel() == 1):
            raise TypeError(
                "unrollc.checkpointed_unroll: step_fn(i, state, consts) must return (next_state, loss), "
                f"next_state a tuple of tensors and loss a one-element tensor; step {i} returned {result!r:.200}."
            )
        next_state, loss = result
        loss = loss.reshape(())
        if self.losses[i] is None:
            self.losses[i] = loss.detach()
        return next_state, loss

    def run(self, actions: Sequence[object]) -> None:
        for action in actions:
            if isinstance(action, Store):
                self.stored[action.index] = self.cur
                # a step function that has not drawn yet (draws_random False) keeps none: the start's is theirs
                draws = getattr(self.step_fn, "draws_random", True)
                self.rng[action.index] = RngState.now(self.rng_devices, self.rng_generators) if draws else None
                self.stats.peak_states = max(self.stats.peak_states, len(self.stored))
            elif isinstance(action, Restore):
                self.cur, self.cur_index = self.stored[action.index], action.index
                if (rng := self.rng[action.index] or self.rng0) is not None:
                    rng.restore()
            elif isinstance(action, Free):
                del self.stored[action.index]
                del self.rng[action.index]
            elif isinstance(action, Advance):
                self._check_at(action.start)
                with torch.no_grad():
                    for i in range(action.start, action.stop):
                        self.cur, _ = self.call(i, self.cur, self.consts)
                self.cur_index = action.stop
            elif isinstance(action, Tape):
                self._tape(action)
            elif isinstance(action, Backprop):
                self._backprop(action)
            elif not isinstance(action, Return):
                raise InternalError(f"unrollc.checkpointed_unroll: unknown plan action {action!r}")

    def _check_at(self, index: int) -> None:
        if self.cur_index != index:
            raise InternalError(
                f"unrollc.checkpointed_unroll: the plan runs step {index} but the working state is at "
                f"{self.cur_index}"
            )

    def _tape(self, action: Tape) -> None:
        """Run the steps with grad enabled on detached float inputs; keep the graph until ``Backprop``."""
        self._check_at(action.start)
        if self.tape is not None:
            raise InternalError("unrollc.checkpointed_unroll: a plan tapes while another tape is alive")
        with torch.enable_grad():
            constant = self.constant_positions
            inputs = _leaves(self.cur, constant(action.start) if callable(constant) else constant)
            state, losses = inputs, []
            for i in range(action.start, action.stop):
                state, loss = self.call(i, state, self.const_leaves)
                losses.append(loss)
        self.tape = _Tape(action.start, action.stop, inputs, state, losses)
        self.stats.peak_taped_steps = max(self.stats.peak_taped_steps, action.stop - action.start)
        self.cur, self.cur_index = tuple(t.detach() for t in state), action.stop

    def _backprop(self, action: Backprop) -> None:
        """Pull the state gradient at ``tape.stop`` and the tape's loss gradients back to ``tape.start``."""
        tape, self.tape, self.cur_index = self.tape, None, None
        if tape is None or (tape.start, tape.stop) != (action.start, action.stop):
            raise InternalError(f"unrollc.checkpointed_unroll: {action} does not match the live tape")
        outputs, grads = [], []
        for out, g in zip(tape.outputs, self.state_grad, strict=True):
            if g is not None and out.requires_grad:
                outputs.append(out)
                grads.append(g)
        if self.loss_grads is not None:
            for i, loss in zip(range(tape.start, tape.stop), tape.losses, strict=True):
                if loss.requires_grad:
                    outputs.append(loss)
                    grads.append(self.loss_grads[i])
        # One tensor at several positions (the parameters' shared step counter) is one leaf: its gradient is
        # credited to its first position only (pop), or the steps before would count it once per position.
        wrt = {id(t): t for t in (*tape.inputs, *self.const_leaves) if t.requires_grad}
        if not outputs or not wrt:
            self.state_grad = [None] * len(tape.inputs)
            return
        got = dict(zip(wrt, torch.autograd.grad(outputs, list(wrt.values()), grads, allow_unused=True), strict=True))
        self.state_grad = [got.pop(id(t), None) for t in tape.inputs]
        for j, c in enumerate(self.const_leaves):
            g = got.pop(id(c), None)
            if g is not None:
                self.const_grads[j] = g if self.const_grads[j] is None else self.const_grads[j] + g

def _forward_sweep(step_fn: StepFn, plan: Plan, stats: ExecutionStats, state0: State, consts: State,
                   const_needs: Sequence[bool], rng0: RngState | None = None) -> tuple[_Runner, State]:
    """Run the plan's forward actions; the runner keeps the stored states and the last tape for backward."""
    const_leaves = tuple(_leaf(c, need) for c, need in zip(consts, const_needs, strict=True))
    runner = _Runner(step_fn, plan.n, consts, const_leaves, stats)
    runner.rng0 = rng0
    runner.rng_devices = cuda_devices((*state0, *consts))  # once: stores happen up to n times
    runner.cur = state0
    runner.run(plan.forward_actions)
    if runner.cur_index != plan.n or any(loss is None for loss in runner.losses):
        raise InternalError(f"unrollc.checkpointed_unroll: the forward sweep of {plan.resolved} missed steps")
    final, runner.cur = runner.cur, ()
    return runner, final


def _check_held(held: Sequence[tuple[Tensor, int]]) -> None:
    """Refuse the backward sweep if a tensor the steps read by reference was modified in place since the forward
    sweep: its re-runs would compute other states than the steps they replay, and a wrong gradient, silently."""
    for t, version in held:
        if t._version != version:
            raise RuntimeError(
                f"unrollc: a tensor of shape {tuple(t.shape)} and dtype {t.dtype} that the steps read by reference (a "
                "tensor loss_fn closes over or reads as a global, or a module's tensor attribute) was modified by an "
                f"in-place operation after the checkpointed unroll (its version went from {version} to {t._version}). "
                "The backward pass re-runs steps, which would read the new values and give a wrong gradient. Change "
                "it after backward(), or assign a new tensor (w = w * 2) instead of changing it in place (w.mul_(2)), "
                "or pass it as a meta argument."
            )


class _CheckpointedUnroll(torch.autograd.Function):
    """Inputs: state0 + consts. Outputs: the final state + the stacked step losses (shape ``(n,)``)."""

    @staticmethod
    def forward(ctx, step_fn: StepFn, plan: Plan, stats: ExecutionStats, n_state: int,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        const_needs = ctx.needs_input_grad[4 + n_state:]
        # a second backward replays the sweep from here
        ctx.rng0 = RngState.now(cuda_devices(tensors), getattr(step_fn, "generators", ()))
        runner, final = _forward_sweep(step_fn, plan, stats, tensors[:n_state], tensors[n_state:], const_needs, ctx.rng0)
        ctx.save_for_backward(*tensors)     # version counters: in-place changes to inputs are caught
        # and to the tensors the steps read by reference (a class-weight tensor loss_fn closes over), which the
        # backward sweep's re-runs would read changed
        ctx.held = [(t, t._version) for t in getattr(step_fn, "held_tensors", tuple)()]
        ctx.runner, ctx.args = runner, (step_fn, plan, stats, n_state, const_needs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in final if not _differentiable(t)))
        return (*final, torch.stack(runner.losses))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself would have to be differentiable
            raise RuntimeError(
                "unrollc: a checkpointed unroll is differentiable once; create_graph=True through it (Hessian-vector "
                "products, gradient penalties on the meta-gradient) is not supported. Unroll with checkpoint=None "
                "for higher-order derivatives."
            )
        step_fn, plan, stats, n_state, const_needs = ctx.args
        saved = ctx.saved_tensors
        _check_held(ctx.held)
        runner, ctx.runner = ctx.runner, None   # the backward sweep consumes the stored states and the tape
        with fork_rng(ctx.rng0.devices, ctx.rng0.generators):  # recomputation restores stored states: undo it
            if runner is None:                  # a second backward (retain_graph=True): replay the forward sweep
                ctx.rng0.restore()
                runner, _ = _forward_sweep(step_fn, plan, stats, saved[:n_state], saved[n_state:], const_needs, ctx.rng0)
            elif 0 in runner.stored:
                runner.stored[0] = saved[:n_state]
            runner.state_grad, runner.loss_grads = list(grads[:-1]), grads[-1]
            runner.run(plan.backward_actions)
        if len(runner.state_grad) != n_state:
            raise InternalError("unrollc.checkpointed_unroll: the backward sweep did not end at state 0")
        return (None, None, None, None, *runner.state_grad, *runner.const_grads)


def checkpointed_unroll(step_fn: StepFn, n: int, state0: State, consts: State, plan: Plan, *,
                        stats: ExecutionStats | None = None) -> tuple[State, list[Tensor]]:
    """Run ``state_{i+1}, loss_i = step_fn(i, state_i, consts)`` for i in 0..n-1 under the checkpoint ``plan``.

    Returns ``(state_n, [loss_0, ..., loss_{n-1}])``, differentiable with respect to every float tensor of
    ``state0`` and ``consts`` that requires grad (gradients also flow through every intermediate state). The
    state's length may change between steps (e.g. optimizer state created by step 0). Exactly
    ``plan.evaluations`` calls of ``step_fn`` are made when a gradient is possible; when grad mode is off or
    nothing requires grad, the n steps just run once. ``stats``, if given, receives the observed counts.
    A ``step_fn`` may carry an attribute ``constant_positions`` for state entries that are never differentiated,
    such as BatchNorm running statistics: a frozenset of state positions, or a function from a step index to the
    positions constant in the state that step reads.
    """
    if not isinstance(state0, tuple) or not isinstance(consts, tuple) or not all(
            isinstance(t, Tensor) for t in (*state0, *consts)):
        raise TypeError("unrollc.checkpointed_unroll: state0 and consts must be tuples of tensors.")
    if not isinstance(plan, Plan) or plan.n != n:
        raise ValueError(
            f"unrollc.checkpointed_unroll: the plan is for n={getattr(plan, 'n', None)} steps but n={n}; "
            f"build it with policy.plan({n})."
        )
    stats = stats if stats is not None else ExecutionStats()
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*state0, *consts)):
        runner = _Runner(step_fn, n, consts, consts, stats)
        state = state0
        for i in range(n):
            state, _ = runner.call(i, state, consts)
        return state, list(runner.losses)
    *final, losses = _CheckpointedUnroll.apply(step_fn, plan, stats, len(state0), *state0, *consts)
    return tuple(final), list(losses.unbind(0))
