"""The checkpointed executor gives the plain autograd loop's values and gradients, with the plan's counts."""

from __future__ import annotations

import pytest
import torch

from unrollc.runtime.checkpointed import ExecutionStats, checkpointed_unroll
from unrollc.runtime.schedules import Binomial, EveryK, NoCheckpoint, Plan, Sqrt



@pytest.fixture(autouse=True)
def _float64_default(float64):
    """Every test here runs in float64 (the fixture restores the default dtype afterwards)."""

D, H, BATCH = 3, 4, 5


def step_fn(i: int, state, consts):
    """One SGD-with-momentum step of a tiny tanh MLP, gradients written out with tensor ops.

    state0 = (w1, w2); after step 0 the state is (w1, w2, v1, v2, count) — the momentum buffers and an int64
    step counter appear, as optimizer state does. consts = (lr, momentum, xs, ys, perm) with an int64 batch
    permutation.
    """
    lr, momentum, xs, ys, perm = consts
    w1, w2 = state[0], state[1]
    x, y = xs[perm[i % perm.numel()]], ys[perm[i % perm.numel()]]
    h = torch.tanh(x @ w1)
    r = h @ w2 - y
    loss = (r * r).mean()
    dpred = 2 * r / r.numel()
    g2 = h.T @ dpred
    g1 = x.T @ (torch.outer(dpred, w2) * (1 - h * h))
    if len(state) == 2:
        v1, v2, count = g1, g2, torch.zeros((), dtype=torch.int64)
    else:
        v1, v2, count = momentum * state[2] + g1, momentum * state[3] + g2, state[4]
    return (w1 - lr * v1, w2 - lr * v2, v1, v2, count + 1), loss


def make_inputs(n_batches: int = 3):
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(D, H, generator=gen).requires_grad_()
    w2 = torch.randn(H, generator=gen).requires_grad_()
    lr = torch.tensor(0.1).requires_grad_()
    momentum = torch.tensor(0.9)
    xs = torch.randn(n_batches, BATCH, D, generator=gen).requires_grad_()     # learned batches (distillation)
    ys = torch.randn(n_batches, BATCH, generator=gen)
    perm = torch.tensor([2, 0, 1])
    return (w1, w2), (lr, momentum, xs, ys, perm)


def objective(final, losses) -> torch.Tensor:
    weights = torch.linspace(1.0, 2.0, len(losses))
    return (torch.stack(losses) * weights).sum() + (final[0] ** 2).sum() + final[1].sum() + final[2].sum()


def plain_unroll(n, state0, consts, step=step_fn):
    """The reference: a plain autograd loop."""
    state, losses = state0, []
    for i in range(n):
        state, loss = step(i, state, consts)
        losses.append(loss)
    return state, losses


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, i, state, consts):
        self.calls += 1
        return step_fn(i, state, consts)


def grads_of(final, losses, state0, consts):
    wrt = [t for t in (*state0, *consts) if t.requires_grad]
    return torch.autograd.grad(objective(final, losses), wrt)


POLICIES = [NoCheckpoint(), EveryK(1), EveryK(3), Sqrt(), Binomial(2), Binomial(5), Binomial(1), Binomial()]


@pytest.mark.parametrize("n", [1, 2, 7, 20])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_gradients_and_counts_match_the_plain_loop(policy, n: int) -> None:
    state0, consts = make_inputs()
    ref_final, ref_losses = plain_unroll(n, state0, consts)
    ref_grads = grads_of(ref_final, ref_losses, state0, consts)

    plan = policy.plan(n)
    counting, stats = Counting(), ExecutionStats()
    final, losses = checkpointed_unroll(counting, n, state0, consts, plan, stats=stats)
    for got, want in zip((*final, *losses), (*ref_final, *ref_losses), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert final[-1].item() == n and not final[-1].requires_grad
    grads = grads_of(final, losses, state0, consts)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    assert counting.calls == plan.evaluations == stats.evaluations
    assert stats.peak_states <= plan.peak_states
    assert stats.peak_taped_steps <= plan.peak_taped_steps


def noisy_step_fn(i: int, state, consts):
    """step_fn on inputs with random noise (dropout-like): a recomputed step must draw the same noise."""
    lr, momentum, xs, ys, perm = consts
    noisy = xs * (torch.rand(xs.shape) > 0.3) + 0.1 * torch.randn(xs.shape)
    return step_fn(i, state, (lr, momentum, noisy, ys, perm))


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_random_draws_are_replayed_and_the_generator_is_left_alone(policy) -> None:
    n = 9
    state0, consts = make_inputs()
    torch.manual_seed(1)
    ref_final, ref_losses = plain_unroll(n, state0, consts, step=noisy_step_fn)
    ref_grads = grads_of(ref_final, ref_losses, state0, consts)
    ref_next = torch.rand(3)  # the generator after the unroll and its backward

    torch.manual_seed(1)
    final, losses = checkpointed_unroll(noisy_step_fn, n, state0, consts, policy.plan(n))
    grads = grads_of(final, losses, state0, consts)
    for got, want in zip((*final, *losses, *grads), (*ref_final, *ref_losses, *ref_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.rand(3), ref_next, rtol=0, atol=0)


def test_a_step_fn_that_draws_nothing_keeps_no_generator_state(monkeypatch) -> None:
    """``draws_random = False``: the stored states keep no generator state (5 KB each on the CPU, more than the
    weights of a small model), and the gradients are the plain loop's."""
    from unrollc.runtime import checkpointed

    taken = []
    now = checkpointed.RngState.now
    monkeypatch.setattr(checkpointed.RngState, "now", classmethod(lambda cls, *a: taken.append(1) or now(*a)))
    n, plan = 12, Binomial(3).plan(12)
    state0, consts = make_inputs()
    ref = grads_of(*plain_unroll(n, state0, consts), state0, consts)
    for draws, expected in ((True, True), (False, False)):
        fn = Counting()
        fn.draws_random = draws
        taken.clear()
        got = grads_of(*checkpointed_unroll(fn, n, state0, consts, plan), state0, consts)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert (len(taken) > 1) == expected  # one is the unroll's own (a second backward replays from it)


@pytest.mark.parametrize("use", ["final", "losses", "one_loss"])
def test_partial_objectives(use: str) -> None:
    """Gradients when only the final state, only the losses, or a single early loss is used."""
    n = 6
    state0, consts = make_inputs()
    pick = {
        "final": lambda final, losses: (final[0] ** 3).sum(),
        "losses": lambda final, losses: sum(losses),
        "one_loss": lambda final, losses: losses[1],
    }[use]
    wrt = [t for t in (*state0, *consts) if t.requires_grad]
    want = torch.autograd.grad(pick(*plain_unroll(n, state0, consts)), wrt)
    got = torch.autograd.grad(pick(*checkpointed_unroll(step_fn, n, state0, consts, Binomial(2).plan(n))), wrt)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_only_consts_require_grad() -> None:
    """Gradients reach lr and the batches through every intermediate state even when state0 needs none."""
    n = 7
    (w1, w2), consts = make_inputs()
    state0 = (w1.detach(), w2.detach())
    lr, xs = consts[0], consts[2]
    want = torch.autograd.grad(objective(*plain_unroll(n, state0, consts)), (lr, xs))
    got = torch.autograd.grad(objective(*checkpointed_unroll(step_fn, n, state0, consts, Sqrt().plan(n))), (lr, xs))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradcheck_against_finite_differences() -> None:
    """Independent of the plain loop: central differences on lr, the batches and state0, float64."""
    n = 5
    (w1, w2), (lr, momentum, xs, ys, perm) = make_inputs()
    plan = Binomial(2).plan(n)

    def f(w1, lr, xs):
        final, losses = checkpointed_unroll(step_fn, n, (w1, w2.detach()), (lr, momentum, xs, ys, perm), plan)
        return objective(final, losses)

    assert torch.autograd.gradcheck(f, (w1, lr, xs), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_second_backward_replays_the_forward_sweep() -> None:
    n = 7
    state0, consts = make_inputs()
    plan = Binomial(2).plan(n)
    counting = Counting()
    out = objective(*checkpointed_unroll(counting, n, state0, consts, plan))
    first = torch.autograd.grad(out, state0, retain_graph=True)
    second = torch.autograd.grad(out, state0)
    for g1, g2 in zip(first, second, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0)
    assert counting.calls == 2 * plan.evaluations


def test_without_grad_runs_each_step_once() -> None:
    n = 7
    state0, consts = make_inputs()
    counting = Counting()
    with torch.no_grad():
        final, losses = checkpointed_unroll(counting, n, state0, consts, Binomial(2).plan(n))
    assert counting.calls == n and len(losses) == n and not final[0].requires_grad
    ref_final, ref_losses = plain_unroll(n, state0, consts)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses).detach(), rtol=1e-12, atol=0)


def test_plan_for_another_n_is_refused() -> None:
    state0, consts = make_inputs()
    with pytest.raises(ValueError, match=r"plan is for n=4 steps but n=5; build it with policy.plan\(5\)"):
        checkpointed_unroll(step_fn, 5, state0, consts, EveryK(2).plan(4))


def test_bad_step_fn_result_is_refused() -> None:
    state0, consts = make_inputs()
    with pytest.raises(TypeError, match=r"must return \(next_state, loss\)"):
        checkpointed_unroll(lambda i, s, c: s, 2, state0, consts, EveryK(1).plan(2))


def test_plan_type() -> None:
    assert isinstance(Sqrt().plan(4), Plan)


def test_state_passed_through_unchanged() -> None:
    """A state tensor returned as is (a frozen buffer) and a const copied into the state still get gradients."""
    def step(i, state, consts):
        w, buf = state[0], state[1]
        (scale,) = consts
        w = w * torch.cos(buf) * scale
        return (w, buf, scale), (w * w).sum()

    for n in (1, 2, 5):
        w = torch.tensor([0.5, -1.5], requires_grad=True)
        buf = torch.tensor([0.3, 0.2], requires_grad=True)
        scale = torch.tensor(0.9, requires_grad=True)
        want = torch.autograd.grad(objective(*plain_unroll(n, (w, buf), (scale,), step)), (w, buf, scale))
        for policy in (EveryK(1), EveryK(2), Binomial(2)):
            out = checkpointed_unroll(step, n, (w, buf), (scale,), policy.plan(n))
            got = torch.autograd.grad(objective(*out), (w, buf, scale))
            for g, ref in zip(got, want, strict=True):
                torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("policy", [EveryK(2), Sqrt(), Binomial(2)], ids=str)
def test_a_tensor_held_at_two_state_positions_gets_its_gradient_once(policy, float64):
    """Shared step counters put one tensor at several state positions. The taped re-runs keep it one leaf (as the
    forward sweep had it), and its gradient must reach the steps before once, not once per position."""
    n = 7
    w = torch.tensor([0.3, -0.2], requires_grad=True)

    def step_fn(i, state, consts):
        shared, other = state[0], state[2]
        new = shared * 1.1 + state[1] * 0.5 + other.sin() * consts[0]  # state[1] is state[0]'s tensor
        nxt = other * 0.9 + new.tanh()
        return (new, new, nxt), (new * nxt).sum()

    x = torch.tensor([0.7, 1.3], requires_grad=True)
    y = torch.tensor([0.1, -0.4], requires_grad=True)
    final, losses = checkpointed_unroll(step_fn, n, (x, x, y), (w,), policy.plan(n))
    got = torch.autograd.grad(sum(losses) + final[0].sum() * final[2].sum() + final[1].prod(), [x, y, w])

    state = (x, x, y)
    total = 0
    for i in range(n):
        state, loss = step_fn(i, state, (w,))
        total = total + loss
    want = torch.autograd.grad(total + state[0].sum() * state[2].sum() + state[1].prod(), [x, y, w])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
