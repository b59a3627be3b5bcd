"""cse, the t(t(x)) rule of remove_copies, and the choice between the two safe_sqrt implementations."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import unrollc
from unrollc.inspect.lint import check_after
from unrollc.passes.cse import cse
from unrollc.passes.safe_sqrt import CHECKED_MIN_NUMEL, _implementation

aten = torch.ops.aten


def _calls(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _adam_stepper(model: nn.Module, **kwargs) -> unrollc.Stepper:
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01, **kwargs),
                              lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    state = stepper.step(stepper.init(), (torch.randn(8, 3), torch.randn(8, 2)))
    stepper.step(state, (torch.randn(8, 3), torch.randn(8, 2)))
    return stepper


def test_adam_hyperparameter_maths_runs_once_per_step_not_once_per_parameter():
    """torch.optim's per-parameter loop casts betas/lr/eps for every parameter; after cse each cast of a
    hyperparameter exists once, while the per-parameter updates (one addcdiv each) all stay."""
    stepper = _adam_stepper(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    before, after = stepper.graphs["after eliminate_dead_code"], stepper.graph
    casts = [n for n in after.graph.nodes if n.target is aten._to_copy.default and n.args[0].op == "placeholder"
             and n.args[0].name.startswith("h_")]
    assert len({(n.args[0].name, n.kwargs.get("dtype")) for n in casts}) == len(casts)  # no repeated cast
    assert len(casts) < sum(1 for n in before.graph.nodes if n.target is aten._to_copy.default
                            and n.args[0].op == "placeholder" and n.args[0].name.startswith("h_"))
    assert _calls(after)[aten.addcdiv.default] == _calls(before)[aten.addcdiv.default] == 4
    check_after(after, [p.__name__ for p in unrollc.passes.PIPELINE])


def test_check_mode_catches_a_pass_that_brings_back_a_duplicate():
    from unrollc.inspect.lint import PassCheckError

    gm = _adam_stepper(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).graph
    cast = next(n for n in gm.graph.nodes if n.target is aten._to_copy.default)
    with gm.graph.inserting_after(cast):
        twin = gm.graph.node_copy(cast)
    next(iter(cast.users)).replace_input_with(cast, twin)
    with pytest.raises(PassCheckError, match="cse"):
        check_after(gm, [p.__name__ for p in unrollc.passes.PIPELINE])


def test_random_ops_are_never_merged_and_scalars_keep_their_type():
    def f(x):
        a = torch.dropout(x, 0.5, True) + torch.dropout(x, 0.5, True)  # two masks, not one
        b = (x + 1) * (x + 1.0) * (x + 1)                            # x + 1 twice: merged; x + 1.0 is its own
        c = (x * 0.0) + (x * -0.0)                                   # 0.0 and -0.0 differ (sign of the result)
        i = torch.arange(4)
        d = (i + 1).float() + (i + 1.0) + (i + True).float()         # int, float and bool scalars promote differently
        return a, b, c, d

    unsafe = cse(make_fx(f)(torch.randn(4)))  # dropout traced as bernoulli_ into an empty_like: not merged
    assert _calls(unsafe)[aten.bernoulli_.float] == _calls(unsafe)[aten.empty_like.default] == 2
    gm = cse(make_fx(torch.func.functionalize(f, remove="mutations"))(torch.randn(4)))  # as in the pipeline
    counts = _calls(gm)
    assert sum(n for t, n in counts.items() if torch.Tag.nondeterministic_seeded in getattr(t, "tags", ())) == 2
    adds = [n for n in gm.graph.nodes if n.target is aten.add.Tensor and n.args[0].name == "x_1"]
    assert sorted(repr(n.args[1]) for n in adds) == ["1", "1.0"]
    by_scalar = [n.args[1] for n in gm.graph.nodes if n.target is aten.mul.Tensor and isinstance(n.args[1], float)]
    assert sorted(map(repr, by_scalar)) == ["-0.0", "0.0"]
    int_adds = [n for n in gm.graph.nodes if n.target is aten.add.Tensor and n.args[0].name == "arange"]
    assert sorted(repr(n.args[1]) for n in int_adds) == ["1", "1.0", "True"]
    x = torch.randn(4)
    torch.manual_seed(0)
    got = gm(x)
    torch.manual_seed(0)
    eager = f(x)
    for g, e in zip(got, eager, strict=True):
        assert torch.equal(g, e)
    assert torch.equal(got[2], eager[2]) and torch.equal(torch.signbit(got[2]), torch.signbit(eager[2]))


def _step_ids(state) -> set[int]:
    return {id(st["step"]) for st in state.opt_state.values()}


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_step_counters_are_one_tensor_and_bias_corrections_run_once(warm):
    """Adam's per-parameter step counters are one tensor (fresh optimizer: equal constants merged; warm one:
    Stepper.init shares equal counters), so each bias correction is computed once per step, and the trajectory
    is still torch.optim's."""
    from test_optimizers import assert_same_trajectory, mse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    if warm:
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(5)]
    stepper, state = assert_same_trajectory(model, opt, mse, batches, tol=1e-6)
    assert len(_step_ids(state)) == 1
    assert len(_step_ids(stepper.init())) == (1 if warm else 0)
    pows = [n for n in stepper.graph.graph.nodes if n.target is aten.pow.Tensor_Tensor]
    # beta1 ** step, beta2 ** step and bias_correction2 ** 0.5 (C's pow: the python_pow pass), not once per parameter
    assert len(pows) == 3
    assert stepper.graph.meta["unrollc"]["aliased_inputs"] == {
        f"{n}.step": "0.weight.step" for n in ("0.bias", "2.weight", "2.bias")}


@pytest.mark.parametrize("checkpoint", [None, 2, "sqrt", "binomial"])
def test_an_unrolls_final_state_keeps_one_counter_tensor(checkpoint):
    """The state an unroll returns shares one step counter, whatever the schedule: a checkpointed unroll's
    executor hands its outputs back as separate tensors, and continuing from them would trace (and then run)
    the graph for separate counters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01),
                              lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(5)]
    lr = torch.tensor(0.01, requires_grad=True)
    state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, checkpoint=checkpoint)
    assert len(_step_ids(state)) == 1
    traced = stepper.trace_count
    after = stepper.unroll(state, batches, checkpoint=checkpoint)
    assert stepper.trace_count == traced  # the shared-counter graph of the first unroll's later steps
    assert len(_step_ids(after)) == 1 and float(next(iter(after.opt_state.values()))["step"].detach()) == 10
    (g,) = torch.autograd.grad(stepper.forward(after, batches[0][0]).square().sum(), lr)
    plain = stepper.unroll(stepper.unroll(stepper.init(hyper={"lr": lr}), batches), batches)
    (expected,) = torch.autograd.grad(stepper.forward(plain, batches[0][0]).square().sum(), lr)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)


def test_counters_that_differ_get_their_own_graph_and_torch_optims_result(float64):
    """A state whose counters are separate tensors with different values (set by hand) must not run the graph
    traced for one shared counter: it is keyed apart, and each parameter gets the bias correction of its own
    step, as torch.optim computes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    stepper = unrollc.compile(model, opt, loss_fn)
    batch = (torch.randn(8, 3), torch.randn(8, 2))
    shared = stepper.step(stepper.init(), batch)  # traces the shared-counter graph
    assert len(_step_ids(shared)) == 1
    steps = {"0.weight": 1.0, "0.bias": 7.0, "2.weight": 3.0, "2.bias": 1.0}
    state = stepper.init()
    state = state.replace(opt_state={n: {**st, "step": torch.tensor(steps[n])} for n, st in state.opt_state.items()})
    got = stepper.step(state, batch)
    for p, (n, step) in zip(model.parameters(), steps.items(), strict=True):
        opt.state[p]["step"] = torch.tensor(step)
    loss_fn(model, batch).backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got.params[n], p.detach(), rtol=1e-12, atol=1e-14)
        assert float(got.opt_state[n]["step"]) == steps[n] + 1


def test_nested_transposes_are_removed_from_a_linear_models_step():
    """Linear's weight gradient comes out of the trace as t(t(mm)); remove_copies reads mm directly."""
    stepper = _adam_stepper(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    for name in ("after remove_copies", "after safe_sqrt"):
        gm = stepper.graphs[name]
        nested = [n for n in gm.graph.nodes if n.target is aten.t.default and n.args[0].target is aten.t.default]
        assert not nested, name
    captured = stepper.graphs["after strip_profiler"]
    assert any(n.target is aten.t.default and n.args[0].target is aten.t.default for n in captured.graph.nodes)


def test_the_trajectory_is_bit_identical_with_and_without_the_new_rewrites(monkeypatch, float64):
    """cse and t(t(x)) -> x change the number of ops, never a value: the trajectory with the full pipeline equals,
    bit for bit, the one with both rewrites disabled (every other pass as usual). The meta-gradient w.r.t. lr sums
    one contribution per parameter; with one shared cast of lr autograd adds them in another order, so it is equal
    up to rounding."""
    import sys

    import unrollc.passes as P

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(6)]

    def trajectory() -> list[torch.Tensor]:
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
        stepper = unrollc.compile(model, opt, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
        lr = torch.tensor(0.01, requires_grad=True)  # float64 (the fixture)
        torch.manual_seed(1)
        state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches)
        meta = sum(p.square().sum() for p in state.params.values())
        return [*state.params.values()], list(torch.autograd.grad(meta, [lr, *model.parameters()]))

    full = trajectory()
    rc = sys.modules["unrollc.passes.remove_copies"]  # the module (the package exports the function by that name)
    plain_source = rc._source
    monkeypatch.setattr(rc, "_source", lambda n: None if n.target is aten.t.default else plain_source(n))
    monkeypatch.setattr(P, "PIPELINE", tuple(p for p in P.PIPELINE if p.__name__ != "cse"))
    reference = trajectory()
    for a, b in zip(full[0], reference[0], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full[1], reference[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("op", [torch.ops.unrollc.safe_sqrt.default, torch.ops.unrollc.safe_sqrt_masked.default],
                         ids=["checked", "masked"])
def test_both_safe_sqrts_have_sqrts_values_and_zero_derivatives_at_zero(op):
    x = (torch.rand(6, 5, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(op, (x,)) and torch.autograd.gradgradcheck(op, (x,))
    y = torch.rand(64, 64) + 1e-3
    y[0, :3] = 0.0
    y[1, 0] = float("inf")
    y.requires_grad_()
    g_out = torch.randn(64, 64)
    assert torch.equal(op(y), torch.sqrt(y))
    (ours,) = torch.autograd.grad(op(y), y, g_out, create_graph=True)
    (ref,) = torch.autograd.grad(torch.sqrt(y), y, g_out)
    positive = y.detach() > 0
    assert torch.equal(ours[positive], ref[positive]) and (ours[~positive] == 0).all()
    (second,) = torch.autograd.grad(ours.sum(), y)
    assert torch.isfinite(second[y.detach().isfinite()]).all() and (second[~positive] == 0).all()
    assert torch.isnan(op(torch.tensor([-1.0, float("nan")]))).all()  # like torch.sqrt


def test_safe_sqrt_picks_the_checked_op_only_for_large_cpu_tensors():
    assert _implementation(torch.empty(CHECKED_MIN_NUMEL)) is torch.ops.unrollc.safe_sqrt.default
    assert _implementation(torch.empty(CHECKED_MIN_NUMEL - 1)) is torch.ops.unrollc.safe_sqrt_masked.default
    # another device (a GPU): the checked op's zero test would read a value back and synchronise
    assert _implementation(torch.empty(CHECKED_MIN_NUMEL, device="meta")) is torch.ops.unrollc.safe_sqrt_masked.default
    big = _adam_stepper(nn.Sequential(nn.Linear(3, 200), nn.Tanh(), nn.Linear(200, 2)))
    picked = {n.meta["val"].numel(): n.target for n in big.graph.graph.nodes
              if n.target in (torch.ops.unrollc.safe_sqrt.default, torch.ops.unrollc.safe_sqrt_masked.default)}
    assert picked == {200 * 3: torch.ops.unrollc.safe_sqrt_masked.default, 200: torch.ops.unrollc.safe_sqrt_masked.default,
                      2 * 200: torch.ops.unrollc.safe_sqrt_masked.default, 2: torch.ops.unrollc.safe_sqrt_masked.default}
    wide = _adam_stepper(nn.Sequential(nn.Linear(3, 6000), nn.Tanh(), nn.Linear(6000, 2)))
    targets = {n.meta["val"].numel(): n.target for n in wide.graph.graph.nodes
               if n.target in (torch.ops.unrollc.safe_sqrt.default, torch.ops.unrollc.safe_sqrt_masked.default)}
    assert targets[6000 * 3] is torch.ops.unrollc.safe_sqrt.default
    assert targets[6000] is torch.ops.unrollc.safe_sqrt_masked.default
