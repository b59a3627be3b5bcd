"""Per-step hyperparameters: ``stepper.unroll(state, batches, hyper=[{...} per step])`` runs each step with its own
values (a learned learning-rate schedule), equal to eager torch.optim with the group options changed between
steps, and differentiable under every checkpoint schedule."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import unrollc
import oracles
from oracles import central_difference

SCHEDULES = [None, "sqrt", 3, "binomial", unrollc.Binomial(slots=2), unrollc.Budget(10**6)]
N = 9


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def make():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(N)]
    return model, batches


def eager_with_schedule(model, opt, batches, schedule):
    """Deep copies trained eagerly, the group options set from ``schedule[i]`` (bare keys: every group) before
    step i, as a user changes them between steps; the final parameters and optimizer state."""
    model, opt = copy.deepcopy((model, opt))
    for batch, options in zip(batches, schedule, strict=True):
        for key, value in options.items():
            head, dot, rest = key.partition(".")
            groups = [opt.param_groups[int(head)]] if dot else opt.param_groups
            for g in groups:
                g[rest if dot else key] = tuple(map(float, value)) if isinstance(value, tuple) else float(value)
        opt.zero_grad(set_to_none=True)
        mse(model, batch).backward()
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    return dict(model.named_parameters()), {names[id(p)]: st for p, st in opt.state.items()}


@pytest.mark.parametrize("checkpoint", SCHEDULES, ids=repr)
def test_trajectory_equals_eager_with_options_changed_between_steps(checkpoint, float64):
    """SGD with two groups: a per-group lr schedule, momentum switched on at step 4 (a guard: the graph changes
    and the momentum buffer appears mid-unroll) and a weight decay that comes and goes."""
    model, batches = make()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}],
                          lr=0.05, momentum=0.0)
    schedule = [{"0.lr": 0.05 + 0.01 * i, "momentum": 0.0 if i < 4 else 0.9, "1.weight_decay": 0.01 * (i % 3)}
                for i in range(N)]
    stepper = unrollc.compile(model, opt, mse)
    state = stepper.unroll(stepper.init(), batches, hyper=schedule, checkpoint=checkpoint)
    params, opt_state = eager_with_schedule(model, opt, batches, schedule)
    for name, p in params.items():
        assert torch.equal(state.params[name], p.detach()), name
        assert torch.equal(state.opt_state[name]["momentum_buffer"], opt_state[name]["momentum_buffer"]), name
    assert state.t == N and len(state.losses) == N
    assert float(state.hyper["0.lr"]) == schedule[-1]["0.lr"] and float(state.hyper["1.lr"]) == 0.02  # the last step's


def test_adam_betas_per_step_and_empty_overrides_keep_the_state_values(float64):
    model, batches = make()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    schedule = [{"betas": (0.5 + 0.05 * i, 0.99)} if i % 2 else {} for i in range(N)]
    eager = [dict(s) or {"betas": (0.9, 0.999)} for s in schedule]  # {}: the state's (the optimizer's) betas
    stepper = unrollc.compile(model, opt, mse)
    state = stepper.unroll(stepper.init(), batches, hyper=schedule, checkpoint="sqrt")
    params, opt_state = eager_with_schedule(model, opt, batches, eager)
    for name, p in params.items():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.opt_state[name]["exp_avg_sq"], opt_state[name]["exp_avg_sq"], rtol=1e-12, atol=1e-14)
    assert float(state.hyper["betas"][0]) == 0.9  # the last step (N - 1 = 8, even) kept the state's betas


def per_step_lr_meta_gradient(stepper, batches, lrs0, xv, checkpoint):
    lrs = lrs0.clone().requires_grad_()
    state = stepper.unroll(stepper.init(), batches, hyper=[{"lr": lrs[i]} for i in range(len(batches))],
                           checkpoint=checkpoint)
    return torch.autograd.grad(stepper.forward(state, xv).pow(2).mean(), lrs)[0]


def test_learned_per_step_learning_rates_get_the_eager_unrolls_meta_gradient_under_every_schedule(float64):
    model, batches = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stepper = unrollc.compile(model, opt, mse)
    lrs0, xv = torch.linspace(0.02, 0.2, N), torch.randn(16, 4)

    lrs = lrs0.clone().requires_grad_()

    def update(params, grads, states, t):  # torch.optim.SGD(momentum=0.9) with lr lrs[t - 1], written out
        return oracles.sgd_momentum(lrs[t - 1], 0.9)(params, grads, states, t)

    final = oracles.eager_unroll(model, mse, batches, update)
    names = [n for n, _ in model.named_parameters()]
    with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, final))):
        reference = torch.autograd.grad(model(xv).pow(2).mean(), lrs)[0]

    for checkpoint in SCHEDULES:
        grad = per_step_lr_meta_gradient(stepper, batches, lrs0, xv, checkpoint)
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12, msg=f"checkpoint={checkpoint!r}")

    def meta_loss(lrs):
        state = stepper.unroll(stepper.init(), batches, hyper=[{"lr": lrs[i]} for i in range(N)])
        return stepper.forward(state, xv).pow(2).mean()

    torch.testing.assert_close(reference, central_difference(meta_loss, lrs0), rtol=1e-6, atol=1e-9)


def test_a_step_hyperparameter_not_overridden_still_gets_its_gradient(float64):
    """A tensor lr set once in init and a per-step weight decay: both learned, under a checkpointed unroll."""
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    xv = torch.randn(16, 4)

    def grads(checkpoint):
        lr, wd = torch.tensor(0.1, requires_grad=True), torch.full((N,), 0.01, requires_grad=True)
        state = stepper.init(hyper={"lr": lr})
        state = stepper.unroll(state, batches, hyper=[{"weight_decay": wd[i]} for i in range(N)], checkpoint=checkpoint)
        return torch.autograd.grad(stepper.forward(state, xv).pow(2).mean(), (lr, wd))

    plain = grads(None)
    assert plain[0].abs() > 0 and (plain[1].abs() > 0).all()
    for checkpoint in ("sqrt", "binomial"):
        for a, b in zip(grads(checkpoint), plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("hyper,error,match", [
    ({"lr": 0.1}, TypeError, r"one mapping of hyperparameter overrides per step .* got dict; for the same values"),
    (torch.ones(N), TypeError, r"one mapping .* got Tensor"),
    ([{"lr": 0.1}] * (N - 1), ValueError, rf"`hyper` has {N - 1} entries for {N} batches"),
    ([{}] * (N - 1) + [3.0], TypeError, rf"hyper\[{N - 1}\] must be a mapping"),
    ([{}] * (N - 1) + [{"momentun": 0.9}], KeyError, rf"hyper\[{N - 1}\]: SGD has no float hyperparameter 'momentun'"),
    ([{"2.lr": 0.1}] * N, KeyError, r"hyper\[0\]: hyperparameter '2.lr' names parameter group 2, but the optimizer has 1"),
    ([{"lr": torch.ones(2)}] * N, ValueError, r"hyper\[0\]: hyperparameter 'lr' must be a scalar"),
])
def test_bad_per_step_hyperparameters_are_refused_before_any_step(hyper, error, match):
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    calls = []
    stepper.step = lambda *args: calls.append(args)  # noqa: E731 - any step taken would be recorded
    with pytest.raises(error, match=match):
        stepper.unroll(stepper.init(), batches, hyper=hyper)
    assert calls == []


@pytest.mark.parametrize("checkpoint", [None, "sqrt"], ids=repr)
def test_a_learned_zero_gets_its_gradient_after_steps_that_ran_a_plain_zero(checkpoint, float64):
    """weight_decay 0.0 (plain) at step 0 traces the graph that skips the term; the learned zeros of the later
    steps must take the general branch anyway (found in review: they got no gradient)."""
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    xv = torch.randn(16, 4)

    def meta_loss(wd, checkpoint=None):
        hyper = [{"weight_decay": 0.0}] + [{"weight_decay": wd[i]} for i in range(N - 1)]
        return stepper.forward(stepper.unroll(stepper.init(), batches, hyper=hyper, checkpoint=checkpoint), xv).pow(2).mean()

    wd = torch.zeros(N - 1, requires_grad=True)
    (g,) = torch.autograd.grad(meta_loss(wd, checkpoint), wd)
    h = 1e-5
    one_sided = lambda e: (-3 * meta_loss(0 * e) + 4 * meta_loss(h * e) - meta_loss(2 * h * e)) / (2 * h)  # noqa: E731
    fd = torch.stack([one_sided(torch.eye(N - 1)[i]) for i in range(N - 1)])  # torch.optim refuses negative values
    assert (g.abs() > 1e-6).all()
    torch.testing.assert_close(g, fd.detach(), rtol=1e-5, atol=1e-9)


def test_a_learned_momentum_zero_then_nonzero_is_torch_optims_limit_not_its_value_at_zero(float64):
    """README: a learned momentum at exactly 0 takes the general branch, so its buffer follows the gradient through
    the steps at 0; torch.optim (discontinuous there) starts the buffer at the first nonzero step. unrollc equals
    eager with 1e-200 in place of the zeros, and differs from eager with plain zeros."""
    model, batches = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stepper = unrollc.compile(model, opt, mse)
    momenta = [0.0] * 4 + [0.5] * (N - 4)
    learned = torch.tensor(momenta, requires_grad=True)
    state = stepper.unroll(stepper.init(), batches, hyper=[{"momentum": learned[i]} for i in range(N)])
    limit, _ = eager_with_schedule(model, opt, batches, [{"momentum": m or 1e-200} for m in momenta])
    at_zero, _ = eager_with_schedule(model, opt, batches, [{"momentum": m} for m in momenta])
    for name, p in limit.items():
        torch.testing.assert_close(state.params[name], p, rtol=1e-13, atol=1e-15)
    assert max((state.params[n] - p).abs().max().item() for n, p in at_zero.items()) > 1e-4


def test_a_budget_plans_for_the_state_that_per_step_hyperparameters_create(float64):
    """Momentum switched on by the per-step hyperparameters creates momentum buffers: the budget counts them, as
    it does when the state's own momentum is nonzero (found in review: it planned without them and overran)."""
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 1))
    batches = [(torch.randn(8, 64), torch.randn(8, 1)) for _ in range(20)]
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    with_momentum = stepper.init(hyper={"momentum": 0.9})
    needs = unrollc.CostModel.from_stepper(stepper, stepper.step(with_momentum, batches[0]), batches[0])
    plain = unrollc.CostModel.from_stepper(stepper, stepper.step(stepper.init(), batches[0]), batches[0])
    smallest = [cost.predict(unrollc.Binomial(slots=1), 20).peak_bytes for cost in (plain, needs)]
    assert smallest[0] < smallest[1]
    budget = unrollc.Budget(sum(smallest) // 2)  # fits without the buffers only
    with pytest.raises(ValueError, match="no checkpoint schedule for n=20 steps fits"):
        stepper.unroll(with_momentum, batches, checkpoint=budget)
    with pytest.raises(ValueError, match="no checkpoint schedule for n=20 steps fits"):
        stepper.unroll(stepper.init(), batches, hyper=[{"momentum": 0.9}] * 20, checkpoint=budget)
    stepper.unroll(stepper.init(), batches, hyper=[{"momentum": 0.0}] * 20, checkpoint=budget)  # no buffers: it fits


def test_an_option_switched_on_later_that_needs_state_from_the_first_step_is_explained():
    """RMSprop creates its momentum buffer at the first step only when momentum > 0 then: switching momentum on
    later fails in eager torch.optim too (KeyError); the error says so and gives the fix, which works."""
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.RMSprop(model.parameters(), lr=0.01), mse)
    schedule = [{"momentum": 0.0}] + [{"momentum": 0.9}] * (N - 1)
    with pytest.raises(unrollc.CaptureError, match=r"reads its state entry 'momentum_buffer' \(KeyError\).*eager "
                                                   r"torch.optim raises the same KeyError.*or a learned value"):
        stepper.unroll(stepper.init(), batches, hyper=schedule)
    eager_model = copy.deepcopy(model)
    eager_opt = torch.optim.RMSprop(eager_model.parameters(), lr=0.01)
    with pytest.raises(KeyError, match="momentum_buffer"):  # eager torch.optim, options changed between steps
        for batch, options in zip(batches, schedule):
            eager_opt.param_groups[0].update(options)
            eager_opt.zero_grad()
            mse(eager_model, batch).backward()
            eager_opt.step()
    learned = torch.tensor(0.0, requires_grad=True)
    state = stepper.unroll(stepper.init(), batches, hyper=[{"momentum": learned}] + schedule[1:])
    assert "momentum_buffer" in state.opt_state["0.weight"]


def test_values_the_optimizers_constructor_refuses_are_pointed_out_and_run_as_eager_would(float64):
    """torch.optim checks ranges only in its constructor; its param_groups take anything. unrollc runs the step with
    the value (as eager does after ``group["lr"] = -0.1``) and warns, once per unroll, at the user's line."""
    model, batches = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    stepper = unrollc.compile(model, opt, mse)
    with pytest.warns(UserWarning, match=r"Stepper.init: lr=-0.1 \(Invalid learning rate: -0.1\).*SGD") as rec:
        state = stepper.init(hyper={"lr": -0.1})
    assert rec[0].filename == __file__
    state = stepper.unroll(state, batches[:3])
    params, _ = eager_with_schedule(model, opt, batches[:3], [{"lr": -0.1}] * 3)
    for name, p in params.items():
        torch.testing.assert_close(state.params[name], p, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="Nesterov momentum requires a momentum"):
        stepper.init(hyper={"momentum": 0.0})

    schedule = [{"lr": 0.1}, {"lr": -1.0}, {"lr": 0.05}, {"lr": -2.0}, {"lr": -3.0}]
    with pytest.warns(UserWarning, match=r"hyper\[1\]: lr=-1.0 .*\(and 2 later steps\)") as rec:
        stepper.unroll(stepper.init(), batches[:5], hyper=schedule)
    assert len(rec) == 1 and rec[0].filename == __file__

    adam = unrollc.compile(model, torch.optim.Adam(model.parameters()), mse)
    with pytest.warns(UserWarning, match=r"betas=\(1.0, 0.9\) \(Invalid beta parameter at index 0: 1.0\)"):
        adam.init(hyper={"betas": (1.0, 0.9)})


def test_values_in_range_and_values_the_optimizer_already_held_are_not_pointed_out(float64):
    model, batches = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stepper = unrollc.compile(model, opt, mse)
    opt.param_groups[0]["eps"] = -1.0  # set by the user on the group, as eager allows: not an override
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stepper.init()
        state = stepper.init(hyper={"lr": torch.tensor(0.01, requires_grad=True), "eps": -1.0})
        stepper.unroll(state, batches[:2], hyper=[{"lr": 0.02}, {"betas": (0.5, 0.5)}])
        # a subclass's constructor is never run for the check (it may warn, draw random numbers, count instances)
        built = []

        class Counting(torch.optim.Adam):
            def __init__(self, *args, **kwargs):
                built.append(1)
                super().__init__(*args, **kwargs)

        counting = unrollc.compile(model, Counting(model.parameters()), mse)
        counting.unroll(counting.init(), batches[:2], hyper=[{"lr": 0.5}, {"lr": 0.4}])  # traced (builds its own)
        traced = len(built)
        counting.init(hyper={"lr": -1.0})
        counting.unroll(counting.init(), batches[:2], hyper=[{"lr": 0.5}, {"lr": -0.5}])
        assert len(built) == traced
        # inside a transform the values cannot be read; the check steps aside
        lr = torch.tensor(0.01)
        torch.func.grad(lambda lr: mse(model, batches[3]) * 0 + stepper.forward(
            stepper.unroll(stepper.init(hyper={"lr": -lr}), batches[:2]), batches[3][0]).sum())(lr)
