"""unrollc/higher/optim.py: differentiable optimizers are exactly torch.optim, and higher's API holds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unrollc
import unrollc.higher as uh
import oracles
from unrollc.optimizer_spec import UnsupportedOptimizerError

O = torch.optim
OPTIMIZERS = [
    (O.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (O.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)),
    (O.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (O.AdamW, dict(lr=0.01)),
    (O.Adadelta, dict(lr=0.5)),
    (O.Adagrad, dict(lr=0.1, lr_decay=0.01)),
    (O.Adamax, dict(lr=0.01)),
    (O.ASGD, dict(lr=0.01, t0=3)),
    (O.NAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1)),
    (O.RAdam, dict(lr=0.01)),
    (O.RMSprop, dict(lr=0.01, centered=True, momentum=0.9)),
    (O.Rprop, dict(lr=0.01)),
    (O.Adafactor, dict(lr=0.01)),  # reads param.norm().item(): traced from its rewritten source
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in OPTIMIZERS]


def data():
    return torch.randn(8, 4), torch.randn(8, 2)


def loss_of(out, y):
    return F.mse_loss(out, y)


@pytest.mark.parametrize("lr_scale", [1, 3])
@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_trajectory_equals_torch_optim(cls, kwargs, lr_scale):
    """Also with 3x the lr, after the 1x run in the same process: compiled updates are cached across
    contexts, so a hyperparameter frozen into a graph (Rprop's full_like(grad, lr)) would show here."""
    kwargs = {**kwargs, "lr": kwargs["lr"] * lr_scale}
    model = nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    opt, twin_opt = cls(model.parameters(), **kwargs), cls(twin.parameters(), **kwargs)
    x, y = data()
    with uh.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for step in range(7):  # RAdam switches its rectification on after 5 steps: a guard, a re-trace
            diffopt.step(loss_of(fmodel(x), y))
            twin_opt.zero_grad()
            loss_of(twin(x), y).backward()
            twin_opt.step()
            for fast, ref in zip(fmodel.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        for i, p in enumerate(twin_opt.param_groups[0]["params"]):
            for k, v in twin_opt.state[p].items():
                torch.testing.assert_close(diffopt.state[0][i][k].float(), torch.as_tensor(v).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("cls", "kwargs"), [(O.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)), (O.SGD, dict(lr=0.2, momentum=0.5, dampening=0.3)), (O.Adagrad, dict(lr=0.1)), (O.RMSprop, dict(lr=0.01, momentum=0.5))])
@pytest.mark.filterwarnings("ignore:Differentiable RMSprop suffers:UserWarning")  # higher 0.2.1's own warning
def test_meta_gradient_agrees_with_higher(cls, kwargs):
    higher = pytest.importorskip("higher")
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = data()
    grads = []
    for lib in (uh, higher):
        model.zero_grad()
        with lib.innerloop_ctx(model, cls(model.parameters(), **kwargs), copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(loss_of(fmodel(x), y))
            loss_of(fmodel(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adam_is_torch_adam_where_higher_differs():
    higher = pytest.importorskip("higher")
    model = nn.Linear(4, 2)
    x, y = data()
    ends = {}
    for name, lib in (("unrollc", uh), ("higher", higher)):
        with lib.innerloop_ctx(model, O.Adam(model.parameters(), lr=0.1, eps=0.5)) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(loss_of(fmodel(x), y))
            ends[name] = fmodel.fast_params[0].detach()
    twin = copy.deepcopy(model)
    opt = O.Adam(twin.parameters(), lr=0.1, eps=0.5)
    for _ in range(3):
        opt.zero_grad()
        loss_of(twin(x), y).backward()
        opt.step()
    torch.testing.assert_close(ends["unrollc"], twin.weight.detach(), rtol=1e-5, atol=1e-6)
    assert (ends["higher"] - twin.weight).abs().max() > 1e-3  # higher adds eps before the bias correction


def test_maximize_is_honoured_where_higher_ignores_it():
    higher = pytest.importorskip("higher")
    model = nn.Linear(4, 2)
    x, y = data()
    moved = {}
    for name, lib in (("unrollc", uh), ("higher", higher)):
        with lib.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1, maximize=True)) as (fmodel, diffopt):
            before = loss_of(fmodel(x), y)
            diffopt.step(before)
            moved[name] = (loss_of(fmodel(x), y) - before).item()
    assert moved["unrollc"] > 0 > moved["higher"]


def test_override_learning_rate_receives_exact_gradient(float64):
    model = nn.Linear(3, 1)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    opt = O.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def meta_loss(lr):
        with uh.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(loss_of(fmodel(x), y))
            return loss_of(fmodel(x), y)

    lr = torch.tensor(0.1, requires_grad=True)
    (grad,) = torch.autograd.grad(meta_loss(lr), lr)
    eps = 1e-6
    numeric = (meta_loss(torch.tensor(0.1 + eps)) - meta_loss(torch.tensor(0.1 - eps))) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def test_asgd_learned_learning_rate_gets_the_finite_difference_gradient_where_highers_is_cut(float64):
    """ASGD's step size eta = lr / (1 + lambd * lr * t) ** alpha: higher 0.2.1 computes it with math.pow on floats,
    so its lr meta-gradient misses that path; unrollc traces torch.optim.ASGD and keeps it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    (x, y), (xv, yv) = data(), data()
    opt = O.ASGD(model.parameters(), lr=0.05, lambd=1e-2, t0=3, weight_decay=0.01)

    def meta_loss(lib, lr):
        with lib.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(6):
                diffopt.step(loss_of(fmodel(x), y))
            return loss_of(fmodel(xv), yv)

    lr = torch.tensor(0.05, requires_grad=True)
    (grad,) = torch.autograd.grad(meta_loss(uh, lr), lr)
    numeric = oracles.central_difference(lambda v: meta_loss(uh, v), lr)
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-10)
    higher = pytest.importorskip("higher")
    (grad_h,) = torch.autograd.grad(meta_loss(higher, lr), lr)
    assert abs(grad_h - numeric) > 1e-4 * abs(numeric)  # README: "Where higher is wrong"


def test_per_group_override_and_step_override(lib):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = O.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}], lr=0.1)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    lrs = [torch.tensor(0.1, requires_grad=True), torch.tensor(0.2, requires_grad=True)]
    with lib.innerloop_ctx(model, opt, override={"lr": lrs}) as (fmodel, diffopt):
        diffopt.step(loss_of(fmodel(x), y))
        diffopt.step(loss_of(fmodel(x), y), override={"lr": [torch.tensor(0.05)]})
        assert diffopt.param_groups[1]["lr"].item() == pytest.approx(0.05)
        loss = loss_of(fmodel(x), y)
    g0, g1 = torch.autograd.grad(loss, lrs)
    assert g0.abs() > 0 and g1.abs() > 0


def test_trainable_opt_params_round_trip(lib):
    model = nn.Linear(3, 1)
    opt = O.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    override = lib.optim.get_trainable_opt_params(opt)
    assert sorted(override) == sorted(uh.optim.get_trainable_opt_params(opt))
    assert all(t.requires_grad for t in override["lr"])
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    with lib.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for _ in range(2):  # the first momentum buffer is the gradient: momentum acts from step 2
            diffopt.step(loss_of(fmodel(x), y))
        loss_of(fmodel(x), y).backward()
    assert override["lr"][0].grad is not None and override["momentum"][0].grad is not None
    with torch.no_grad():
        override["lr"][0].sub_(0.05)
    lib.optim.apply_trainable_opt_params(opt, override)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and isinstance(opt.param_groups[0]["lr"], float)


def test_override_with_a_wrong_number_of_values_is_refused(lib):
    model = nn.Linear(3, 1)
    opt = O.SGD(model.parameters(), lr=0.1)
    two = [torch.tensor(0.1), torch.tensor(0.2)]  # one group, two values
    with pytest.raises(ValueError, match="Mismatch between the number of override tensors for optimizer parameter lr"):
        with lib.innerloop_ctx(model, opt, override={"lr": two}):
            pass
    with pytest.raises(ValueError, match="Mismatch"):
        lib.optim.apply_trainable_opt_params(opt, {"lr": two})


def test_create_diff_optim_and_explicit_params(lib):
    torch.manual_seed(0)
    w = torch.randn(3, 1, requires_grad=True)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    diffopt = lib.optim.create_diff_optim(O.SGD, {"lr": 0.1, "momentum": 0.9}, params=[w])
    params = [w]
    for _ in range(3):
        params = diffopt.step(loss_of(x @ params[0], y), params=params)
    (g,) = torch.autograd.grad(loss_of(x @ params[0], y), w)
    wr, buf = w, None  # eager reference with create_graph
    for _ in range(3):
        (gr,) = torch.autograd.grad(loss_of(x @ wr, y), wr, create_graph=True)
        buf = gr if buf is None else 0.9 * buf + gr
        wr = wr - 0.1 * buf
    (ref,) = torch.autograd.grad(loss_of(x @ wr, y), w)
    torch.testing.assert_close(g, ref)


def test_step_without_params_or_fmodel_is_refused(lib):
    w = torch.randn(3, requires_grad=True)
    diffopt = lib.optim.get_diff_optim(O.SGD([w], lr=0.1), [w])
    with pytest.raises(ValueError, match="params kwarg must be passed"):
        diffopt.step(w.sum())


def test_grad_callback(lib):
    model = nn.Linear(3, 1)
    x, y = torch.randn(6, 3), 10 * torch.randn(6, 1)
    clip = lambda grads: [g.clamp(-0.01, 0.01) for g in grads]  # noqa: E731
    with lib.innerloop_ctx(model, O.SGD(model.parameters(), lr=1.0)) as (fmodel, diffopt):
        start = [p.detach().clone() for p in fmodel.parameters()]
        diffopt.step(loss_of(fmodel(x), y), grad_callback=clip)
        for p, s in zip(fmodel.parameters(), start, strict=True):
            assert (p - s).abs().max() <= 0.01 + 1e-7


def test_grad_callback_gets_a_tuple(lib):
    model = nn.Linear(3, 1)
    seen = []
    with lib.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(loss_of(fmodel(torch.randn(6, 3)), torch.randn(6, 1)), grad_callback=lambda g: seen.append(g) or g)
    assert type(seen[0]) is tuple and len(seen[0]) == 2  # what torch.autograd.grad returns, as in higher


def test_register_optim_uses_a_hand_written_update(lib):
    class Doubling(O.SGD):
        pass

    class DiffDoubling(lib.optim.DifferentiableOptimizer):
        def _update(self, grouped_grads, **kwargs):
            for group, grads in zip(self.param_groups, grouped_grads):
                group["params"] = [p - 2 * group["lr"] * g for p, g in zip(group["params"], grads)]

    lib.optim.register_optim(Doubling, DiffDoubling)
    w = torch.ones(2, requires_grad=True)
    diffopt = lib.optim.get_diff_optim(Doubling([w], lr=0.25), [w])
    (new,) = diffopt.step((w * w).sum(), params=[w])
    torch.testing.assert_close(new, torch.zeros(2))


def test_utils(lib):
    model = nn.Linear(3, 2)
    assert lib.utils.flatten({"a": [1, (2, 3)], "b": 4}) == [1, 2, 3, 4]
    copies = lib.utils.get_func_params(model)
    assert all(c.requires_grad and c.is_leaf and c is not p and torch.equal(c, p) for c, p in zip(copies, model.parameters()))


def test_unsupported_optimizer_error_says_why_when_the_optimizer_is_made():
    """As in higher, at construction and as a ValueError (higher's type; also a TypeError, unrollc's)."""
    model = nn.Linear(3, 1)
    with pytest.raises(UnsupportedOptimizerError, match="unrollc.higher: torch.optim.LBFGS.*closure"):
        uh.innerloop_ctx(model, O.LBFGS(model.parameters())).__enter__()
    with pytest.raises(ValueError, match="LBFGS"):
        uh.get_diff_optim(O.LBFGS(model.parameters()), model.parameters())


def test_misuse_is_refused_with_what_was_expected():
    model = nn.Linear(3, 1)
    opt = O.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"innerloop_ctx: expected a torch.nn.Module as `model`, got str"):
        uh.innerloop_ctx("model", opt).__enter__()
    with pytest.raises(TypeError, match=r"monkeypatch: expected a torch.nn.Module, got str"):
        uh.monkeypatch("model")
    with pytest.warns(UserWarning, match=r"override \['learning_rate'\]: SGD has no such option, so it changes "
                      r"nothing; its options are \[.*'lr'") as record:
        uh.innerloop_ctx(model, opt, override={"learning_rate": [0.1]}).__enter__()
    assert {w.filename for w in record} == {__file__}
    with pytest.raises(TypeError, match=r"override\['lr'\] must be a list.*got float; write \{'lr': \[value\]\}"):
        uh.innerloop_ctx(model, opt, override={"lr": 0.1}).__enter__()
    with pytest.raises(ValueError, match=r"Could not find parameter 0 of group 0 \(shape \(1, 3\)\)"):
        uh.get_diff_optim(opt, nn.Linear(3, 1).parameters())
    with uh.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(TypeError, match=r"DifferentiableOptimizer.step: expected the loss.*got float"):
            diffopt.step(1.0)
        diffopt.step(fmodel(torch.randn(2, 3)).sum())
        with pytest.raises(IndexError, match=r"no fast weights at time=5: the history holds times 0 to 1"):
            fmodel.parameters(time=5)
        assert [p is q for p, q in zip(fmodel.parameters(time=-2), fmodel.parameters(time=0))] == [True, True]


def test_adam_meta_gradient_is_finite_where_a_gradient_is_always_zero():
    higher = pytest.importorskip("higher")
    model = nn.Linear(3, 3)
    x = torch.randn(5, 3)
    x[:, 0] = 0  # weight[:, 0] never gets a gradient: Adam's sqrt(exp_avg_sq) is sqrt(0)
    grads = []
    for lib in (uh, higher):
        model.zero_grad()
        with lib.innerloop_ctx(model, O.Adam(model.parameters(), lr=0.1, eps=1e-8), copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(fmodel(x).pow(2).mean())
            fmodel(torch.ones(5, 3)).pow(2).mean().backward()
        grads.append(model.weight.grad.clone())
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)


def test_meta_sgd_per_element_learning_rates(lib):
    """Meta-SGD (Li et al. 2017): SGD with one learned lr per weight element, one group per parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = data()
    xq, yq = data()
    lrs = [torch.full_like(p, 0.1).add_(0.01 * torch.rand_like(p)).requires_grad_() for p in model.parameters()]
    opt = O.SGD([{"params": [p]} for p in model.parameters()], lr=0.1)
    with lib.innerloop_ctx(model, opt, override={"lr": lrs}) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(loss_of(fmodel(x), y))
        query = loss_of(fmodel(xq), yq)
    grads = torch.autograd.grad(query, lrs)

    fast = list(model.parameters())  # the same unroll written out
    names = [n for n, _ in model.named_parameters()]
    run = lambda w, inp: torch.func.functional_call(model, dict(zip(names, w)), (inp,))  # noqa: E731
    for _ in range(3):
        g = torch.autograd.grad(loss_of(run(fast, x), y), fast, create_graph=True)
        fast = [w - lr * gw for w, lr, gw in zip(fast, lrs, g, strict=True)]
    ref = torch.autograd.grad(loss_of(run(fast, xq), yq), lrs)
    torch.testing.assert_close(query, loss_of(run(fast, xq), yq))
    for a, b in zip(grads, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_per_element_lr_is_refused_for_other_optimizers():
    model = nn.Linear(4, 2)
    opt = O.Adam([{"params": [p]} for p in model.parameters()], lr=0.1)
    x, y = data()
    with uh.innerloop_ctx(model, opt, override={"lr": [torch.full_like(p, 0.1) for p in model.parameters()]}) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="per element .* torch.optim.SGD \\(Meta-SGD\\); Adam takes one learning rate per parameter"):
            diffopt.step(loss_of(fmodel(x), y))


def test_highers_private_helpers_for_copied_optimizers(lib):
    """Custom DifferentiableOptimizers copied from higher's source import its arithmetic helpers."""
    t, a, b = torch.randn(3), torch.randn(3), torch.rand(3) + 1
    assert torch.equal(lib.optim._add(t, 0.5, a), t + 0.5 * a) and torch.equal(lib.optim._add(t, a), t + a)
    assert torch.equal(lib.optim._addcdiv(t, 0.5, a, b), t + 0.5 * (a / b))
    assert torch.equal(lib.optim._addcmul(t, 0.5, a, b), t + 0.5 * a * b)
    w = torch.randn(3, requires_grad=True)
    y = w * 1.0
    lib.optim._maybe_mask(y, torch.tensor([True, False, True]))
    y.sum().backward()
    assert w.grad.tolist() == [0.0, 1.0, 0.0]
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight
    assert lib.utils._get_param_mapping(model, [], []) == [0, 1, 0, 2]


def test_create_diff_optim_takes_parameter_groups():
    """Documented ("weights or parameter groups"); higher 0.2.1 itself raises TypeError on groups."""
    import unrollc.higher as uh

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": list(model[2].parameters()), "lr": 0.2, "momentum": 0.3}]

    def meta_grads(make):
        fmodel = uh.monkeypatch(model, copy_initial_weights=False)
        lrs = [torch.tensor(0.1, requires_grad=True), torch.tensor(0.3, requires_grad=True)]
        diffopt = make(fmodel, lrs)
        for _ in range(3):
            diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        meta = torch.nn.functional.mse_loss(fmodel(x), y)
        return torch.autograd.grad(meta, [*lrs, *model.parameters()])

    created = meta_grads(lambda fm, lrs: uh.optim.create_diff_optim(
        torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, params=groups, fmodel=fm, override={"lr": lrs}))
    real = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                            {"params": model[2].parameters(), "lr": 0.2, "momentum": 0.3}], lr=0.1, momentum=0.9)
    wrapped = meta_grads(lambda fm, lrs: uh.get_diff_optim(real, model.parameters(), fmodel=fm, override={"lr": lrs}))
    for a, b in zip(created, wrapped, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def _sgd_meta(model, x, y, toggle=False):
    with uh.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fm, do):
        do.step(F.mse_loss(fm(x), y))
        first = [p.detach() for p in fm.fast_params]
        if toggle:
            fm.track_higher_grads = False
        do.step(F.mse_loss(fm(x), y))
        second = [p.detach() for p in fm.fast_params]
        if toggle:
            fm.track_higher_grads = True
        do.step(F.mse_loss(fm(x), y))
        meta = F.mse_loss(fm(x), y)
        return first, second, torch.autograd.grad(meta, list(model.parameters()))


def test_toggling_track_higher_grads_mid_loop_keeps_every_step():
    """higher 0.2.1's setter overwrites its weight history, losing a step; unrollc keeps it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    first, second, toggled = _sgd_meta(model, x, y, toggle=True)
    _, _, plain = _sgd_meta(model, x, y)
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    for a, b in zip(toggled, plain, strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["hook", "parametrization", "hook dim=None"])
def test_weight_norm_meta_gradient_equals_finite_differences(kind):
    """torch.nn.utils.weight_norm (a forward pre-hook) and its parametrization: the lr meta-gradient equals
    central differences. With dim=0 ATen's fused kernel has a wrong double backward on CPU (an eager
    create_graph unroll is ~4e-6 off here; higher's own weight-norm gradients differ further); the functional
    module runs torch's composite formula instead."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)

    def meta(lr):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        if kind == "parametrization":
            nn.utils.parametrizations.weight_norm(model[0])
        else:
            nn.utils.weight_norm(model[0], dim=None if kind == "hook dim=None" else 0)
        with uh.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), override={"lr": [lr]}) as (fm, do):
            for _ in range(3):
                do.step(F.mse_loss(fm(x), y))
            return F.mse_loss(fm(x), y)

    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(meta(lr), lr)
    h = 1e-6
    fd = (meta(torch.tensor(0.1 + h, dtype=torch.float64)).item() - meta(torch.tensor(0.1 - h, dtype=torch.float64)).item()) / (2 * h)
    assert abs(got.item() - fd) < 1e-8 * abs(fd)


def test_an_optimizer_with_a_dict_valued_option():
    """A custom optimizer whose group holds a dict (a config): the compiled update's cache key takes it."""
    class CfgSGD(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1, cfg=None):
            super().__init__(params, dict(lr=lr, cfg=cfg or {"sign": False}))

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.sub_(g["lr"] * (p.grad.sign() if g["cfg"]["sign"] else p.grad))

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for sign in (False, True):
        opt = CfgSGD(model.parameters(), cfg={"sign": sign})
        with uh.innerloop_ctx(model, opt) as (fm, do):
            do.step(F.mse_loss(fm(x), y))
            got = fm.fast_params[0]
        g = torch.autograd.grad(F.mse_loss(model(x), y), model.weight)[0]
        torch.testing.assert_close(got, model.weight - 0.1 * (g.sign() if sign else g))


class _ScaledSGD(uh.optim.DifferentiableOptimizer):
    """A hand-written differentiable optimizer that reads an option of its own (higher's extension point)."""

    def _update(self, grouped_grads, **kwargs):
        for group, grads in zip(self.param_groups, grouped_grads):
            for i, (p, g) in enumerate(zip(group["params"], grads)):
                group["params"][i] = p - group["lr"] * group["scale"] * g


class _ScaledSGDOptimizer(O.SGD):
    pass


def test_a_registered_differentiable_optimizer_takes_options_of_its_own_and_any_optimizer(monkeypatch):
    """As in higher: an override key torch.optim does not know is passed to a subclass's own _update, and a
    class registered for LBFGS is used (not refused: nothing is compiled)."""
    higher = pytest.importorskip("higher")
    results = []
    for lib in (higher, uh):
        monkeypatch.setattr(lib.optim, "_opt_mapping", dict(lib.optim._opt_mapping))  # registrations end with the test
        lib.register_optim(_ScaledSGDOptimizer, _ScaledSGD)
        lib.register_optim(O.LBFGS, _ScaledSGD)
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        scale = torch.tensor(0.5, requires_grad=True)
        with lib.innerloop_ctx(model, _ScaledSGDOptimizer(model.parameters(), lr=0.1), override={"scale": [scale]}) as (f, d):
            d.step(f(torch.ones(2, 3)).pow(2).sum())
            (g,) = torch.autograd.grad(f(torch.ones(2, 3)).sum(), scale)
        with lib.innerloop_ctx(model, O.LBFGS(model.parameters(), lr=0.1), override={"scale": [1.0]}) as (f, d):
            d.step(f(torch.ones(2, 3)).pow(2).sum())
            results.append((g, f(torch.ones(2, 3)).detach()))
    (g_ref, out_ref), (g, out) = results
    assert torch.allclose(g, g_ref) and torch.allclose(out, out_ref)


class _AdamVariant(O.Adam):
    """A third-party optimizer higher lacks, which its users differentiate as plain SGD (higher's recipe)."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group.update(momentum=0.5, dampening=0.0, nesterov=False)  # the options DifferentiableSGD reads


def test_registering_an_optimizer_with_a_builtin_class_differentiates_it_with_that_update(lib, monkeypatch):
    """register_optim(MyOpt, DifferentiableSGD) runs SGD's update with MyOpt's options, as in higher (unrollc
    used to run MyOpt's own step, Adam's, silently)."""
    monkeypatch.setattr(lib.optim, "_opt_mapping", dict(lib.optim._opt_mapping))  # registrations end with the test
    lib.register_optim(_AdamVariant, lib.optim.DifferentiableSGD)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = data()
    with lib.innerloop_ctx(model, _AdamVariant(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        assert isinstance(diffopt, lib.optim.DifferentiableSGD)
        for _ in range(2):
            diffopt.step(loss_of(fmodel(x), y))
        got = [p.detach() for p in fmodel.parameters()]
    from tests.oracles import eager_trajectory

    ref = eager_trajectory(model, O.SGD(model.parameters(), lr=0.1, momentum=0.5), lambda m, b: loss_of(m(b[0]), b[1]), [(x, y)] * 2)
    for a, b in zip(got, ref[-1][0].values(), strict=True):
        torch.testing.assert_close(a, b)


class _PlainSGD(O.Optimizer):
    """A hand-written optimizer whose constructor requires lr (no default), as many do."""

    def __init__(self, params, lr, scale=1.0):
        super().__init__(params, dict(lr=lr, scale=scale))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["scale"])


def test_a_custom_optimizer_whose_constructor_requires_an_option_is_compiled():
    """unrollc builds a fresh optimizer of the user's class for the traced step; a required lr is passed from
    the parameter groups (it raised 'missing 1 required positional argument: lr')."""
    from tests.oracles import eager_trajectory

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    batches = [data() for _ in range(3)]
    opt = _PlainSGD(model.parameters(), lr=0.1, scale=2.0)
    ref = eager_trajectory(model, opt, lambda m, b: loss_of(m(b[0]), b[1]), batches)
    stepper = unrollc.compile(model, opt, lambda m, b: loss_of(m(b[0]), b[1]))
    state = stepper.unroll(stepper.init(), batches)
    for n, p in ref[-1][0].items():
        torch.testing.assert_close(state.params[n], p)
    with uh.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_of(fmodel(x), y))
        for a, (n, p) in zip(fmodel.parameters(), ref[-1][0].items(), strict=True):
            torch.testing.assert_close(a.detach(), p)


def test_a_constructor_option_the_groups_lack_is_named():
    class NeedsSchedule(O.Optimizer):
        def __init__(self, params, lr, schedule):
            super().__init__(params, dict(lr=lr))
            self.schedule = schedule

        def step(self, closure=None):
            pass

    model = nn.Linear(4, 2)
    stepper = unrollc.compile(model, NeedsSchedule(model.parameters(), 0.1, [1, 2]), lambda m, b: loss_of(m(b[0]), b[1]))
    with pytest.raises(TypeError, match=r"NeedsSchedule.__init__ requires \['schedule'\], which its parameter groups do not hold"):
        stepper.step(stepper.init(), data())


def test_meta_sgd_with_one_learning_rate_per_row_broadcasts_as_in_higher(float64):
    """lr of shape (out, 1) for a Linear weight and (out,) for its bias: higher's arithmetic broadcasts it;
    unrollc expands it (its meta-gradient is summed over the row), and the meta-gradient equals finite
    differences (it raised a shape error that pointed at differentiable=True)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    opt = O.SGD([{"params": [p]} for p in model.parameters()], lr=0.1)

    def meta(lrs):
        with uh.innerloop_ctx(model, opt, override={"lr": lrs}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(x), y))
            return F.mse_loss(fmodel(x), y)

    rows = [torch.full((p.shape[0], 1) if p.dim() == 2 else p.shape, 0.1) for p in model.parameters()]
    lrs = [r.clone().requires_grad_() for r in rows]
    grads = torch.autograd.grad(meta(lrs), lrs)
    eps = 1e-6
    for k in range(len(rows)):
        bump = [r.clone() for r in rows]
        bump[k][0] += eps
        down = [r.clone() for r in rows]
        down[k][0] -= eps
        fd = (meta(bump) - meta(down)) / (2 * eps)
        torch.testing.assert_close(grads[k].reshape(-1)[0], fd.detach(), rtol=1e-6, atol=1e-9)
    higher = pytest.importorskip("higher")
    lrs_h = [r.clone().requires_grad_() for r in rows]
    with higher.innerloop_ctx(model, opt, override={"lr": lrs_h}) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
        grads_h = torch.autograd.grad(F.mse_loss(fmodel(x), y), lrs_h)
    for a, b in zip(grads, grads_h, strict=True):
        torch.testing.assert_close(a, b)


def test_step_misuse_is_named():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = data()
    with uh.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"expected 2 weights in `params` .* got 1"):
            diffopt.step(loss_of(fmodel(x), y), params=fmodel.fast_params[:1])
        with pytest.raises(ValueError, match=r"grad_callback returned 1 gradients for 2 weights"):
            diffopt.step(loss_of(fmodel(x), y), grad_callback=lambda grads: grads[:1])
        # RuntimeErrors too, as higher raises them (from its torch.autograd.grad call)
        for error in (ValueError, RuntimeError):
            with pytest.raises(error, match=r"the loss does not require grad"):
                diffopt.step(loss_of(fmodel(x), y).detach())
            with pytest.raises(error, match=r"expected a scalar loss, got a tensor of shape \(8, 2\).*loss.mean\(\)"):
                diffopt.step((fmodel(x) - y) ** 2)
        with pytest.raises(TypeError, match=r"grad_callback returned None.*`return grads`"):
            diffopt.step(loss_of(fmodel(x), y), grad_callback=lambda grads: None)
        with pytest.raises(TypeError, match=r"expected `params` to hold tensors.* got int at position 1"):
            diffopt.step(loss_of(fmodel(x), y), params=[fmodel.fast_params[0], 2])
        with pytest.warns(UserWarning, match=r"depends on none of the weights .*\(model\(x\) instead of fmodel\(x\)\)"):
            diffopt.step(loss_of(model(x), y))


def test_a_frozen_parameter_stays_frozen_in_test_mode():
    """track_higher_grads=False: higher 0.2.1 makes a requires_grad=False parameter trainable after the first
    step, and it moves; it stays put here, as it does with track_higher_grads=True."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    for track in (True, False):
        with uh.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), track_higher_grads=track) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(loss_of(fmodel(x), y))
            assert torch.equal(fmodel.fast_params[0], model[0].weight) and not fmodel.fast_params[0].requires_grad
            assert not torch.equal(fmodel.fast_params[1], model[0].bias)


class _DecayInGrad(torch.optim.Optimizer):
    """Adds weight decay into p.grad in place, then steps (as some hand-written optimizers do)."""

    def __init__(self, params, lr=0.1, weight_decay=0.5, scale=1.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.scale = scale  # an option kept outside the groups

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.add_(p, alpha=group["weight_decay"])
                p.add_(p.grad, alpha=-group["lr"] * self.scale)


def test_a_custom_optimizer_changing_the_gradient_in_place_and_keeping_an_attribute_is_eagers(float64):
    """Tracing ran the step on the user's gradients themselves: the in-place decay was applied twice on every
    step that traced a graph (2.4e-2 off after 3 steps); `self.scale` was the constructor's default."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    batches = [data() for _ in range(3)]
    with uh.innerloop_ctx(model, _DecayInGrad(model.parameters(), scale=2.0)) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_of(fmodel(x), y))
        fast = [p.detach() for p in fmodel.parameters()]
    eager = _DecayInGrad(twin.parameters(), scale=2.0)
    for x, y in batches:
        eager.zero_grad()
        loss_of(twin(x), y).backward()
        eager.step()
    for got, want in zip(fast, twin.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)


def _step_with_twin(fmodel, diffopt, twin, twin_opt, x, y, steps):
    """``steps`` differentiable steps and the same eager torch.optim steps on ``twin``, in turn."""
    for _ in range(steps):
        diffopt.step(loss_of(fmodel(x), y))
        twin_opt.zero_grad()
        loss_of(twin(x), y).backward()
        twin_opt.step()


def _update_graph(diffopt):
    """The graph the differentiable optimizer's last step ran."""
    return diffopt._last_update[1].last.gm


def test_adam_steps_share_one_step_counter_and_stay_torch_adam():
    """The first update hands out one step counter for all parameters (its counters are equal constants); the
    later updates must keep reading it through one placeholder (one bias correction per step, not one per
    parameter), and remain exactly torch.optim.Adam, also in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    twin = copy.deepcopy(model)
    opt, twin_opt = O.Adam(model.parameters(), lr=0.01), O.Adam(twin.parameters(), lr=0.01)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with uh.innerloop_ctx(model, opt) as (fmodel, diffopt):
        _step_with_twin(fmodel, diffopt, twin, twin_opt, x, y, 4)
        steps = {id(st["step"]) for st in diffopt.state[0].values()}
        graph = _update_graph(diffopt).graph
    assert len(steps) == 1
    counter_adds = [n for n in graph.nodes if n.target is torch.ops.aten.add.Tensor and n.args[1] == 1]
    assert len(counter_adds) == 1, graph
    for fast, ref in zip(fmodel.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-14)


def test_a_warm_adam_with_separate_counters_is_torch_adam():
    """A warm optimizer's counters are separate tensors: each parameter keeps its own (correct either way)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with uh.innerloop_ctx(model, O.Adam(model.parameters(), lr=0.01)) as (fmodel, diffopt):
        for _ in range(3):  # caches the graph for one shared counter, which must not serve separate ones
            diffopt.step(loss_of(fmodel(x), y))
    opt = O.Adam(model.parameters(), lr=0.01)
    loss_of(model(x), y).backward()
    opt.step()
    opt.state[model.bias]["step"] = torch.tensor(7.0)  # a counter of its own (a parameter added later, say)
    twin, twin_opt = copy.deepcopy(model), O.Adam(model.parameters(), lr=0.01)
    twin_opt.load_state_dict(opt.state_dict())
    twin_opt.param_groups[0]["params"] = list(twin.parameters())
    twin_opt.state = {tp: {k: v.clone() for k, v in opt.state[p].items()} for tp, p in zip(twin.parameters(), model.parameters(), strict=True)}
    with uh.innerloop_ctx(model, opt) as (fmodel, diffopt):
        _step_with_twin(fmodel, diffopt, twin, twin_opt, x, y, 3)
    for fast, ref in zip(fmodel.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-14)


def test_options_changed_between_steps_are_used():
    """Hyperparameter tensors are reused from step to step while the options are unchanged; any change is
    seen: a new value in a group, a tensor written in place."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)

    def run(changes):
        lr = torch.tensor(0.1, dtype=torch.float64)
        opt = O.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99))
        with uh.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for step in range(4):
                changes(step, diffopt, lr)
                diffopt.step(loss_of(fmodel(x), y))
            return [p.detach().clone() for p in fmodel.parameters()]

    def reference(lrs, beta1s):
        twin = copy.deepcopy(model)
        opt = O.Adam(twin.parameters(), lr=0.1, betas=(0.9, 0.99))
        for lr, b1 in zip(lrs, beta1s, strict=True):
            opt.param_groups[0]["lr"], opt.param_groups[0]["betas"] = lr, (b1, 0.99)
            opt.zero_grad()
            loss_of(twin(x), y).backward()
            opt.step()
        return [p.detach() for p in twin.parameters()]

    def new_value(step, diffopt, lr):
        if step == 2:
            diffopt.param_groups[0]["lr"] = torch.tensor(0.3, dtype=torch.float64)

    def in_place(step, diffopt, lr):
        if step == 1:
            lr.fill_(0.05)

    def new_betas(step, diffopt, lr):
        if step == 3:
            diffopt.param_groups[0]["betas"] = (0.5, 0.99)

    for changes, lrs, beta1s in [(new_value, [0.1, 0.1, 0.3, 0.3], [0.9] * 4), (in_place, [0.1, 0.05, 0.05, 0.05], [0.9] * 4),
                                 (new_betas, [0.1] * 4, [0.9, 0.9, 0.9, 0.5])]:
        for got, want in zip(run(changes), reference(lrs, beta1s), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-14, msg=changes.__name__)


def test_the_graph_chosen_for_a_learned_zero_weight_decay_does_not_depend_on_earlier_contexts(float64):
    """A learned weight_decay of 0 and the optimizer's own 0.0 both satisfy the plain graph's guard; the learned
    one must still get its meta-gradient after contexts that ran the plain graph (found in review)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = O.SGD(model.parameters(), lr=0.1, weight_decay=0.0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def inner(override, steps):
        with uh.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_of(fmodel(x), y))
            return loss_of(fmodel(x), y)

    def meta_grad():
        wd = torch.tensor(0.0, requires_grad=True)
        return torch.autograd.grad(inner({"weight_decay": [wd]}, 1), wd, allow_unused=True)[0]

    first = meta_grad()
    inner(None, 2)  # the optimizer's own weight_decay=0.0
    assert first is not None and torch.equal(meta_grad(), first)


def test_options_that_change_without_becoming_new_objects_are_seen():
    """A hyperparameter set to require grad mid-loop gets its gradient; a custom optimizer's list attribute and a
    dict-valued group option changed in place change the next update (found in review)."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False)
    x = torch.randn(4, 2)
    lr = torch.tensor(0.1, dtype=torch.float64)
    with uh.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), override={"lr": [lr]}) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).sum())
        lr.requires_grad_()
        diffopt.step(fmodel(x).pow(2).sum())
        assert torch.autograd.grad(fmodel(x).pow(2).sum(), lr)[0] != 0

    class ScaledSGD(O.Optimizer):
        def __init__(self, params, lr=0.1, cfg=None):
            super().__init__(params, dict(lr=lr, cfg=cfg if cfg is not None else {"scale": 1.0}))
            self.factors = [1.0]

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"] * group["cfg"]["scale"] * self.factors[0])

    for change in ("attribute", "dict option"):
        opt = ScaledSGD(model.parameters())
        with uh.innerloop_ctx(model, opt) as (fmodel, diffopt):
            diffopt.step(fmodel(x).sum())
            before = fmodel.weight.detach().clone()
            if change == "attribute":
                opt.factors[0] = 0.0
            else:
                diffopt.param_groups[0]["cfg"]["scale"] = 0.0
            diffopt.step(fmodel(x).sum())
            assert torch.equal(fmodel.weight, before), change  # a zero step: the weight stays
