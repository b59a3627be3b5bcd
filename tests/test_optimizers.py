"""Oracle (a): parameter AND optimizer-state trajectories equal eager torch.optim over 30 steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unrollc
from oracles import HandWritten, eager_trajectory

O = torch.optim

OPTIMIZERS = [
    (O.SGD, dict(lr=0.1)),
    (O.SGD, dict(lr=0.1, momentum=0.9)),
    (O.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (O.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)),
    (O.Adam, dict(lr=0.01)),
    (O.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (O.AdamW, dict(lr=0.01)),
    (O.AdamW, dict(lr=0.01, amsgrad=True)),
    (O.Adadelta, dict(lr=0.5)),
    (O.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    (O.Adamax, dict(lr=0.01, weight_decay=0.01)),
    (O.ASGD, dict(lr=0.01, t0=5)),
    (O.NAdam, dict(lr=0.01)),
    (O.NAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1)),
    (O.RAdam, dict(lr=0.01)),
    (O.RAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1)),
    (O.RMSprop, dict(lr=0.01)),
    (O.RMSprop, dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.01)),
    (O.Rprop, dict(lr=0.01)),
    (O.Adafactor, dict(lr=0.01)),
    (O.Adafactor, dict(lr=0.01, weight_decay=0.01)),
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in OPTIMIZERS]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 on the CPU (eager torch.optim keeps step counters there even for GPU params)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / (b.abs().max() + 1e-30)).item()


def assert_same_trajectory(model, opt, loss_fn, batches, tol):
    ref = eager_trajectory(model, opt, loss_fn, batches)
    stepper = unrollc.compile(model, opt, loss_fn)
    state = stepper.init()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            state = stepper.step(state, batch)
            params, buffers, opt_state = ref[i]
            for n in params:
                assert max_rel(state.params[n], params[n]) < tol, (i, n)
            for n in buffers:
                assert max_rel(state.buffers[n], buffers[n]) < tol, (i, n)
            assert set(state.opt_state) == set(opt_state)
            for n, st in opt_state.items():
                assert set(state.opt_state[n]) == set(st), (i, n)
                for k in st:
                    assert max_rel(state.opt_state[n][k], st[k]) < tol, (i, n, k)
                    assert state.opt_state[n][k].dtype == st[k].dtype, (i, n, k)  # ASGD's eta stays float32
                    assert state.opt_state[n][k].device == st[k].device, (i, n, k)  # NAdam's mu_product: CPU
    return stepper, state


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=IDS)
def test_trajectory_float32(cls, kwargs, foreach):
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = cls(model.parameters(), foreach=foreach, **kwargs)
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(30)]
    assert_same_trajectory(model, opt, mse, batches, tol=1e-5)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=IDS)
def test_trajectory_float64(cls, kwargs, float64):
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = cls(model.parameters(), **kwargs)
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(30)]
    assert_same_trajectory(model, opt, mse, batches, tol=1e-10)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=IDS)
def test_hyper_override_is_an_input_not_a_constant(cls, kwargs, float64):
    """One compiled stepper, lr given at init(): the trajectory equals eager torch.optim built with that lr,
    for two different values (a value read once and frozen into the graph, as Rprop's full_like(grad, lr)
    would be, gives the compile-time lr's trajectory instead)."""
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(5)]
    stepper = unrollc.compile(model, cls(model.parameters(), **kwargs), mse)
    for scale in (1.0, 3.0):
        lr = kwargs["lr"] * scale
        ref = eager_trajectory(model, cls(model.parameters(), **{**kwargs, "lr": lr}), mse, batches)
        with torch.no_grad():
            state = stepper.unroll(stepper.init(hyper={"lr": torch.tensor(lr)}), batches)
        params = ref[-1][0]
        for n in params:
            assert max_rel(state.params[n], params[n]) < 1e-10, (lr, n)


def test_two_param_groups_with_different_hyperparameters():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = O.SGD(
        [{"params": model[0].parameters(), "lr": 0.05, "momentum": 0.5}, {"params": model[2].parameters()}],
        lr=0.1,
        momentum=0.9,
    )
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(30)]
    stepper, state = assert_same_trajectory(model, opt, mse, batches, tol=1e-5)
    assert set(state.hyper) >= {"0.lr", "1.lr", "0.momentum", "1.momentum"}
    assert state.hyper["0.lr"].item() == pytest.approx(0.05)


def test_frozen_and_unused_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Net()
    model.a.bias.requires_grad_(False)
    opt = O.Adam(model.parameters(), lr=0.01, weight_decay=0.1)  # weight decay would move unused params
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(10)]
    stepper, state = assert_same_trajectory(model, opt, mse, batches, tol=1e-5)
    assert torch.equal(state.params["unused.weight"], model.unused.weight)
    assert torch.equal(state.params["a.bias"], model.a.bias)
    assert "unused.weight" not in state.opt_state


def test_warm_optimizer_continues_from_its_state():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = O.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        mse(model, (torch.randn(8, 3), torch.randn(8, 2))).backward()
        opt.step()
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(10)]
    stepper, state = assert_same_trajectory(model, opt, mse, batches, tol=1e-5)
    assert state.t == 13
    assert state.opt_state["0.weight"]["step"].item() == 13


def test_init_reads_the_optimizer_as_it_is_now(float64):
    """Compiled first, then trained eagerly with an lr scheduler: init() starts from the optimizer's current
    lr, state and step count (as it does from the model's current weights)."""
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = O.Adam(model.parameters(), lr=0.01)
    stepper = unrollc.compile(model, opt, mse)
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(5)]
    before = stepper.step(stepper.init(), batches[0])  # a state made before the scheduler: no initial_lr
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        mse(model, (torch.randn(8, 3), torch.randn(8, 2))).backward()
        opt.step()
        sched.step()
    assert "initial_lr" not in before.hyper
    state = stepper.init()
    assert state.t == 3 and state.hyper["lr"].item() == pytest.approx(0.00125)
    # the scheduler, made after compile, added initial_lr to the groups (it was missing: found in review)
    assert state.hyper["initial_lr"].item() == 0.01
    assert stepper.step(before, batches[0]).hyper.keys() == before.hyper.keys()  # the older state still steps
    ref = eager_trajectory(model, opt, mse, batches)
    with torch.no_grad():
        state = stepper.unroll(state, batches)
    for n, p in ref[-1][0].items():
        assert max_rel(state.params[n], p) < 1e-12, n


@pytest.mark.parametrize("cls", [O.LBFGS, O.SparseAdam])
def test_refused_optimizers_name_themselves_and_say_why(cls):
    """Adafactor is not refused: its data-dependent reads are rewritten (unrollc.rewrite)."""
    model = nn.Linear(3, 2)
    opt = cls(model.parameters())
    with pytest.raises(unrollc.UnsupportedOptimizerError, match=cls.__name__) as info:
        unrollc.compile(model, opt, mse)
    assert "use" in str(info.value)


class _CountingSGD(torch.optim.Optimizer):
    """A user's optimizer that keeps a Python number in its state (lr / sqrt(k) after k steps)."""

    note = None

    def __init__(self, params, lr=0.1, beta=0.9):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if "buf" not in st:
                    st["buf"], st["k"] = torch.zeros_like(p), 0
                    if self.note is not None:
                        st["note"] = self.note
                st["k"] += 1
                st["buf"].mul_(group["beta"]).add_(p.grad)
                p.add_(st["buf"], alpha=-group["lr"] / st["k"] ** 0.5)


def test_a_number_in_a_custom_optimizers_state_is_carried_as_a_tensor(float64):
    """A fresh custom optimizer's `state["k"] = 0; state["k"] += 1` is carried to the next step (not dropped,
    which made the second step fail or start over), and the trajectory is the eager one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(4)]
    twin = copy.deepcopy(model)
    stepper = unrollc.compile(model, _CountingSGD(model.parameters()), mse)
    state = stepper.init()
    eager = _CountingSGD(twin.parameters())
    for batch in batches:
        state = stepper.step(state, batch)
        eager.zero_grad()
        mse(twin, batch).backward()
        eager.step()
    for n, p in twin.named_parameters():
        torch.testing.assert_close(state.params[n], p.detach(), rtol=1e-12, atol=1e-14)
        assert float(state.opt_state[n]["k"]) == 4 and state.opt_state[n]["k"].dtype == torch.float64
    assert stepper.trace_count == 2  # the first step (no state) and every later one: the carried dtype is stable


class _NotingSGD(_CountingSGD):
    note = "started"


def test_a_non_number_in_a_custom_optimizers_state_is_refused():
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, _NotingSGD(model.parameters()), mse)
    with pytest.raises(unrollc.CaptureError, match=r"_NotingSGD.step\(\) stored 'note' = 'started' \(str\).*Store it as a tensor"):
        stepper.step(stepper.init(), (torch.randn(8, 3), torch.randn(8, 2)))


class _ScaledSGD(torch.optim.Optimizer):
    """Keeps an option as an instance attribute, outside the parameter groups."""

    def __init__(self, params, lr=0.1, scale=1.0):
        super().__init__(params, dict(lr=lr))
        self.scale = scale

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"] * self.scale)


def test_a_custom_optimizers_own_attributes_are_the_users_values(float64):
    """unrollc builds its own instance of the class: `self.scale` was the constructor's default (1.0, not 3.0),
    silently. A value changed after compile is read by init, as the static options are."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(3)]
    opt = _ScaledSGD(model.parameters(), scale=3.0)
    stepper = unrollc.compile(model, opt, mse)
    for scale in (3.0, 0.5):
        opt.scale = scale
        twin = copy.deepcopy(model)  # (not eager_trajectory: deepcopy(opt) drops `scale`, see Optimizer.__getstate__)
        eager = _ScaledSGD(twin.parameters(), scale=scale)
        for batch in batches:
            eager.zero_grad()
            mse(twin, batch).backward()
            eager.step()
        state = stepper.unroll(stepper.init(), batches)
        for n, p in twin.named_parameters():
            torch.testing.assert_close(state.params[n], p.detach(), rtol=1e-12, atol=1e-14)
    assert opt.scale == 0.5 and stepper.trace_count == 2


class _HalvingSGD(torch.optim.SGD):
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            group["lr"] = group["lr"] * 0.5  # an option changed by the step itself


class _HalvingInPlace(torch.optim.SGD):
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            group["lr"] *= 0.5  # in place: the traced lr is a tensor, which keeps its identity


class _CountingAttribute(_ScaledSGD):
    def step(self, closure=None):
        self.scale = self.scale + 1  # an attribute changed by the step itself
        super().step(closure)


@pytest.mark.parametrize("cls, changed", [(_HalvingSGD, r"param_groups\[0\]\['lr'\]"),
                                         (_HalvingInPlace, r"param_groups\[0\]\['lr'\] \(tensor\(0.1000.*\) -> tensor\(0.0500.*\), in place\)"),
                                         (_CountingAttribute, r"self.scale \(1.0 -> 2.0\)")])
def test_a_step_that_changes_its_options_or_attributes_is_refused(cls, changed):
    """Every step used the value the graph was traced with: the halving lr stayed 0.1 (eager's is 0.0125 after
    three steps), silently. ``group["lr"] *= 0.5`` scales the traced lr tensor in place: it was not seen (found
    in review) until the tensors' version counters were compared too."""
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, cls(model.parameters(), lr=0.1), mse)
    with pytest.raises(unrollc.CaptureError, match=rf"{cls.__name__}.step\(\) changes {changed}.*Keep a value that changes per step"):
        stepper.step(stepper.init(), (torch.randn(8, 3), torch.randn(8, 2)))


class _ScratchSGD(torch.optim.Optimizer):
    """Writes in place into a tensor shared by every step (a class attribute), which no step graph can carry."""

    scratch = torch.zeros(())

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                _ScratchSGD.scratch.add_(1.0)
                p.add_(p.grad, alpha=-group["lr"])


def test_an_in_place_write_into_a_tensor_the_optimizer_closes_over_is_refused_with_the_line():
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, _ScratchSGD(model.parameters()), mse)
    with pytest.raises(unrollc.CaptureError, match=r"writes in place \(aten.add_.Tensor\) into a tensor it closes over "
                       r"at .*test_optimizers.py:\d+ in step: _ScratchSGD.scratch.add_\(1.0\).*self.state\[p\]"):
        stepper.step(stepper.init(), (torch.randn(8, 3), torch.randn(8, 2)))


@pytest.mark.parametrize("cls,kwargs,key,value", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "nesterov", True),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "maximize", True),
    (torch.optim.Adam, {"lr": 0.01}, "amsgrad", True),
], ids=["nesterov", "maximize", "amsgrad"])
def test_a_static_option_changed_after_compile_is_read_by_init(cls, kwargs, key, value, float64):
    """init() reads the optimizer as it is now: a static option switched in param_groups after compile (and
    after a step traced the old code path) gives eager torch.optim's trajectory with the new option."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(4)]
    opt = cls(model.parameters(), **kwargs)
    stepper = unrollc.compile(model, opt, mse)
    before = stepper.init()
    stepper.unroll(before, batches)  # traced with the old option
    torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # adds initial_lr to the group after compile
    opt.param_groups[0][key] = value
    ref = eager_trajectory(model, cls(model.parameters(), **kwargs, **{key: value}), mse, batches)
    state = stepper.unroll(stepper.init(), batches)
    for n, p in ref[-1][0].items():
        torch.testing.assert_close(state.params[n], p, rtol=1e-12, atol=1e-14)
    stepper.unroll(before, batches)  # a state from before the change still runs (its hyperparameter keys)


def test_a_tensor_valued_static_option_is_compared_by_identity():
    """Re-reading static options must not compare a tensor option elementwise (`bool(tensor == tensor)`)."""
    class Scaled(torch.optim.SGD):
        def __init__(self, params, lr=0.1, scale=None):
            super().__init__(params, lr=lr)
            for group in self.param_groups:
                group["scale"] = scale

    model = nn.Linear(3, 2)
    opt = Scaled(model.parameters(), scale=torch.ones(3))
    stepper = unrollc.compile(model, opt, mse)
    stepper.init()
    opt.param_groups[0]["scale"] = torch.ones(3)  # equal values, another tensor
    stepper.step(stepper.init(), (torch.randn(8, 3), torch.randn(8, 2)))


@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.Adadelta, {"lr": 1.0}),
    (torch.optim.ASGD, {"lr": 0.05}),
    (torch.optim.ASGD, {"lr": 0.05, "t0": 10}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 0.01}),
    (torch.optim.RAdam, {"lr": 1e-3}),
    (torch.optim.RAdam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    (torch.optim.NAdam, {"lr": 0.01}),
    (torch.optim.Adamax, {"lr": 0.01}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    (torch.optim.Rprop, {"lr": 0.01}),
    (torch.optim.Adafactor, {"lr": 0.02}),
], ids=["SGD-nesterov", "RMSprop-centered-momentum", "Adadelta", "ASGD", "ASGD-t0=10", "Adam", "Adam-amsgrad-wd", "AdamW",
        "RAdam", "RAdam-decoupled", "NAdam", "Adamax", "Adagrad", "Rprop", "Adafactor"])
def test_float32_trajectory_is_bit_identical_on_the_cpu(cls, kwargs):
    """add_(b, alpha=lr) with lr a tensor is traced as addcmul_(b, lr): one rounding, as ATen's add with a
    Python alpha, so 30 float32 steps end exactly where eager torch.optim ends (two roundings drifted by an ulp
    per step, ~3e-5 relative for centered RMSprop). The optimizer state too: ASGD's average is eager's copy of
    the parameters until t0 (it was ax + (p - ax) * 1, an ulp off), and its sum after. Adam's float beta1 keeps
    its double precision in 1 - beta1 (the lifted tensor was cast to float32 first, as for a tensor beta1: ~70 ulps
    after 30 steps). RAdam's ``bias_correction2 ** 0.5 / exp_avg_sq_sqrt`` divides a Python float by a tensor,
    which eager computes as ``reciprocal(tensor) * float`` (an ulp off from step 7 on with lr=1e-3). Adafactor's
    ``param.norm(2).item() / numel ** 0.5``, traced from its rewritten source, divides in double as eager's Python
    float does (in float32 it was an ulp off within 30 steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    assert_bit_identical_to_eager(model, cls, kwargs, [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(30)])


@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.Adam, {"lr": 0.02, "betas": (0.9, 0.99)}),
    (torch.optim.Adam, {"lr": 0.02, "amsgrad": True, "betas": (0.8, 0.99)}),
    (torch.optim.AdamW, {"lr": 0.02, "betas": (0.9, 0.95)}),
    (torch.optim.RAdam, {"lr": 0.02, "betas": (0.9, 0.99)}),
    (torch.optim.NAdam, {"lr": 0.02, "betas": (0.9, 0.99)}),
    (torch.optim.Adamax, {"lr": 0.02, "betas": (0.9, 0.99)}),
    (torch.optim.Adafactor, {"lr": 0.02}),
    (torch.optim.ASGD, {"lr": 0.02, "t0": 20}),
], ids=["Adam", "Adam-amsgrad", "AdamW", "RAdam", "NAdam", "Adamax", "Adafactor", "ASGD"])
def test_float64_trajectory_is_bit_identical_on_the_cpu(cls, kwargs, float64):
    """Eager torch.optim computes ``bias_correction2 ** 0.5`` (Adam, RAdam; Adafactor's ``step ** 0.5``) with Python
    floats, which call C's pow; the traced step computes it on float64 tensors, where ATen's pow with a Python exponent
    takes sqrt (not correctly rounded on this CPU, 1-2% of inputs). The python_pow pass gives those powers a tensor
    exponent (C's pow): with betas=(0.9, 0.99) Adam's parameters were an ulp off eager's from step 42 on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    assert_bit_identical_to_eager(model, cls, kwargs, [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(60)])


def assert_bit_identical_to_eager(model, cls, kwargs, batches):
    """Parameters and optimizer state after stepping ``model`` with unrollc and a copy of it with eager ``cls``."""
    twin = copy.deepcopy(model)
    stepper = unrollc.compile(model, cls(model.parameters(), **kwargs), mse)
    with torch.no_grad():
        state = stepper.unroll(stepper.init(), batches)
    eager = cls(twin.parameters(), **kwargs)
    for batch in batches:
        eager.zero_grad()
        mse(twin, batch).backward()
        eager.step()
    for n, p in twin.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n
        for k, v in eager.state[p].items():
            assert torch.equal(state.opt_state[n][k], v), (n, k)


class _Tempered(nn.Module):
    """A linear layer with a learned temperature: a 0-dim parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 2)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.l(x) / self.temperature


@pytest.mark.parametrize("cls", [O.Rprop, O.SGD, O.Adam])
def test_a_zero_dim_parameter_follows_eager(cls):
    """torch.optim.Rprop writes sign[sign.gt(0)] = etaplus, whose boolean-mask count could not be traced for a
    0-dim tensor (a CaptureError pointing into torch's own code); it is traced as masked_fill_, bit for bit."""
    torch.manual_seed(0)
    model = _Tempered()
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(5)]
    opt = cls(model.parameters(), lr=0.01)
    ref = eager_trajectory(model, opt, mse, batches)
    stepper = unrollc.compile(model, opt, mse)
    with torch.no_grad():
        state = stepper.unroll(stepper.init(), batches)
    for n, p in ref[-1][0].items():
        assert torch.equal(state.params[n], p), n


def test_radam_checks_one_rectification_guard_per_step_and_separate_counters_their_own(float64):
    """RAdam branches on rho_t > 5, computed from each parameter's step counter. The counters unrollc shares are
    one tensor, so the compiled step has one guard on it (checked every step), not one per parameter. Separate
    counters (a warm optimizer whose parameters started at different steps) keep a guard each, and each
    parameter switches its rectification on at its own step, as in eager torch.optim."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(8)]
    stepper, _ = assert_same_trajectory(model, O.RAdam(model.parameters(), lr=0.01), mse, batches, tol=1e-12)
    assert [str(g).count(".step") > 0 for g in stepper._last.guards].count(True) == 1, list(map(str, stepper._last.guards))

    opt = O.RAdam(model.parameters(), lr=0.01)
    mse(model, batches[0]).backward()
    opt.step()
    opt.state[model[0].weight]["step"] = torch.tensor(4.0)  # rho_t > 5 from its 6th step; the others from their 5th
    warm, _ = assert_same_trajectory(model, opt, mse, batches, tol=1e-12)
    assert [str(g).count(".step") > 0 for g in warm._last.guards].count(True) > 1


def test_a_changed_default_dtype_traces_again_as_eager_computes_in_it():
    """ASGD makes its eta and mu in torch's default dtype: a float64 model's eager trajectory differs (~1e-9) between
    default float32 and float64, so a step graph or compiled update traced under one must not serve the other."""
    import unrollc.higher as uh

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)) for _ in range(7)]

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    def eager() -> list[torch.Tensor]:
        m = copy.deepcopy(model)
        opt = O.ASGD(m.parameters(), lr=0.05, t0=2)
        for batch in batches:
            opt.zero_grad()
            loss_fn(m, batch).backward()
            opt.step()
        return [p.detach() for p in m.parameters()]

    stepper = unrollc.compile(model, O.ASGD(model.parameters(), lr=0.05, t0=2), loss_fn)
    previous = torch.get_default_dtype()
    results = {}
    try:
        for dtype in (torch.float64, torch.float32, torch.float64):
            torch.set_default_dtype(dtype)
            expected = eager()
            compiled = stepper.unroll(stepper.init(), batches)
            with uh.innerloop_ctx(model, O.ASGD(model.parameters(), lr=0.05, t0=2)) as (fmodel, diffopt):
                for batch in batches:
                    diffopt.step(loss_fn(fmodel, batch))
                functional = list(fmodel.parameters())
            for p, q, e in zip(compiled.params.values(), functional, expected, strict=True):
                assert torch.equal(p.detach(), e) and torch.equal(q.detach(), e), dtype
            results[dtype] = expected
    finally:
        torch.set_default_dtype(previous)
    assert not all(torch.equal(a, b) for a, b in zip(results[torch.float64], results[torch.float32]))  # it matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_muon_adds_its_bfloat16_update_in_the_parameters_precision(dtype):
    """Muon's Newton-Schulz update is bfloat16; eager adds it with ``param.add_(update, alpha=-lr)``, which ATen
    computes in the parameter's dtype. The traced ``alpha`` tensor had become ``update * -lr`` in bfloat16, which
    rounded the update to 8 bits: 1.5e-5 off after one step, 2e-4 after ten (found in review). Bit for bit now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).to(dtype)
    batches = [(torch.randn(8, 4, dtype=dtype), torch.randn(8, 3, dtype=dtype)) for _ in range(10)]
    opt = O.Muon(model.parameters(), lr=1e-2)
    ref = eager_trajectory(model, opt, mse, batches)
    stepper = unrollc.compile(model, opt, mse)
    state = stepper.init()
    for batch, (params, _, opt_state) in zip(batches, ref, strict=True):
        state = stepper.step(state, batch)
        assert all(torch.equal(state.params[n], p) for n, p in params.items())
        assert all(torch.equal(state.opt_state[n][k], v) for n, st in opt_state.items() for k, v in st.items())


def _clipped_sgd(seed: int = 1):
    """A model and an SGD whose step hooks clip the weights after each step (WGAN), reading the model it closes
    over, and scale the gradients before it, reading the optimizer it is given."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)

    def scale(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad.mul_(0.5)

    def clip(opt, args, kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.05, 0.05)

    opt.register_step_pre_hook(scale)
    opt.register_step_post_hook(clip)
    return model, opt


def test_the_optimizers_step_hooks_run_in_every_step(float64):
    """Step hooks of the optimizer (register_step_pre_hook / register_step_post_hook) are part of its step: they
    were silently left out (eager max |w| 0.05 after clipping, unrollc 0.64)."""
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(5)]
    model, opt = _clipped_sgd()
    for batch in batches:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    compiled_model, compiled_opt = _clipped_sgd()
    stepper = unrollc.compile(compiled_model, compiled_opt, mse)
    state = stepper.unroll(stepper.init(), batches)
    assert model.weight.abs().max() == 0.05
    assert torch.equal(state.params["weight"], model.weight) and torch.equal(state.params["bias"], model.bias)
    assert not torch.equal(compiled_model.weight, model.weight)  # the user's model is not stepped


class _AssignedData(HandWritten):
    """An old-style SGD: ``p.data = p.data - lr * p.grad.data``."""

    def update(self, p, st, group):
        p.data = p.data - group["lr"] * p.grad.data


class _ResizedData(HandWritten):
    def update(self, p, st, group):
        p.data = p.data.double()


def test_an_optimizer_assigning_data_updates_the_weights(float64):
    """``p.data = new`` in step() left every weight unchanged, silently; it writes the new values into the
    weights, and the meta-gradient goes through them. Another dtype or shape is refused with the fix."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(5)]
    expected = eager_trajectory(model, _AssignedData(model.parameters()), mse, batches)[-1][0]
    reference = eager_trajectory(model, torch.optim.SGD(model.parameters(), lr=0.1), mse, batches)[-1][0]
    stepper = unrollc.compile(model, _AssignedData(model.parameters()), mse)
    lr = torch.tensor(0.1, requires_grad=True)
    state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches)
    assert torch.equal(state.params["weight"], expected["weight"])
    sgd = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    lr_sgd = torch.tensor(0.1, requires_grad=True)
    same = sgd.unroll(sgd.init(hyper={"lr": lr_sgd}), batches)
    torch.testing.assert_close(same.params["weight"], reference["weight"])
    (got,) = torch.autograd.grad(state.params["weight"].sum(), lr)
    (want,) = torch.autograd.grad(same.params["weight"].sum(), lr_sgd)
    torch.testing.assert_close(got, want)
    torch.manual_seed(0)
    other = nn.Linear(3, 1).float()
    stepper = unrollc.compile(other, _ResizedData(other.parameters()), mse)
    with pytest.raises(unrollc.CaptureError, match=r"assigns `.data` .* torch.float32 .* p.copy_\(new\)"):
        stepper.step(stepper.init(), (batches[0][0].float(), batches[0][1].float()))


class _GlobalCounter(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1, where="state"):
        super().__init__(params, {"lr": lr})
        self.where = where

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if self.where == "state":
                counter = self.state["global"]
                counter["t"] = counter.get("t", 0) + 1
                t = counter["t"]
            else:
                group["t"] = group.get("t", 0) + 1
                t = group["t"]
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"] / t)


@pytest.mark.parametrize("where", ["state", "group"])
def test_a_counter_kept_outside_the_parameters_state_is_refused(where):
    """``self.state["global"]["t"] += 1`` and a group key made by step() (``g["t"] = g.get("t", 0) + 1``) are not
    carried from step to step: every step ran with t = 1, silently (0.32 off eager after 5 steps)."""
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, _GlobalCounter(model.parameters(), where=where), mse)
    said = r"keeps state under 'global', which is not one of its parameters" if where == "state" else r"changes param_groups\[0\]\['t'\] \(not set -> 1\)"
    with pytest.raises(unrollc.CaptureError, match=said):
        stepper.step(stepper.init(), (torch.randn(4, 3), torch.randn(4, 1)))


class _LegacyAdamW(HandWritten):
    """transformers' legacy AdamW: the bias correction through math.sqrt on Python numbers."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6):
        super().__init__(params, lr=lr, betas=betas, eps=eps)

    def update(self, p, state, group):
        import math

        if len(state) == 0:
            state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)


def test_a_learned_hyperparameter_read_into_python_is_pointed_out_and_a_counter_read_so_is_explained():
    """A learned beta2 read through math.sqrt loses that path's meta-gradient (9.04 where finite differences give
    0.0048): warned at the optimizer's line. The step counter read so needs a graph per step: past 16, the
    refusal says why and how to fix it (it called that a branch)."""
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, _LegacyAdamW(model.parameters()), mse)
    batches = [(torch.randn(5, 3), torch.randn(5, 1)) for _ in range(20)]
    beta2 = torch.tensor(0.999, requires_grad=True)
    with pytest.warns(UserWarning, match=r"reads the learned hyperparameter 'betas.1' into a Python float at .*test_optimizers.py:\d+ \(`step_size = "):
        stepper.step(stepper.init(hyper={"betas": (torch.tensor(0.9), beta2)}), batches[0])
    with pytest.warns(UserWarning, match="re-tracing"), pytest.raises(RuntimeError, match=r"reads such a value into a Python number .*torch.sqrt"):
        stepper.unroll(stepper.init(), batches)


class _DecayedSGD(torch.optim.SGD):
    """Registers its own step hook in __init__ (decoupled decay after each step)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)
        self.register_step_post_hook(_DecayedSGD._decay)

    @staticmethod
    def _decay(opt, args, kwargs):
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.mul_(0.9)


class _ConfiguredSGD(HandWritten):
    """Keeps a read-only configuration in its state under a key that is not a parameter."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)
        self.state["config"] = {"scale": 0.5}

    def update(self, p, st, group):
        p.add_(p.grad, alpha=-group["lr"] * self.state["config"]["scale"])


class _ClosureHookSGD(torch.optim.SGD):
    """Registers a lambda (a new function per instance) and a functools.partial as step hooks in __init__."""

    def __init__(self, params, lr=0.1):
        import functools

        super().__init__(params, lr=lr)
        self.register_step_post_hook(lambda opt, args, kwargs: _ClosureHookSGD._decay(opt, 0.9))
        self.register_step_post_hook(functools.partial(lambda opt, args, kwargs, f: _ClosureHookSGD._decay(opt, f), f=0.95))

    @staticmethod
    def _decay(opt, factor):
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.mul_(factor)


@pytest.mark.parametrize("opt_cls", [_DecayedSGD, _ClosureHookSGD, _ConfiguredSGD])
def test_hooks_and_state_an_optimizers_own_init_makes(opt_cls, float64):
    """Found in review: a hook the constructor registers ran twice (the rebuilt optimizer's constructor registers
    it again; a lambda or partial is a new object per instance, matched by its code); state the constructor keeps
    under a non-parameter key, and the step only reads, was refused."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    eager = copy.deepcopy(model)  # the oracle's deepcopy of an optimizer drops its hooks: built anew here
    eager_opt = opt_cls(eager.parameters())
    for batch in batches:
        eager_opt.zero_grad()
        mse(eager, batch).backward()
        eager_opt.step()
    stepper = unrollc.compile(model, opt_cls(model.parameters()), mse)
    state = stepper.unroll(stepper.init(), batches)
    for name, p in eager.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_a_step_hook_reaching_the_users_optimizer_is_refused_and_the_model_put_back():
    """A hook looping over the optimizer it closes over (not the one it is passed) clamped the real weights while
    the step was traced, then failed with torch's "leaf Variable ... in-place"."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)

    def clip(_, args, kwargs):
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.clamp_(-0.01, 0.01)

    opt.register_step_post_hook(clip)
    weight = model.weight.detach().clone()
    stepper = unrollc.compile(model, opt, mse)
    with pytest.raises(unrollc.CaptureError, match=r"wrote into the model's own tensors \(weight, bias\) \(put back\).*"
                       r"optimizer step hook looping over the optimizer it closes over"):
        stepper.step(stepper.init(), (torch.randn(4, 3), torch.randn(4, 1)))
    assert torch.equal(model.weight, weight)


class _SharedGradient(nn.Module):
    """``x * (a + b)``: autograd hands a and b one gradient tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return (x * (self.a + self.b)).sum(1, keepdim=True)


class _DecayIntoGradient(HandWritten):
    """The classic hand-written weight decay: added into p.grad in place."""

    def __init__(self, params, lr=0.1, weight_decay=0.5):
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    def update(self, p, st, group):
        p.grad.add_(p, alpha=group["weight_decay"])
        p.add_(p.grad, alpha=-group["lr"])


def test_parameters_sharing_one_gradient_tensor_get_their_own(float64):
    """The step set p.grad to the one tensor for both, so the decay written into a's gradient changed b's (0.08 off
    eager after one step); eager backward() gives each parameter its own .grad."""
    torch.manual_seed(0)
    model = _SharedGradient()
    batches = [(torch.randn(5, 3), torch.randn(5, 1)) for _ in range(3)]
    ref = eager_trajectory(model, _DecayIntoGradient(model.parameters()), mse, batches)
    stepper = unrollc.compile(model, _DecayIntoGradient(model.parameters()), mse)
    state = stepper.unroll(stepper.init(), batches)
    for name, p in ref[-1][0].items():
        assert torch.equal(state.params[name], p), name


def _two_names_one_buffer(p, grad, st, lr):
    if "a" not in st:
        st["a"] = torch.zeros_like(p)
        st["b"] = st["a"]
    st["a"].mul_(0.9).add_(grad)
    p.add_(st["b"], alpha=-lr)


def _state_is_the_parameter(p, grad, st, lr):
    if "anchor" not in st:
        st["anchor"] = p
    p.add_(grad, alpha=-lr).add_(p - st["anchor"], alpha=0.5)


def _rows_of_one_tensor(p, grad, st, lr):
    if "both" not in st:
        st["both"] = torch.zeros(2, *p.shape)
        st["m"], st["v"] = st["both"][0], st["both"][1]
    st["m"].mul_(0.9).add_(grad)
    st["v"].mul_(0.99).add_(grad * grad)
    p.add_(st["both"][0] / (st["both"][1].sqrt() + 1e-8), alpha=-lr)


@pytest.mark.parametrize("body", [_two_names_one_buffer, _state_is_the_parameter, _rows_of_one_tensor])
def test_optimizer_state_sharing_memory_is_refused(body):
    """Entries of one parameter's state sharing memory (with each other or the parameter) became separate graph
    inputs after the first step, silently (0.13-0.38 off eager): refused at the step that would lose it."""

    class Shared(HandWritten):
        def update(self, p, st, group):
            body(p, p.grad, st, group["lr"])

    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, Shared(model.parameters()), mse)
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    state = stepper.step(stepper.init(), batch)  # the first step makes the state: traced with its sharing
    with pytest.raises(unrollc.CaptureError, match=r"state of parameter '\w+' keeps .* in the same memory"):
        stepper.step(state, batch)
