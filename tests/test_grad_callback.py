"""``unrollc.compile(..., grad_callback=...)``: the gradients transformed between the backward and the optimizer's
step (gradient clipping), equal to eager training with torch.nn.utils.clip_grad_norm_ / clip_grad_value_, and
differentiated like the rest of the step under every checkpoint schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unrollc
import oracles
from oracles import central_difference

N = 8
SCHEDULES = [None, "sqrt", 3, "binomial"]


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def make():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    batches = [(torch.randn(8, 4), 3 * torch.randn(8, 1)) for _ in range(N)]  # large targets: clipping is active
    return model, batches


def eager_clipped(model, opt, batches, clip):
    """Deep copies trained eagerly with ``clip(parameters)`` between backward and step; the gradient norms before
    clipping, and the final parameters and optimizer state."""
    model, opt = copy.deepcopy((model, opt))
    norms = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        mse(model, batch).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        clip(list(model.parameters()))
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    return norms, dict(model.named_parameters()), {names[id(p)]: st for p, st in opt.state.items()}


def eager_edited(model, opt, batches, edit):
    """A deep copy of ``model`` trained eagerly with ``edit(model)`` changing the ``.grad`` s under no_grad between
    backward and step (as a user writes a gradient transform)."""
    model, opt = copy.deepcopy((model, opt))
    for batch in batches:
        opt.zero_grad()
        mse(model, batch).backward()
        with torch.no_grad():
            edit(model)
        opt.step()
    return model


CLIPS = [
    (lambda: unrollc.clip_grad_norm(1.0), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)),
    (lambda: unrollc.clip_grad_norm(0.5, norm_type=float("inf")), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5, float("inf"))),
    (lambda: unrollc.clip_grad_value(0.2), lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=["norm", "inf-norm", "value"])
@pytest.mark.parametrize("checkpoint", [None, "sqrt"], ids=repr)
def test_trajectory_is_eager_training_with_torchs_clipping_bit_for_bit(clip, dtype, checkpoint):
    model, batches = make()
    model = model.to(dtype)
    batches = [(x.to(dtype), y.to(dtype)) for x, y in batches]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    callback, eager_clip = clip
    stepper = unrollc.compile(model, opt, mse, grad_callback=callback())
    state = stepper.unroll(stepper.init(), batches, checkpoint=checkpoint)
    norms, params, opt_state = eager_clipped(model, opt, batches, eager_clip)
    assert max(norms) > 1.0  # the clipping changed some steps
    for name, p in params.items():
        assert torch.equal(state.params[name], p.detach()), name
        assert torch.equal(state.opt_state[name]["momentum_buffer"], opt_state[name]["momentum_buffer"]), name


def test_adam_with_clipping_equals_eager_adam(float64):
    model, batches = make()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(torch.tensor(0.9), torch.tensor(0.999)))
    stepper = unrollc.compile(model, opt, mse, grad_callback=unrollc.clip_grad_norm(1.0))
    state = stepper.unroll(stepper.init(), batches, checkpoint="binomial")
    _, params, _ = eager_clipped(model, opt, batches, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0))
    for name, p in params.items():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-13, atol=1e-13)


def clipped_sgd_momentum(lr, momentum, max_norm):
    """Clip the total norm (differentiably), then torch.optim.SGD(momentum) written out."""
    sgd = oracles.sgd_momentum(lr, momentum)

    def update(params, grads, states, t):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return sgd(params, [g * coef for g in grads], states, t)

    return update


def test_meta_gradient_through_clipping_equals_the_eager_unroll_and_finite_differences(float64):
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mse,
                              grad_callback=unrollc.clip_grad_norm(1.0))
    xv = torch.randn(16, 4)
    W0 = model[0].weight.detach().clone()

    def meta_loss(lr, W, checkpoint=None):
        state = stepper.unroll(stepper.init(params={"0.weight": W}, hyper={"lr": lr}), batches, checkpoint=checkpoint)
        return stepper.forward(state, xv).pow(2).mean()

    lr, W = torch.tensor(0.1, requires_grad=True), W0.clone().requires_grad_()
    final = oracles.eager_unroll(model, mse, batches, clipped_sgd_momentum(lr, 0.9, 1.0),
                                 params=[W, model[0].bias, model[2].weight, model[2].bias])
    names = [n for n, _ in model.named_parameters()]
    with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, final))):
        reference = torch.autograd.grad(model(xv).pow(2).mean(), (lr, W))
    for checkpoint in SCHEDULES:
        lr_, W_ = torch.tensor(0.1, requires_grad=True), W0.clone().requires_grad_()
        grads = torch.autograd.grad(meta_loss(lr_, W_, checkpoint), (lr_, W_))
        for g, r in zip(grads, reference, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13, msg=f"checkpoint={checkpoint!r}")
    torch.testing.assert_close(reference[0], central_difference(lambda lr: meta_loss(lr, W0), torch.tensor(0.1)), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(reference[1], central_difference(lambda W: meta_loss(torch.tensor(0.1), W), W0), rtol=1e-6, atol=1e-9)


def test_a_callback_with_a_learned_meta_input_gets_its_gradient_under_every_schedule(float64):
    """grad_callback(grads, *meta): a learned per-layer gradient scale, passed as the unroll's meta argument."""
    model, batches = make()

    def scaled(grads, scale):
        return {n: g * scale[int(n[0]) // 2] for n, g in grads.items()}

    def loss(model, batch, scale):
        return mse(model, batch)

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, grad_callback=scaled)
    xv, s0 = torch.randn(16, 4), torch.tensor([0.7, 1.3])

    def meta_loss(scale, checkpoint=None):
        state = stepper.unroll(stepper.init(), batches, scale, checkpoint=checkpoint)
        return stepper.forward(state, xv).pow(2).mean()

    grads = {}
    for checkpoint in SCHEDULES:
        scale = s0.clone().requires_grad_()
        grads[checkpoint] = torch.autograd.grad(meta_loss(scale, checkpoint), scale)[0]
    for checkpoint, g in grads.items():
        torch.testing.assert_close(g, grads[None], rtol=1e-10, atol=1e-14, msg=f"checkpoint={checkpoint!r}")
    torch.testing.assert_close(grads[None], central_difference(meta_loss, s0), rtol=1e-6, atol=1e-9)


def test_a_no_grad_block_in_the_callback_is_a_constant_for_the_meta_gradient(float64):
    """As in eager autograd: a coefficient computed under torch.no_grad() carries no derivative."""
    model, batches = make()

    def clip(grads, detached):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        if detached:
            with torch.no_grad():
                coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        else:
            coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        return {n: g * coef for n, g in grads.items()}

    xv = torch.randn(16, 4)

    def lr_grad(detached):
        stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse,
                                  grad_callback=lambda grads: clip(grads, detached))
        lr = torch.tensor(0.1, requires_grad=True)
        state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, checkpoint="sqrt")
        return torch.autograd.grad(stepper.forward(state, xv).pow(2).mean(), lr)[0], state

    (g_detached, s_detached), (g_full, s_full) = lr_grad(True), lr_grad(False)
    for name in s_full.params:
        torch.testing.assert_close(s_detached.params[name], s_full.params[name], rtol=0, atol=0)  # same values

    lr = torch.tensor(0.1, requires_grad=True)  # the eager reference with the coefficient detached

    def update(params, grads, states, t):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = torch.clamp(1.0 / (total + 1e-6), max=1.0).detach()
        return [p - lr * g * coef for p, g in zip(params, grads, strict=True)]

    final = oracles.eager_unroll(model, mse, batches, update)
    names = [n for n, _ in model.named_parameters()]
    with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, final))):
        reference = torch.autograd.grad(model(xv).pow(2).mean(), lr)[0]
    torch.testing.assert_close(g_detached, reference, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(g_detached, g_full, rtol=1e-3)


def test_changing_the_callbacks_settings_traces_a_new_graph():
    model, batches = make()
    clip = unrollc.clip_grad_norm(1.0)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse, grad_callback=clip)
    first = stepper.unroll(stepper.init(), batches[:3])
    clip.max_norm = 0.25
    second = stepper.unroll(stepper.init(), batches[:3])
    _, params, _ = eager_clipped(model, torch.optim.SGD(model.parameters(), lr=0.1), batches[:3],
                                 lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.25))
    for name, p in params.items():
        assert torch.equal(second.params[name], p.detach()), name
    assert not torch.equal(first.params["0.weight"], second.params["0.weight"])


def test_frozen_and_unused_parameters_are_not_in_the_callbacks_gradients():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1), nn.Linear(1, 1))  # [3] unused by the loss
    model[0].bias.requires_grad_(False)
    seen = []

    def callback(grads):
        seen.append(sorted(grads))
        return grads

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m[2](m[1](m[0](b))).sum(),
                              grad_callback=callback)
    stepper.step(stepper.init(), torch.randn(8, 4))
    assert seen == [["0.weight", "2.bias", "2.weight"]]  # called once, while the step is traced


@pytest.mark.parametrize("callback,match", [
    (lambda grads: list(grads.values()), r"grad_callback <lambda>\(grads, \*meta\) must return a mapping from the same "
                                         r"parameter names .* got list"),
    (lambda grads: {n: g for n, g in grads.items() if n != "0.bias"}, r"got a mapping with keys \['0.weight', '2.bias', '2.weight'\]"),
    (lambda grads: {n: g.sum() for n, g in grads.items()}, r"returned a tensor of shape \(\) .* for '0.weight', whose gradient has shape \(6, 4\)"),
])
def test_a_callback_that_returns_something_else_is_refused_with_the_fix(callback, match):
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse, grad_callback=callback)
    with pytest.raises(unrollc.CaptureError, match=match):
        stepper.step(stepper.init(), batches[0])


def test_bad_arguments_are_refused_at_once():
    model, _ = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"unrollc.compile: expected `grad_callback\(grads, \*meta\) -> grads`.* got float"):
        unrollc.compile(model, opt, mse, grad_callback=1.0)
    with pytest.raises(TypeError, match=r"unrollc.clip_grad_norm: expected `max_norm` as a positive number, got -1"):
        unrollc.clip_grad_norm(-1)
    with pytest.raises(TypeError, match=r"unrollc.clip_grad_value: expected `clip_value` as a positive number, got '1'"):
        unrollc.clip_grad_value("1")


def test_explain_names_the_callback_and_the_graph_holds_the_clipping():
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse,
                              grad_callback=unrollc.clip_grad_norm(1.0))
    stepper.step(stepper.init(), batches[0])
    assert "grad_callback clip_grad_norm(max_norm=1.0, norm_type=2.0)" in str(unrollc.explain(stepper)).splitlines()[0]
    targets = {str(n.target) for n in stepper.graph.graph.nodes}
    assert "aten.clamp.default" in targets


def test_a_callback_reading_the_models_weights_reads_the_current_steps(float64):
    """Adaptive gradient clipping (Brock et al. 2021) scales each gradient by the norm of its weight: inside the
    callback the model's parameters are the step's, not the time-0 weights (found in review)."""
    model, batches = make()
    ratio = lambda p, g: (0.05 * p.norm() / (g.norm() + 1e-6)).clamp(max=1.0)  # noqa: E731

    def agc(grads):
        return {n: grads[n] * ratio(p, grads[n]) for n, p in model.named_parameters()}

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    eager_model = eager_edited(model, opt, batches, lambda m: [p.grad.mul_(ratio(p, p.grad)) for p in m.parameters()])
    stepper = unrollc.compile(model, opt, mse, grad_callback=agc)
    xv = torch.randn(16, 4)
    lr_grads = []
    for checkpoint in (None, "sqrt"):
        lr = torch.tensor(0.5, requires_grad=True)
        state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, checkpoint=checkpoint)
        for name, p in eager_model.named_parameters():
            assert torch.equal(state.params[name], p.detach()), name
        lr_grads.append(torch.autograd.grad(stepper.forward(state, xv).pow(2).mean(), lr)[0])
    torch.testing.assert_close(lr_grads[1], lr_grads[0], rtol=1e-10, atol=1e-14)

    def meta_loss(lr):
        return stepper.forward(stepper.unroll(stepper.init(hyper={"lr": lr}), batches), xv).pow(2).mean()

    torch.testing.assert_close(lr_grads[0], central_difference(meta_loss, torch.tensor(0.5)), rtol=1e-6, atol=1e-9)


def test_a_callback_that_cannot_take_the_meta_arguments_is_refused_with_the_contract():
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b, w: w * mse(m, b),
                              grad_callback=lambda grads: grads)
    with pytest.raises(TypeError, match=r"grad_callback must accept \(grads, \*meta\), here 2 positional argument\(s\) "
                                        r"\(the dict of gradients and 1 meta argument\(s\).*<lambda>\(grads\)"):
        stepper.step(stepper.init(), batches[0], torch.tensor(1.0))


def test_another_function_assigned_to_the_stepper_is_traced_anew():
    """Assigning another loss_fn or grad_callback to the stepper re-traces (found in review: the old graph ran)."""
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse,
                              grad_callback=unrollc.clip_grad_norm(1.0))
    clipped = stepper.step(stepper.init(), batches[0])
    stepper.grad_callback = lambda grads: grads
    plain = stepper.step(stepper.init(), batches[0])
    stepper.loss_fn = lambda m, b: 2 * mse(m, b)
    doubled = stepper.step(stepper.init(), batches[0])
    _, params, _ = eager_clipped(model, torch.optim.SGD(model.parameters(), lr=0.1), batches[:1], lambda ps: None)
    w = params["0.weight"].detach()
    assert torch.equal(plain.params["0.weight"], w) and not torch.equal(clipped.params["0.weight"], w)
    torch.testing.assert_close(doubled.params["0.weight"] - model[0].weight, 2 * (w - model[0].weight))


@pytest.mark.parametrize("checkpoint", [None, "sqrt"], ids=repr)
def test_detached_gradients_give_first_order_maml(checkpoint, float64):
    """grad_callback=lambda grads: {n: g.detach() ...}: the updates' gradients are constants for the meta-gradient
    (first-order MAML, Finn et al. 2017), equal to an eager unroll that detaches them."""
    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse,
                              grad_callback=lambda grads: {n: g.detach() for n, g in grads.items()})
    xv = torch.randn(16, 4)
    state = stepper.unroll(stepper.init(), batches, checkpoint=checkpoint)
    got = torch.autograd.grad(stepper.forward(state, xv).pow(2).mean(), model[0].weight)[0]

    def update(params, grads, states, t):
        return [p - 0.1 * g.detach() for p, g in zip(params, grads, strict=True)]

    final = oracles.eager_unroll(model, mse, batches, update)
    with torch.nn.utils.stateless._reparametrize_module(model, dict(zip([n for n, _ in model.named_parameters()], final))):
        want = torch.autograd.grad(model(xv).pow(2).mean(), model[0].weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    second_order = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    full = second_order.unroll(second_order.init(), batches)
    assert not torch.allclose(torch.autograd.grad(second_order.forward(full, xv).pow(2).mean(), model[0].weight)[0], got)


def test_an_identical_new_callback_or_loss_fn_reuses_the_graph():
    """Keyed on the code, not the object: a partial or a clipping object made again each iteration does not
    re-trace (found in review: keyed by identity, every iteration traced anew)."""
    import functools

    model, batches = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    for _ in range(4):
        stepper.loss_fn = functools.partial(lambda m, b, alpha: alpha * mse(m, b), alpha=0.5)
        stepper.grad_callback = unrollc.clip_grad_norm(1.0)
        stepper.unroll(stepper.init(), batches[:2], checkpoint="sqrt")
    assert stepper.trace_count == 1
    stepper.grad_callback = unrollc.clip_grad_norm(2.0)  # its max_norm is keyed
    stepper.unroll(stepper.init(), batches[:2])
    assert stepper.trace_count == 2


def test_a_callback_reads_a_buffer_the_forward_reassigns_at_its_new_value(float64):
    """A buffer the forward re-assigns (self.ema = 0.9 * self.ema + ...) is read by the callback as eager reads it
    after backward (found in review: the callback saw the old value)."""

    class EMA(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.register_buffer("ema", torch.ones(()))

        def forward(self, x):
            out = self.lin(x)
            self.ema = 0.5 * self.ema + 0.5 * out.detach().abs().mean()
            return out

    torch.manual_seed(0)
    model = EMA()
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4)]

    def scale(grads):
        return {n: g / (1 + model.ema) for n, g in grads.items()}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eager_model = eager_edited(model, opt, batches, lambda m: [p.grad.div_(1 + m.ema) for p in m.parameters()])
    stepper = unrollc.compile(model, opt, mse, grad_callback=scale)
    state = stepper.unroll(stepper.init(), batches)
    for name, p in eager_model.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-14, atol=1e-15)


def test_parameters_held_by_the_callback_are_pointed_out():
    """A callback holding the model's parameters (taken before compile) reads their time-0 values: a plain unroll
    warns, a checkpointed one refuses, both saying to read them through the model (found in review)."""
    model, batches = make()
    held = dict(model.named_parameters())
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse,
                              grad_callback=lambda grads: {n: g / (1 + held[n].norm()) for n, g in grads.items()})
    with pytest.warns(UserWarning, match=r"reads the model's parameter\(s\) 0.bias, 0.weight, 2.bias, 2.weight as they "
                                         r"are held by loss_fn or grad_callback.*Read them through the model"):
        stepper.unroll(stepper.init(), batches[:2])
    with pytest.raises(ValueError, match=r"reads the model's parameter '0.(weight|bias)' as loss_fn or grad_callback "
                                         r"holds it.*Read it through the model"):
        stepper.unroll(stepper.init(), batches[:2], checkpoint="sqrt")


def test_a_frozen_parameter_held_by_the_callback_is_its_own_value(recwarn):
    """A frozen parameter does not change from step to step: holding it is fine, without warning or refusal."""
    model, batches = make()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse,
                              grad_callback=lambda grads: {n: g / (1 + frozen.norm()) for n, g in grads.items()})
    stepper.unroll(stepper.init(), batches[:2], checkpoint="sqrt")
    assert not [w for w in recwarn if "held by loss_fn" in str(w.message)]


def test_detaches_in_a_callback_written_in_another_file_than_the_loss_are_kept(tmp_path, monkeypatch, float64):
    """The loss from the project's library, the first-order callback in the training script: the callback's
    detaches stay (found in review: only functions of loss_fn's file were recorded as the user's, so they were
    stripped as autograd's and the "first-order" meta-gradient was the second-order one)."""
    import importlib

    (tmp_path / "losslib_for_callback_test.py").write_text(
        "def mse(model, batch):\n    x, y = batch\n    return (model(x) - y).pow(2).mean()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    losslib = importlib.import_module("losslib_for_callback_test")
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), losslib.mse,
                              grad_callback=lambda grads: {n: g.detach() for n, g in grads.items()})
    state = stepper.step(stepper.init(), (torch.randn(5, 4), torch.randn(5, 2)))
    # W0' = W0 - lr * stopgrad(g0) does not depend on the last layer's weight; the second-order update does
    assert torch.autograd.grad(state.params["0.weight"].sum(), model[2].weight, allow_unused=True)[0] is None
    assert sum(n.target == torch.ops.aten.detach.default for n in stepper.graph.graph.nodes) == 4
