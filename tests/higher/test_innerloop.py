"""unrollc/higher/__init__.py: innerloop_ctx — MAML against higher and an eager unroll, and where unrollc
is deliberately better than higher (first order, time=0 in test mode, memory, write-back)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unrollc
import unrollc.higher as uh

O = torch.optim


def make():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.randn(10, 3), torch.randn(10, 1), torch.randn(10, 3), torch.randn(10, 1)


def maml_grads(lib, model, x, y, xq, yq, steps=3, **ctx):
    model.zero_grad()
    with lib.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), **ctx) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()
        initial = [p.grad for p in fmodel.parameters(time=0)] if ctx.get("copy_initial_weights", True) else None
    return [p.grad for p in model.parameters()], initial


def test_reexports():
    assert unrollc.higher.innerloop_ctx is uh.innerloop_ctx
    for name in ("innerloop_ctx", "monkeypatch", "get_diff_optim"):
        assert getattr(uh, name) is not None
    assert uh.optim.get_diff_optim is uh.get_diff_optim and uh.patch.monkeypatch is uh.monkeypatch


def test_maml_meta_gradient_equals_eager_unroll(lib):
    model, x, y, xq, yq = make()
    grads, _ = maml_grads(lib, model, x, y, xq, yq, copy_initial_weights=False)
    params = list(model.parameters())
    fast = [p.clone() for p in params]
    for _ in range(3):
        out = F.linear(torch.tanh(F.linear(x, fast[0], fast[1])), fast[2], fast[3])
        g = torch.autograd.grad(F.mse_loss(out, y), fast, create_graph=True)
        fast = [w - 0.1 * gw for w, gw in zip(fast, g, strict=True)]
    out = F.linear(torch.tanh(F.linear(xq, fast[0], fast[1])), fast[2], fast[3])
    ref = torch.autograd.grad(F.mse_loss(out, yq), params)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_copy_initial_weights_true_sends_gradients_to_time_zero_not_the_model(lib):
    model, *batch = make()
    model_grads, initial = maml_grads(lib, model, *batch, copy_initial_weights=True)
    assert all(g is None for g in model_grads)  # documented: the model is not on the tape
    reference, _ = maml_grads(lib, model, *batch, copy_initial_weights=False)
    for a, b in zip(initial, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_first_order_maml_reaches_the_model():
    # higher 0.2.1 gives None here (asserted in test_first_order_in_higher_gives_none)
    model, x, y, xq, yq = make()
    grads, _ = maml_grads(uh, model, x, y, xq, yq, copy_initial_weights=False, track_higher_grads=False)
    fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for _ in range(3):
        out = F.linear(torch.tanh(F.linear(x, fast[0], fast[1])), fast[2], fast[3])
        g = torch.autograd.grad(F.mse_loss(out, y), fast)
        fast = [(w - 0.1 * gw).detach().requires_grad_() for w, gw in zip(fast, g, strict=True)]
    out = F.linear(torch.tanh(F.linear(xq, fast[0], fast[1])), fast[2], fast[3])
    ref = torch.autograd.grad(F.mse_loss(out, yq), fast)  # first order: d query / d final weights
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_first_order_keeps_grad_on_the_fast_weights(lib):
    model, x, y, xq, yq = make()
    with lib.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()
        assert all(p.grad is not None for p in fmodel.parameters())  # the usual first-order recipe keeps working
        assert all(p.grad_fn is None or p.grad_fn.next_functions for p in fmodel.parameters())


def test_first_order_from_passed_weights_reaches_them_not_the_model():
    model, x, y, xq, yq = make()
    meta_init = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with uh.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), copy_initial_weights=False, track_higher_grads=False) as (fmodel, diffopt):
        fast = [w * 1.0 for w in meta_init]
        for _ in range(2):
            fast = diffopt.step(F.mse_loss(fmodel(x, params=fast), y), params=fast)
        final = fast
        F.mse_loss(fmodel(xq, params=fast), yq).backward()
    assert all(p.grad is None for p in model.parameters())  # the model's weights were never used
    for w, f in zip(meta_init, final, strict=True):
        torch.testing.assert_close(w.grad, f.grad)  # first order: d query / d final weights, delivered to w_0


@pytest.mark.parametrize("how", ["forward", "update_params"])
def test_first_order_starts_from_weights_set_on_the_functional_module(how):
    # The inner loop starts from 2 * theta, set before the first step: the first-order meta-gradient of theta is
    # 2 * d query / d final weights (it used to be linked to the initial clones: 1x), and a start independent of
    # theta gives theta no gradient.
    for scale, independent in ((2.0, False), (1.0, True)):
        model, x, y, xq, yq = make()
        start = [torch.randn_like(p, requires_grad=True) if independent else scale * p for p in model.parameters()]
        with uh.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), copy_initial_weights=False, track_higher_grads=False) as (fmodel, diffopt):
            fmodel(x, params=start) if how == "forward" else fmodel.update_params(start)
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(x), y))
            final = list(fmodel.parameters())
            query = F.mse_loss(fmodel(xq), yq)
            d_final = torch.autograd.grad(query, final, retain_graph=True)
            query.backward()
        for p, s, g in zip(model.parameters(), start, d_final, strict=True):
            if independent:
                assert p.grad is None
                torch.testing.assert_close(s.grad, g)
            else:
                torch.testing.assert_close(p.grad, scale * g)


def test_first_order_inner_steps_leave_no_grad_on_the_weights():
    model, x, y, xq, yq = make()
    with uh.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        after_one = list(fmodel.parameters())
        diffopt.step(F.mse_loss(fmodel(x), y))  # differentiates the loss by after_one
        assert all(p.grad is None for p in after_one)
        F.mse_loss(fmodel(xq), yq).backward()
        assert all(p.grad is not None for p in fmodel.parameters())


def test_first_order_in_higher_gives_none():
    higher = pytest.importorskip("higher")
    model, *batch = make()
    grads, _ = maml_grads(higher, model, *batch, copy_initial_weights=False, track_higher_grads=False)
    assert all(g is None for g in grads)


def test_time_zero_in_test_mode(lib):
    model, x, y, _, _ = make()
    with lib.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x), y))
        with pytest.raises(ValueError, match="not tracking higher gradients"):
            fmodel.parameters(time=1)
        initial_is_model = all(torch.equal(a, b) for a, b in zip(fmodel.parameters(time=0), model.parameters(), strict=True))
        latest_is_model = all(torch.equal(a, b) for a, b in zip(fmodel.parameters(), model.parameters(), strict=True))
    assert not latest_is_model
    assert initial_is_model == (lib is uh)  # higher silently returns the latest weights for time=0


def test_history_with_tracking(lib):
    model, x, y, _, _ = make()
    with lib.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        history = [list(fmodel.parameters(time=0))]
        for _ in range(3):
            history.append(diffopt.step(F.mse_loss(fmodel(x), y)))
        for t, params in enumerate(history):
            assert all(a is b for a, b in zip(fmodel.parameters(time=t), params, strict=True))


def test_leaving_the_context_frees_the_history():
    model, x, y, xq, yq = make()
    gc.collect()
    gc.disable()
    try:
        with uh.innerloop_ctx(model, O.Adam(model.parameters(), lr=0.1), copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(x), y))
            middle = weakref.ref(list(fmodel.parameters(time=1))[0])
            state = weakref.ref(diffopt.state[0][0]["exp_avg"])
            meta = F.mse_loss(fmodel(xq), yq)
        meta.backward()  # a meta-loss made in the context still back-propagates after it
        assert middle() is None and state() is None  # backward freed the graph; the history does not hold them
        with pytest.raises(ValueError, match="released when the innerloop_ctx"):
            fmodel.parameters(time=1)
        last = weakref.ref(fmodel.fast_params[0])
        del fmodel, diffopt
        assert last() is None  # no reference cycles: freed without the garbage collector
    finally:
        gc.enable()
    assert model[0].weight.grad is not None


def test_higher_keeps_the_history_alive():
    higher = pytest.importorskip("higher")
    model, x, y, xq, yq = make()
    with higher.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
        middle = weakref.ref(list(fmodel.parameters(time=1))[0])
        F.mse_loss(fmodel(xq), yq).backward()
    assert middle() is not None  # held by fmodel until the name is rebound


def test_meta_loss_after_the_context():
    model, x, y, xq, yq = make()
    inside, _ = maml_grads(uh, model, x, y, xq, yq, copy_initial_weights=False)
    inside = [g.clone() for g in inside]
    model.zero_grad()
    with uh.innerloop_ctx(model, O.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
    F.mse_loss(fmodel(xq), yq).backward()
    for a, p in zip(inside, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_write_back_continues_training_exactly():
    # no bias before the batch norm: its gradient would be 0 up to rounding, which Adam amplifies
    model = nn.Sequential(nn.Linear(3, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    twin = copy.deepcopy(model)
    opt, twin_opt = O.Adam(model.parameters(), lr=0.05), O.Adam(twin.parameters(), lr=0.05)
    with uh.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
    fmodel.write_back()
    diffopt.write_back()
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for _ in range(5):
        twin_opt.zero_grad()
        F.mse_loss(twin(x), y).backward()
        twin_opt.step()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizers_higher_lacks():
    _, x, y, xq, yq = make()
    model = nn.Linear(3, 1)
    for opt in (O.AdamW(model.parameters(), lr=0.01), O.NAdam(model.parameters(), lr=0.01), O.RAdam(model.parameters(), lr=0.01)):
        model.zero_grad()
        with uh.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(x), y))
            F.mse_loss(fmodel(xq), yq).backward()
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())


def test_example_maml_learns():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    try:
        import higher_maml
    finally:
        sys.path.pop(0)
    assert higher_maml.higher is uh
    before, after, _ = higher_maml.main(meta_steps=40, verbose=False, meta_lr=1e-2, eval_tasks=8)
    assert after < 0.9 * before


def test_second_order_maml_through_attention_equals_an_eager_unroll(float64):
    """The fused CPU attention kernels have no double backward: backward() raised inside
    _scaled_dot_product_flash_attention_for_cpu_backward (in higher 0.2.1 too)."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x, y = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    with uh.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step((fmodel(x) - y).pow(2).mean())
        (fmodel(x) - y).pow(2).mean().backward()
    params = dict(model.named_parameters())
    with sdpa_kernel(SDPBackend.MATH):  # the eager reference: create_graph=True through the math kernel
        fast = dict(params)
        for _ in range(2):
            grads = torch.autograd.grad((functional_call(model, fast, (x,)) - y).pow(2).mean(), list(fast.values()), create_graph=True)
            fast = {k: v - 0.1 * g for (k, v), g in zip(fast.items(), grads, strict=True)}
        ref = torch.autograd.grad((functional_call(model, fast, (x,)) - y).pow(2).mean(), list(params.values()))
    for (name, p), r in zip(params.items(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-14, msg=name)
