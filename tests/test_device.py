"""The library on an accelerator: the oracles of the CPU suite, on one device.

- parameter and optimizer-state trajectories equal eager ``torch.optim`` on the same device (its default there is
  the foreach implementation, so the tolerance is float32 rounding, as in the CPU suite's foreach cases);
- float64 meta-gradients w.r.t. initial weights, a tensor lr and per-example weights equal a hand-written eager
  ``autograd.grad(create_graph=True)`` unroll on the same device, for every schedule;
- every tensor of the state stays on the device; ``unrollc.higher`` works there; the benchmark measures the
  device's allocator.

Skipped without CUDA. ``UNROLLC_TEST_DEVICE=cpu python -m pytest tests/test_device.py`` runs them on the CPU,
which is how their logic was checked on machines without a GPU; ``UNROLLC_TEST_DEVICE=cuda:1`` picks a device.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import oracles
import unrollc
from test_metagrad import weighted_mse
from test_optimizers import assert_same_trajectory, max_rel, mse

DEVICE = os.environ.get("UNROLLC_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or UNROLLC_TEST_DEVICE=cpu)")

O = torch.optim
TRAJECTORY_OPTIMIZERS = [
    (O.SGD, dict(lr=0.1, momentum=0.9)),
    (O.Adam, dict(lr=0.01)),
    (O.AdamW, dict(lr=0.01, amsgrad=True)),
    (O.RMSprop, dict(lr=0.01)),
    (O.NAdam, dict(lr=0.01)),
    (O.RAdam, dict(lr=0.01)),
]
SCHEDULES = [None, "sqrt", 2, "binomial", unrollc.Budget(5000)]  # 5000 bytes: Binomial(4) on this model


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 2)).to(DEVICE)


def _batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(8, 3, device=DEVICE, dtype=dtype), torch.randn(8, 2, device=DEVICE, dtype=dtype))
            for _ in range(n)]


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("cls,kwargs", TRAJECTORY_OPTIMIZERS, ids=[c.__name__ for c, _ in TRAJECTORY_OPTIMIZERS])
def test_trajectory_matches_torch_optim_on_the_device(cls, kwargs):
    model = _net()
    _, state = assert_same_trajectory(model, cls(model.parameters(), **kwargs), mse, _batches(20), tol=1e-5)
    assert all(_on_device(t) for t in [*state.params.values(), *state.buffers.values()])
    # the moments live on the device; torch.optim keeps the scalar counters (step, NAdam's mu_product) on the CPU
    # unless capturable, and assert_same_trajectory checks that every state tensor's device is torch.optim's
    assert all(_on_device(t) for st in state.opt_state.values() for t in st.values() if t.dim() > 0)
    assert _on_device(state.loss)


@pytest.mark.parametrize("checkpoint", SCHEDULES, ids=str)
def test_meta_gradients_on_the_device_match_the_eager_unroll(checkpoint, float64):
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(DEVICE)
    batches = _batches(9, torch.float64)
    xv, yv = torch.randn(8, 3, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    stepper = unrollc.compile(model, O.SGD(model.parameters(), lr=0.1, momentum=0.9), weighted_mse)

    lr = torch.tensor(0.1, device=DEVICE, requires_grad=True)
    w = torch.rand(8, device=DEVICE).add(0.5).requires_grad_()
    state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, w, checkpoint=checkpoint)
    assert all(_on_device(t) for t in state.params.values())
    got = torch.autograd.grad(mse(lambda x: stepper.forward(state, x), (xv, yv)), [lr, w, *model.parameters()])

    lr2, w2 = lr.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

    def update(params, grads, states, t):
        return oracles.sgd_momentum(lr2, 0.9)(params, grads, states, t)

    params = oracles.eager_unroll(model, lambda m, b: weighted_mse(m, b, w2), batches, update)
    names = [n for n, _ in model.named_parameters()]
    with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, params))):
        ref_loss = mse(model, (xv, yv))
    ref = torch.autograd.grad(ref_loss, [lr2, w2, *model.parameters()])
    for a, b in zip(got, ref, strict=True):
        assert _on_device(a) and max_rel(a, b) < 1e-10


def test_higher_layer_on_the_device(float64):
    import unrollc.higher as higher

    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(DEVICE)
    opt = O.Adam(model.parameters(), lr=0.01)
    batches = _batches(4, torch.float64)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        meta = ((fmodel(batches[0][0]) - batches[0][1]) ** 2).mean()
        got = torch.autograd.grad(meta, list(model.parameters()))
    params = oracles.eager_unroll(model, mse, batches, oracles.adam(0.01))
    names = [n for n, _ in model.named_parameters()]
    with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, params))):
        ref_loss = mse(model, batches[0])
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))  # outside: inside, parameters() are the final ones
    for a, b in zip(got, ref, strict=True):
        assert _on_device(a) and max_rel(a, b) < 1e-10


def test_bench_measures_the_devices_memory():
    from unrollc.bench.runner import Config, measure_config

    device = torch.device(DEVICE).type
    res = measure_config(Config("mlp-small", "sgd", 4, "unrollc", "sqrt", device=device, repeats=1), "all")
    assert res.status == "ok" and res.peak_bytes is not None and res.time_s > 0 and res.flops > 0
    if device == "cuda":  # (on the CPU, in this process without the bench's malloc settings, the peak can read 0)
        assert res.memory_how == "cuda max_memory_allocated" and res.peak_bytes > 0
