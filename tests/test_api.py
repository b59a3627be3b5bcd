"""The public API is small, explicit and documented."""

import copy
import inspect
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import unrollc


def test_public_names_exist_and_are_documented():
    for name in unrollc.__all__:
        obj = getattr(unrollc, name)
        assert obj.__doc__, name
    sig = inspect.signature(unrollc.compile)
    assert list(sig.parameters)[:3] == ["model", "opt", "loss_fn"]


def test_public_type_hints_resolve():
    """typing.get_type_hints on every public function and method (sphinx, typeguard and pydantic read them):
    ``Stepper`` was imported only for type checkers in two modules (found in review)."""
    import typing

    import unrollc.higher
    import unrollc.inspect

    def public(module):
        for name in module.__all__:
            obj = getattr(module, name)
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and callable(getattr(member, "__func__", member)):
                        yield f"{module.__name__}.{name}.{attr}", getattr(member, "__func__", member)

    checked = 0
    for label, obj in (item for module in (unrollc, unrollc.higher, unrollc.inspect) for item in public(module)):
        if inspect.isfunction(obj) or inspect.ismethod(obj):
            try:
                typing.get_type_hints(obj)
            except NameError as e:
                raise AssertionError(f"{label}: {e}") from e
            checked += 1
    assert checked > 30


def test_stepper_methods_match_the_contract():
    for name in ("init", "step", "unroll", "forward"):
        assert callable(getattr(unrollc.Stepper, name))
    assert isinstance(inspect.getattr_static(unrollc.Stepper, "graph"), property)
    params = inspect.signature(unrollc.Stepper.unroll).parameters
    assert params["checkpoint"].kind is inspect.Parameter.KEYWORD_ONLY


def test_trace_makes_the_graph_without_running_a_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state = stepper.init()
    stats = state.buffers["1.running_mean"].clone()
    calls = []
    step = stepper._step  # where every step runs (Stepper.step and Stepper.unroll)
    stepper._step = lambda *a: calls.append(1) or step(*a)  # type: ignore[method-assign]
    gm = stepper.trace(state, torch.randn(5, 3))
    assert isinstance(gm, torch.fx.GraphModule) and stepper.graph is gm and not calls
    assert torch.equal(state.buffers["1.running_mean"], stats) and state.t == 0
    assert stepper.trace(state, torch.randn(5, 3)) is gm and stepper.trace_count == 1  # same layout: cached
    assert "Adam" in str(unrollc.explain(stepper))


def test_state_fields_and_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state = stepper.init()
    assert list(state.params) == [n for n, _ in model.named_parameters()]
    assert list(state.buffers) == [n for n, _ in model.named_buffers()]
    assert state.t == 0 and state.opt_state == {}
    assert set(state.hyper) == {"lr", "betas", "eps", "weight_decay"}
    assert isinstance(state.hyper["lr"], torch.Tensor) and isinstance(state.hyper["betas"], tuple)
    state = stepper.step(state, torch.randn(5, 3))
    assert state.t == 1 and set(state.opt_state["0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert isinstance(stepper.graph, torch.fx.GraphModule)
    out = stepper.forward(state, torch.randn(5, 3))
    assert out.shape == (5, 4)


def test_wrong_inputs_are_refused_with_the_api_and_the_fix():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batch = (torch.randn(5, 4), torch.randn(5, 1))
    linear = nn.Linear(4, 1)
    other = unrollc.compile(linear, torch.optim.SGD(linear.parameters(), lr=0.1), lambda m, b: m(b).sum())
    cases = [
        (lambda: stepper.init(params={"0.weight": torch.randn(3, 3)}), ValueError, r"params\['0.weight'\] has shape \(3, 3\) but the model's has \(8, 4\)"),
        (lambda: stepper.init(params=[torch.randn(8, 4)]), TypeError, "expected `params` to be a mapping"),
        (lambda: stepper.init(params={"0.weight": torch.zeros(8, 4, dtype=torch.long)}), TypeError,
         r"params\['0.weight'\] has dtype torch.int64 but the model's is torch.float32"),
        (lambda: stepper.init(hyper={"lr": [0.1]}), TypeError, "'lr' must be a float or a 0-dim tensor, got list"),
        (lambda: stepper.init(hyper={"lr": torch.tensor([0.1, 0.2])}), ValueError, "'lr' must be a scalar .* shape \\(2,\\)"),
        (lambda: stepper.step({"params": {}}, batch), TypeError, "Stepper.step: expected an UnrollState"),
        (lambda: stepper.unroll(stepper.init(), 5), TypeError, "Stepper.unroll: expected `batches`, an iterable"),
        (lambda: stepper.forward(other.init(), batch[0]), ValueError, "not those of this stepper's model"),
        (lambda: unrollc.explain(model), TypeError, "unrollc.explain: expected the Stepper"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    one_argument = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda b: b[0].sum())
    with pytest.raises(TypeError, match=r"loss_fn must accept \(model, batch, \*meta\)"):
        one_argument.step(one_argument.init(), batch)
    weighted = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b, w: (w * m(b[0])).sum())
    with pytest.raises(TypeError, match=r"missing a required argument: 'w'\); pass the meta arguments it takes after "
                       r"the batch: stepper.step\(state, batch, \*meta\)"):
        weighted.step(weighted.init(), batch)
    with pytest.raises(TypeError, match=r"'sqrt' looks like a checkpoint schedule: `checkpoint` is keyword-only"):
        stepper.unroll(stepper.init(), [batch], "sqrt")
    assert stepper.init(hyper={"lr": torch.tensor([0.05])}).hyper["lr"].shape == ()  # one element: a scalar
    adagrad = unrollc.compile(model, torch.optim.Adagrad(model.parameters(), lr=0.1), lambda m, b: m(b[0]).sum())
    with pytest.raises(ValueError, match="reads 'initial_accumulator_value' only in its constructor"):
        adagrad.init(hyper={"initial_accumulator_value": 1.0})
    hyper = adagrad.init().hyper  # unchanged, it round-trips (it was refused)
    assert set(adagrad.init(hyper=hyper).hyper) == set(hyper)
    with pytest.raises(ValueError, match="reads 'initial_accumulator_value' only in its constructor"):
        adagrad.init(hyper={"initial_accumulator_value": hyper["initial_accumulator_value"].clone().requires_grad_()})


def test_a_state_with_changed_hyperparameters_is_checked():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    stepper = unrollc.compile(model, opt, lambda m, b: m(b).pow(2).mean())
    state, batch = stepper.init(), torch.randn(4, 3)
    cases = [  # a state changed with replace(hyper=...): a lost key would silently step with another value
        ({"lr": state.hyper["lr"]}, ValueError, r"Stepper.step: the state's hyperparameters are not SGD's: missing \['dampening', 'momentum', 'weight_decay'\]"),
        ({**state.hyper, "lrr": torch.tensor(0.1)}, ValueError, r"unknown \['lrr'\] .*state.replace\(hyper=\{\*\*state.hyper"),
        ({**state.hyper, "lr": 0.3}, TypeError, r"hyperparameter 'lr' in the state is 0.3, a float; .*torch.tensor"),
        ({**state.hyper, "2.lr": torch.tensor(0.1)}, KeyError, r"Stepper.step: hyperparameter '2.lr' names parameter group 2, .* use '0.lr' or a bare 'lr'"),
    ]
    for hyper, error, match in cases:
        with pytest.raises(error, match=match):
            stepper.step(state.replace(hyper=hyper), batch)
        with pytest.raises(error, match=match.replace("Stepper.step", "Stepper.unroll")):
            stepper.unroll(state.replace(hyper=hyper), [batch])
    lr = torch.tensor(0.3, requires_grad=True)  # changing a value, keeping the keys, is how to set one
    new = stepper.step(state.replace(hyper={**state.hyper, "lr": lr}), batch)
    ref = stepper.step(stepper.init(hyper={"lr": 0.3}), batch)
    assert torch.equal(new.params["weight"], ref.params["weight"]) and new.params["weight"].grad_fn is not None
    with pytest.raises(TypeError, match=r"e.g. \{'lr': torch.tensor"):
        stepper.init(hyper=0.1)
    with pytest.raises(RuntimeError, match=r"stepper.trace\(state, batch\)"):
        unrollc.compile(model, opt, lambda m, b: m(b).sum()).graph
    with pytest.raises(KeyError, match=r"no graph 'after functionalise'; the keys are \['captured'"):
        stepper.graphs["after functionalise"]  # noqa: B018
    assert stepper.graphs["after functionalize"] is not None


def test_an_error_in_loss_fn_notes_the_batch_it_got():
    model = nn.Linear(4, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    with pytest.raises(RuntimeError) as info:  # one batch passed where unroll wants a list of batches
        stepper.unroll(stepper.init(), (x, y))
    assert any("batch = Tensor(5, 1)" in note and "one batch per step" in note for note in info.value.__notes__)


def test_a_batch_with_other_strides_gets_its_own_graph():
    """A graph traced on a contiguous batch may view it; a channels_last batch of the same shape cannot be
    viewed that way, so the layout (strides included) selects the graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    x = torch.randn(2, 3, 8, 8)
    state = stepper.step(stepper.init(), x)
    last = stepper.step(state, x.to(memory_format=torch.channels_last))
    ref = stepper.step(state, x)
    assert stepper.trace_count == 2
    for name in ref.params:
        assert torch.allclose(last.params[name], ref.params[name], atol=1e-6)


def test_an_autograd_gradient_inside_loss_fn_is_refused_with_the_torch_func_way():
    model = nn.Linear(4, 1)

    def penalty(m, b):
        x = b.clone().requires_grad_()
        gx, = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        return m(x).pow(2).mean() + gx.pow(2).mean()

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), penalty)
    with pytest.raises(unrollc.CaptureError, match=r"write that inner derivative with torch.func"):
        stepper.step(stepper.init(), torch.randn(5, 4))


def test_freezing_a_layer_after_compile_takes_effect_as_in_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stepper = unrollc.compile(model, opt, lambda m, b: m(b).pow(2).mean())
    x = torch.randn(8, 4)
    model[0].requires_grad_(False)
    state = stepper.init()
    frozen = stepper.step(state, x)
    assert torch.equal(frozen.params["0.weight"], model[0].weight) and "0.weight" not in frozen.opt_state
    assert not torch.equal(frozen.params["2.weight"], model[2].weight)
    model[0].requires_grad_(True)
    thawed = stepper.step(state, x)
    eager = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).pow(2).mean().backward()
    eager.step()
    assert torch.allclose(thawed.params["0.weight"], model[0].weight, atol=1e-7)


def test_python_values_the_graph_read_are_guarded_and_reassigned_buffers_advance():
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)
            self.scale = 1.0
            self.register_buffer("ema", torch.zeros(2))

        def forward(self, x):
            out = self.l(x) * self.scale
            self.ema = 0.9 * self.ema + 0.1 * out.detach().mean(0)  # re-assigned, not updated in place
            return out

    config = {"T": 1.0}
    offset = torch.tensor(0.0)

    def loss_fn(m, b):
        return ((m(b) - offset) / config["T"]).pow(2).mean()

    model = Scaled()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    x = torch.randn(5, 3)

    def eager_loss() -> float:
        return loss_fn(model, x).item()

    def ours() -> "unrollc.UnrollState":
        return stepper.step(stepper.init(), x)

    state = ours()
    assert torch.allclose(state.buffers["ema"], 0.1 * (model.l(x) * model.scale).detach().mean(0))
    assert torch.equal(model.ema, torch.zeros(2))  # the model itself is not modified
    for change in (lambda: setattr(model, "scale", 3.0), lambda: config.update(T=2.0),
                   lambda: globals().update(_unused=None)):
        change()
        model.ema = torch.zeros(2)
        assert ours().loss.item() == pytest.approx(eager_loss(), rel=1e-6)
    offset = torch.tensor(1.0)  # noqa: F841 - a closure variable re-bound to another tensor
    assert ours().loss.item() == pytest.approx(eager_loss(), rel=1e-6)
    traces = stepper.trace_count
    ours()
    assert stepper.trace_count == traces  # nothing changed: the graph is reused


@pytest.mark.filterwarnings("ignore:unrollc. the model's forward assigns")
def test_attributes_the_forward_writes_do_not_retrace_every_step():
    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.calls, self.scale = nn.Linear(3, 2), 0, 2.0

        def forward(self, x):
            self.calls += 1  # written by every forward: not a value the graph is keyed on
            out = self.l(x) * self.scale
            self.last = out.detach()
            return out

    model = Recording()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state, x = stepper.init(), torch.randn(4, 3)
    for _ in range(5):
        state = stepper.step(state, x)
    stepper.unroll(state, [x] * 5)
    assert stepper.trace_count == 1  # tracing puts the written attributes back, so the key does not move
    assert model.calls == 0 and not hasattr(model, "last")
    model.scale = 3.0  # read, never written, by the forward: still re-traces
    stepper.step(state, x)
    assert stepper.trace_count == 2


mean = 0  # a global that shares its name with an attribute loss_fn reads (.mean()): not a guard


def test_the_value_guard_reads_globals_not_attribute_names_and_holds_tensors():
    global mean  # noqa: PLW0603
    model = nn.Linear(3, 1)
    model.temp = torch.tensor(2.0)

    def loss_fn(m, b):
        return (m(b) / float(m.temp)).pow(2).mean()

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    x = torch.randn(4, 3)
    stepper.step(stepper.init(), x)
    for i in range(3):
        mean = i  # `mean` is only an attribute name in loss_fn: no re-trace
        stepper.step(stepper.init(), x)
    assert stepper.trace_count == 1
    old = id(model.temp)
    model.temp = torch.tensor(4.0)  # re-bound; the key holds the old tensor, so its id is not reused
    loss = stepper.step(stepper.init(), x).loss
    assert id(model.temp) != old and stepper.trace_count == 2
    assert loss.item() == pytest.approx((model(x) / 4.0).pow(2).mean().item(), rel=1e-6)


def test_the_config_of_a_loss_object_is_guarded_like_a_closure():
    class Weighted:
        def __init__(self):
            self.alpha = 1.0

        def __call__(self, m, b):
            return m(b).pow(2).mean() * self.alpha

        def method(self, m, b):
            return m(b).pow(2).mean() * self.alpha

    x = torch.randn(4, 3)
    for make in (lambda loss: loss, lambda loss: loss.method):
        loss = Weighted()
        model = nn.Linear(3, 1)
        stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), make(loss))
        before = stepper.step(stepper.init(), x).loss
        loss.alpha = 3.0
        assert stepper.step(stepper.init(), x).loss.item() == pytest.approx(3 * before.item(), rel=1e-6)


def test_reprs_are_short_and_say_what_they_hold():
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).sum())
    assert repr(stepper) == "Stepper(Linear + Adam, loss_fn=test_reprs_are_short_and_say_what_they_hold.<locals>.<lambda>, 0 step graphs traced)"
    state = stepper.step(stepper.init(), torch.randn(2, 3))
    assert repr(stepper).endswith(", 1 step graph traced)")
    cost = repr(unrollc.CostModel.from_stepper(stepper, state, torch.randn(2, 3)))
    assert cost.startswith("CostModel(state_bytes=52, ") and "DiGraph" not in cost  # the shared counter once


def test_values_of_the_wrong_kind_are_refused():
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match=r"unrollc.compile: expected `check` as True or False, got 'yes'"):
        unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum(), check="yes")
    state = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum()).init()
    with pytest.raises(TypeError, match=r"UnrollState.replace: no field 'bogus'; the fields are params, buffers"):
        state.replace(bogus=1)
    with pytest.raises(TypeError, match=r"expected `t`, the number of steps taken, as an int >= 0, got 'a'"):
        state.replace(t="a")
    assert state.replace(t=3).t == 3


def test_a_python_attribute_the_forward_assigns_is_put_back_and_pointed_out():
    """``self.calls += 1`` in forward: steps run the traced graph, not the forward. Tracing ran the forward
    several times and left model.calls at 4 after 6 steps, silently; it is now put back, with a warning."""

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            self.last = x.shape[0]  # a new attribute
            return self.l(x) * (1 + 0.1 * self.calls)

    model = Counting()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    with pytest.warns(UserWarning, match=r"the model's forward assigns calls, last \(a Python attribute\).*register_buffer"):
        state = stepper.step(stepper.init(), torch.randn(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        stepper.unroll(state, [torch.randn(5, 3) for _ in range(3)])
    assert model.calls == 0 and not hasattr(model, "last")


def test_a_tensor_the_forward_carries_between_calls_is_pointed_out():
    """``self.h = out.detach()`` carried to the next call (truncated-BPTT style): every step reads the value traced,
    so it is pointed out as for a counter (it was silent for tensors)."""

    class Carrying(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)
            self.h = torch.zeros(4, 1)

        def forward(self, x):
            out = self.l(x) + 0.5 * self.h
            self.h = out.detach()
            return out

    model = Carrying()
    h = model.h
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    with pytest.warns(UserWarning, match=r"the model's forward assigns h \(a Python attribute\).*register_buffer"):
        stepper.step(stepper.init(), torch.randn(4, 3))
    assert model.h is h


def test_a_replaced_layer_or_forward_is_traced_again():
    """A layer without parameters replaced (Tanh -> Sigmoid), or a forward set on an instance, after the first
    step: the next steps run the new code, as in eager training (they ran the traced graph, silently)."""
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    batches = [(torch.randn(6, 5), torch.randn(6, 2)) for _ in range(5)]
    changes = [lambda m: m.__setitem__(1, nn.Sigmoid()), lambda m: setattr(m[1], "forward", torch.sigmoid),
               lambda m: setattr(m[1], "__class__", nn.Softsign)]
    for change in changes:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
        eager = copy.deepcopy(model)
        stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
        opt = torch.optim.SGD(eager.parameters(), lr=0.1)
        state = stepper.init()
        for i, b in enumerate(batches):
            if i == 2:
                change(model)
                change(eager)
            state = stepper.step(state, b)
            opt.zero_grad()
            loss_fn(eager, b).backward()
            opt.step()
        assert stepper.trace_count == 2
        for n, p in eager.named_parameters():
            assert torch.equal(state.params[n], p), n


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_hook_based_weight_norm_assigns_its_weight_without_a_warning():
    model = nn.utils.weight_norm(nn.Linear(3, 2))
    weight = model.weight
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*weight_norm is deprecated.*")
        stepper.step(stepper.init(), torch.randn(5, 3))
    assert model.weight is weight


@pytest.mark.parametrize("checkpoint", [None, "sqrt", 2, "binomial"])
def test_a_loader_that_refills_its_tensors_is_read_per_step_or_refused(checkpoint, float64):
    """A loader that copies each batch into the same tensors (a prefetcher, a ring buffer): the plain unroll
    reads one batch per step, as a step() loop does, so the trajectory is the list's; a checkpointed one must
    read every batch first (and again in the backward pass), so it refuses instead of running every step on
    the last batch's values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                              lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(5)]
    x, y = torch.empty(4, 3), torch.empty(4, 2)

    def loader():
        for xb, yb in batches:
            x.copy_(xb), y.copy_(yb)
            yield x, y

    if checkpoint is not None:
        with pytest.raises(unrollc.BatchModifiedError, match=r"Stepper.unroll: a tensor of batch 0 .* changed in place .*clone\(\)") as info:
            stepper.unroll(stepper.init(), loader(), checkpoint=checkpoint)
        # a ValueError (the batches are wrong) and a RuntimeError, as eager autograd's error for a saved tensor
        # changed in place, so code written for either catches it
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
        return
    ref = stepper.unroll(stepper.init(), batches)
    got = stepper.unroll(stepper.init(), loader())
    assert all(torch.equal(got.params[k], ref.params[k]) for k in ref.params)
    assert torch.equal(torch.stack(got.losses), torch.stack(ref.losses))
    # A generator's length is known only at its end: per-step hyperparameters are counted as the steps run.
    lr = [{"lr": 0.1}] * 5
    assert torch.equal(stepper.unroll(stepper.init(), iter(batches), hyper=lr).params["0.weight"], ref.params["0.weight"])
    for entries, said in ((4, "4 entries for more than 4 batches"), (6, "6 entries for 5 batches")):
        with pytest.raises(ValueError, match=said):
            stepper.unroll(stepper.init(), iter(batches), hyper=[{}] * entries)


@pytest.mark.parametrize("draw", ["random", "numpy"])
def test_python_or_numpy_randomness_in_the_step_is_warned_about(draw):
    """A draw from Python's ``random`` or numpy's global generator runs once, while the step is traced, and every
    step replays it (mixup's ``np.random.beta``): silently baked in, it made training differ from eager (found in
    review). torch's random ops draw every step and are not warned about."""
    import random

    np = pytest.importorskip("numpy")
    model = nn.Linear(4, 2)
    batches = [(torch.randn(6, 4), torch.randn(6, 2)) for _ in range(3)]

    def mixup(m, b, lam):
        x, y = b
        perm = torch.randperm(x.shape[0])
        return ((m(lam * x + (1 - lam) * x[perm]) - (lam * y + (1 - lam) * y[perm])) ** 2).mean()

    baked = {"random": lambda: random.betavariate(0.4, 0.4), "numpy": lambda: float(np.random.beta(0.4, 0.4))}[draw]
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: mixup(m, b, baked()))
    name = {"random": "Python's `random`", "numpy": "numpy's global generator"}[draw]
    with pytest.warns(UserWarning, match=f"drew from {re.escape(name)}.*Draw with torch instead") as record:
        stepper.unroll(stepper.init(), batches)
    ours = [w for w in record if "Draw with torch instead" in str(w.message)]
    assert ours[0].filename == __file__  # points at the user's line
    def beta():  # Beta(0.4, 0.4) from Gamma draws; Beta's own sampler is refused, with this fix
        x, y = (torch.distributions.Gamma(torch.tensor(0.4), torch.tensor(1.0), validate_args=False).sample()
                for _ in range(2))
        return x / (x + y)

    torched = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: mixup(m, b, beta()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torched.unroll(torched.init(), batches)
    refused = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, b: mixup(m, b, torch.distributions.Beta(0.4, 0.4, validate_args=False).sample()))
    with pytest.raises(unrollc.CaptureError, match=r"Dirichlet's, which Beta samples through.* x / \(x \+ y\)"):
        refused.step(refused.init(), batches[0])


def test_distributions_and_packed_sequences_are_refused_with_their_fixes():
    """Both read values into Python inside torch: the generic "compute it with torch.where" could not be applied
    there (found in review). The messages name the cause and a fix the user can apply."""
    from oracles import eager_trajectory
    from torch.nn.utils.rnn import pack_padded_sequence

    class Vae(nn.Module):
        def __init__(self, validate):
            super().__init__()
            self.enc, self.validate = nn.Linear(4, 4), validate

        def forward(self, x):
            mu, raw = self.enc(x).chunk(2, dim=1)
            scale = nn.functional.softplus(raw) + 1e-3
            return torch.distributions.Normal(mu, scale, validate_args=self.validate).rsample()

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 5, batch_first=True)

        def forward(self, x):
            return self.rnn(pack_padded_sequence(x, [4, 2, 3], batch_first=True, enforce_sorted=False))[1][-1]

    def loss(m, b):
        return m(b).pow(2).mean()

    model = Vae(None)
    vae = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss)
    with pytest.raises(unrollc.CaptureError, match=r"torch.distributions read a value into Python, most likely its argument checks .* validate_args=False"):
        vae.step(vae.init(), torch.randn(5, 4))
    model = Vae(False)
    fine = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss)
    torch.manual_seed(0)
    ours = fine.step(fine.init(), torch.randn(5, 4)).params["enc.weight"]
    torch.manual_seed(0)
    ref = eager_trajectory(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, [torch.randn(5, 4)])[-1][0]
    assert torch.equal(ours, ref["enc.weight"])  # the draw is traced: eager's under the same seed
    model = Packed()
    packed = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss)
    with pytest.raises(unrollc.CaptureError, match=r"an RNN over a PackedSequence .* run the RNN on the padded batch"):
        packed.step(packed.init(), torch.randn(3, 4, 3))


def test_a_batch_that_hides_its_tensors_in_an_object_is_refused_with_the_fix():
    """A dataclass batch failed with a bare ``TypeError: unhashable type``; another object holding tensors was
    traced anew every step with its tensors as constants, which no gradient reaches (found in review). Registered
    as a pytree node, a dataclass batch is flattened like a tuple: one graph, gradients to its tensors."""
    import dataclasses

    from torch.utils._pytree import register_dataclass

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        y: torch.Tensor

    class Holder:
        def __init__(self, x, y):
            self.x, self.y = x, y

    model = nn.Linear(4, 2)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, b: ((m(b.x) - b.y) ** 2).mean())
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    with pytest.raises(TypeError, match=r"the batch holds an instance of .*Batch.*register_dataclass\(.*Batch\)"):
        stepper.step(stepper.init(), Batch(x, y))
    with pytest.raises(TypeError, match=r"the batch holds an instance of .*Holder.*register_pytree_node\(.*Holder"):
        stepper.step(stepper.init(), Holder(x.clone().requires_grad_(), y))  # no gradient would reach x
    # an object of constant tensors is a constant, as before: a fixed prior, a frozen configuration
    prior = torch.distributions.Normal(torch.zeros(2), torch.ones(2), validate_args=False)
    config = dataclasses.make_dataclass("Config", [("temperature", float)], frozen=True)(2.0)
    with_prior = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 lambda m, b, prior, config: -prior.log_prob(m(b[0]) / config.temperature).mean())
    with_prior.step(with_prior.init(), (x, y), prior, config)
    register_dataclass(Batch)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    final = stepper.unroll(stepper.init(), [Batch(xi, y) for xi in xs], checkpoint="sqrt")
    tuples = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    ref = tuples.unroll(tuples.init(), [(xi, y) for xi in xs])
    grads = torch.autograd.grad(final.params["weight"].sum(), xs)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(ref.params["weight"].sum(), xs), strict=True))
    assert all(g.abs().sum() > 0 for g in grads)


def test_lazy_modules_sparse_embeddings_and_activation_checkpointing_are_refused_with_their_fixes():
    """Each failed deep inside torch: a bare RuntimeError from a lazy module's uninitialised weight at the first
    step, a dispatcher dump for a sparse gradient, "please open an issue" for torch.utils.checkpoint (found in
    review). Each is refused naming the cause and the fix, and the fix works."""
    import torch.utils.checkpoint as activation

    def loss(m, b):
        return m(b).float().pow(2).mean()

    lazy = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"parameter '0.weight' is not initialized yet .*\(model\(x\)\)"):
        unrollc.compile(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), loss)
    lazy(torch.randn(2, 5))
    stepper = unrollc.compile(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), loss)
    stepper.step(stepper.init(), torch.randn(2, 5))

    lazy_norm = nn.Sequential(nn.Linear(5, 3), nn.LazyBatchNorm1d(affine=False))  # lazy buffers only
    with pytest.raises(ValueError, match=r"buffer '1.running_mean' is not initialized yet"):
        unrollc.compile(lazy_norm, torch.optim.SGD(lazy_norm.parameters(), lr=0.1), loss)

    sparse = nn.Embedding(7, 3, sparse=True)
    with pytest.raises(ValueError, match=r"the model is Embedding\(sparse=True\).*sparse=False"):
        unrollc.compile(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), loss)
    frozen = nn.Sequential(nn.Embedding.from_pretrained(torch.randn(7, 3), freeze=True, sparse=True), nn.Linear(3, 1))
    stepper = unrollc.compile(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), loss)  # no sparse gradient
    stepper.step(stepper.init(), torch.tensor([1, 4]))

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh())

        def forward(self, x):
            return activation.checkpoint(self.block, x, use_reentrant=False)

    model = Checkpointed()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss)
    with pytest.raises(unrollc.CaptureError, match=r"saved-tensor hook .* activation checkpointing .* remove it from the forward.*checkpoint="):
        stepper.step(stepper.init(), torch.randn(2, 5))


def test_a_refused_step_leaves_a_meta_modules_buffers_as_they_were():
    """Tracing runs the loss for real: a learned loss module with BatchNorm in train mode had its running
    statistics advanced by the step that was then refused (found in review); a retry after the fix started from
    them."""
    model = nn.Linear(4, 2)
    loss_net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Softplus(), nn.Linear(3, 1))
    before = {k: v.clone() for k, v in loss_net.state_dict().items()}
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, b, net: net((m(b[0]) - b[1]).pow(2)).mean())
    batch = (torch.randn(5, 4), torch.randn(5, 2))
    with pytest.raises(unrollc.CaptureError, match="eval"):
        stepper.step(stepper.init(), batch, loss_net)
    assert all(torch.equal(v, before[k]) for k, v in loss_net.state_dict().items())
    loss_net.eval()  # the fix the message gives
    stepper.step(stepper.init(), batch, loss_net)
    assert all(torch.equal(v, before[k]) for k, v in loss_net.state_dict().items())


def test_a_model_changed_after_compile_is_refused_with_the_fix():
    """A layer replaced after compile (the optimizer still holds the old one, so eager opt.step() leaves the new
    layer as it is): init() stepped the new layer by name, or failed in capture with a shape mismatch and an
    unrelated hint (found in review). A parameter group added after compile is refused the same way."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    stepper = unrollc.compile(model, opt, lambda m, b: m(b).pow(2).mean())
    stepper.step(stepper.init(), torch.randn(3, 4))
    model[2] = nn.Linear(8, 3)
    with pytest.raises(RuntimeError, match=r"replaced: \['2.bias', '2.weight'\].*unrollc.compile\(model, opt, loss_fn\) again"):
        stepper.init()
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = unrollc.compile(model, opt, lambda m, b: m(b).pow(2).mean())
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"added: \['extra'\]"):
        stepper.init()
    del model.extra
    stepper.init()  # as it was at compile again
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(RuntimeError, match="compile again after add_param_group"):
        stepper.init()


def test_argument_errors_are_typed_and_named():
    """Found in review: a wrong type raised ValueError (EveryK(2.5)) and a wrong value TypeError
    (clip_grad_norm(-1)); they are ArgumentErrors now, both, so either except clause catches them. Bare errors named
    no API (CostModel.from_stepper(None, ...), fmodel.parameters(time="a")) or the wrong one (stepper.graphs)."""
    import unrollc.higher as higher

    for make in (lambda: unrollc.EveryK(2.5), lambda: unrollc.Budget("1GB"), lambda: unrollc.Sqrt().plan("10"),
                 lambda: unrollc.clip_grad_norm(-1), lambda: unrollc.clip_grad_value(-1)):
        with pytest.raises(TypeError, match=r"unrollc\.\w+") as info:
            make()
        assert isinstance(info.value, ValueError)
    model = nn.Linear(2, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum())
    with pytest.raises(RuntimeError, match=r"^Stepper\.graphs: no step has been traced"):
        stepper.graphs
    with pytest.raises(TypeError, match=r"CostModel\.from_stepper: expected .* got NoneType"):
        unrollc.CostModel.from_stepper(None, None, None)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, _):
        with pytest.raises(TypeError, match=r"parameters\(time=\.\.\.\) takes an int.*got str 'a'"):
            fmodel.parameters(time="a")
        fmodel(torch.randn(3, 2))
        for time in (0, torch.tensor(0), np.int64(0)):  # indexes, as higher's list does
            assert [tuple(p.shape) for p in fmodel.parameters(time=time)] == [(1, 2), (1,)]


@pytest.mark.parametrize("checkpoint", [None, "sqrt"])
def test_an_unroll_over_no_batches_warns(checkpoint):
    """An exhausted generator passed again gave the initial state back, and meta-gradients without any training,
    silently (found in review)."""
    model = nn.Linear(2, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum())
    batches = (torch.randn(3, 2) for _ in range(2))
    assert stepper.unroll(stepper.init(), batches, checkpoint=checkpoint).t == 2
    with pytest.warns(UserWarning, match="yielded no batch, so no step ran .* a new iterator") as record:
        state = stepper.unroll(stepper.init(), batches, checkpoint=checkpoint)
    assert state.t == 0 and state.losses == [] and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty list is a zero-step unroll (a sweep over n from 0): no warning
        assert stepper.unroll(stepper.init(), [], checkpoint=checkpoint).losses == []


def test_the_state_repr_is_a_summary():
    """repr(UnrollState) printed every tensor and every loss (a screenful after the quick start; found in review)."""
    model = nn.Sequential(nn.Linear(3, 40), nn.BatchNorm1d(40))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01), lambda m, b: m(b).pow(2).mean())
    state = stepper.unroll(stepper.init(hyper={"lr": torch.tensor(0.01, requires_grad=True)}), [torch.randn(5, 3)] * 50)
    text = repr(state)
    assert len(text) < 600 and "tensor(" not in text
    for part in ("t=50", "'0.weight': float32[40, 3] (requires grad)", "'1.num_batches_tracked': 50",
                 "4 parameters x ['exp_avg', 'exp_avg_sq', 'step']", "'lr': 0.01 (requires grad)", "'betas': (0.9, 0.999)",
                 "losses=[50 values]"):
        assert part in text, part


def test_cached_step_graphs_hold_no_copy_of_the_weights():
    """Every cached step graph kept the tensors it was traced with (copies of the weights and optimizer state in
    its placeholders' meta and in its "captured" pass graph) and nine pass graphs: memory grew by twice the
    model per batch layout (found in review). Now they hold fake tensors, and only the most recent traces keep
    their pass graphs; explain still reports an older one, without the passes."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_leaves

    from unrollc.runtime.stepper import GRAPHS_KEPT

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01), lambda m, b: m(b).pow(2).mean())
    sizes = range(2, 3 + GRAPHS_KEPT // 2)  # two graphs per batch size (Adam's first step creates its state)
    for n in sizes:
        stepper.unroll(stepper.init(), [torch.randn(n, 8)] * 2)
    entries = [e for entries in stepper._cache.values() for e in entries]
    assert len(entries) == 2 * len(sizes) > GRAPHS_KEPT
    for entry in entries:
        for g in (entry.gm, *entry.graphs.values()):
            held = [t for n in g.graph.nodes for t in tree_leaves(dict(n.meta)) if isinstance(t, torch.Tensor)]
            held += [t for _, t in g.named_buffers()] + [t for _, t in g.named_parameters()]
            real = [t for t in held if not isinstance(t, FakeTensor) and t.device.type != "meta" and t.numel() > 1]
            assert not real, [tuple(t.shape) for t in real]
    assert sum("captured" in e.graphs for e in entries) == GRAPHS_KEPT
    assert all("after cse" in e.graphs for e in entries)  # what steps without grad run
    stepper.step(stepper.init(), torch.randn(2, 8))  # the oldest graph
    assert "captured" not in stepper._last.graphs
    with pytest.raises(RuntimeError, match=r"Stepper\.graphs: .* released to bound memory"):
        stepper.graphs
    report = str(unrollc.explain(stepper))
    assert "released its graphs after each pass" in report and "Passes" not in report and "mm.default" in report
    with torch.no_grad():  # and the cached graphs still run, with and without grad
        stepper.unroll(stepper.init(), [torch.randn(2, 8)] * 3)
    state = stepper.unroll(stepper.init(hyper={"lr": torch.tensor(0.01, requires_grad=True)}), [torch.randn(3, 8)] * 3)
    torch.autograd.grad(state.loss, state.hyper["lr"])


def test_cycling_through_more_layouts_than_the_cache_holds_warns():
    """More batch layouts than the graph cache holds, in a cycle: every task traced again, silently (found in
    review). The first trace of an evicted graph warns, once."""
    from unrollc.runtime import stepper as stepper_module

    model = nn.Linear(4, 2)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    size = stepper_module._CACHE_SIZE
    stepper_module._CACHE_SIZE = 3
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for n in range(1, 5):  # 4 layouts, 3 kept: no graph traced twice yet
                stepper.step(stepper.init(), torch.randn(n, 4))
        with pytest.warns(UserWarning, match="tracing again a step graph the stepper had evicted .* Pad or bucket"):
            stepper.step(stepper.init(), torch.randn(1, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stepper.step(stepper.init(), torch.randn(2, 4))  # once per stepper
    finally:
        stepper_module._CACHE_SIZE = size


class _Mode(__import__("enum").Enum):
    TANH = "tanh"
    SIGMOID = "sigmoid"


@__import__("dataclasses").dataclass
class _Config:
    scale: float = 1.0


class _Configurable(nn.Module):
    """Attributes of the kinds a config holds, all read by the forward."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(5, 2)
        self.mode, self.gain, self.act, self.cfg, self.table = _Mode.TANH, np.float32(1.0), torch.tanh, _Config(), [1.0] * 10

    def forward(self, x):
        h = self.l(x) * float(self.gain) * self.cfg.scale * self.table[9]
        return torch.tanh(h) if self.mode is _Mode.TANH else self.act(h)


@pytest.mark.parametrize("change", ["enum", "numpy scalar", "function", "dataclass", "long list", "generator batches"])
def test_config_attributes_changed_between_steps_are_seen(change):
    """An Enum, a numpy scalar, a function, a dataclass config or a list of 10 changed between steps (they were
    baked in silently), and a generator of batches that changes the model between batches of one plain unroll
    (read once per unroll, and a graph traced for one value was cached under another's key)."""
    edits = {"enum": lambda m: setattr(m, "mode", _Mode.SIGMOID), "numpy scalar": lambda m: setattr(m, "gain", np.float32(3.0)),
             "function": lambda m: setattr(m, "act", torch.sigmoid), "dataclass": lambda m: setattr(m, "cfg", _Config(2.0)),
             "long list": lambda m: m.table.__setitem__(9, 4.0), "generator batches": lambda m: setattr(m, "gain", np.float32(3.0))}
    if change == "function":
        edits[change] = lambda m: (setattr(m, "mode", _Mode.SIGMOID), setattr(m, "act", torch.relu))
    torch.manual_seed(0)
    model = _Configurable()
    eager = copy.deepcopy(model)
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    batches = [(torch.randn(6, 5), torch.randn(6, 2)) for _ in range(4)]
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.5), loss_fn)
    opt = torch.optim.SGD(eager.parameters(), lr=0.5)
    if change == "function":  # the first steps already run self.act
        for m in (model, eager):
            m.mode = _Mode.SIGMOID
    for i, b in enumerate(batches):  # eager: the change before step 2
        if i == 2:
            edits[change](eager)
        opt.zero_grad()
        loss_fn(eager, b).backward()
        opt.step()

    def batches_changing_the_model():
        for i, b in enumerate(batches):
            if i == 2:
                edits[change](model)
            yield b

    if change == "generator batches":
        state = stepper.unroll(stepper.init(), batches_changing_the_model())
    else:
        state = stepper.init()
        for b in batches_changing_the_model():
            state = stepper.step(state, b)
    assert stepper.trace_count == 2
    for n, p in eager.named_parameters():
        assert torch.equal(state.params[n], p), n


def test_a_loss_module_changed_between_steps_is_seen():
    """loss_fn an nn.Module: its eval(), a submodule's attribute or a buffer re-bound between steps (the graph kept
    the module as traced)."""

    class WeightedLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.register_buffer("w", torch.ones(2))

        def forward(self, m, b):
            return (self.drop(m(b[0]) - b[1]).pow(2) * self.w).mean()

    edits = [lambda f: f.eval(), lambda f: setattr(f.drop, "p", 0.25), lambda f: setattr(f, "w", torch.tensor([1.0, 3.0]))]
    for edit in edits:
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        eager, loss_fn = copy.deepcopy(model), WeightedLoss()
        eager_loss = copy.deepcopy(loss_fn)
        stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.5), loss_fn)
        opt = torch.optim.SGD(eager.parameters(), lr=0.5)
        state = stepper.init()
        for i in range(4):
            b = (torch.randn(6, 5), torch.randn(6, 2))
            if i == 2:
                edit(loss_fn)
                edit(eager_loss)
            torch.manual_seed(i)
            state = stepper.step(state, b)
            torch.manual_seed(i)
            opt.zero_grad()
            eager_loss(eager, b).backward()
            opt.step()
        for n, p in eager.named_parameters():
            assert torch.equal(state.params[n], p), n


def test_autocast_backward_hooks_and_parametrizations_after_compile():
    """A graph traced under torch.autocast is not reused without it (and the other way round); a module backward
    hook or a parametrization added after the first step is refused at the next step with the fix, as when present
    at the first trace (the old graph ran without it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    eager = copy.deepcopy(model)
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    state = stepper.init()
    for i in range(4):
        b = (torch.randn(6, 5), torch.randn(6, 2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i % 2 == 0):
            state = stepper.step(state, b)
            opt.zero_grad()
            loss_fn(eager, b).backward()
        opt.step()
        for n, p in eager.named_parameters():
            assert torch.equal(state.params[n], p), (i, n)
    handle = model[2].register_full_backward_hook(lambda *a: None)
    with pytest.raises(unrollc.CaptureError, match="module.s full backward hook"):
        stepper.step(state, b)
    handle.remove()
    nn.utils.parametrize.register_parametrization(model[0], "weight", nn.Identity())
    with pytest.raises(RuntimeError, match=r"Stepper.step: the model's parameters are not the ones it had at unrollc.compile"):
        stepper.step(state, b)


def test_traces_release_their_generated_source_and_a_stepper_cannot_be_copied():
    """torch.fx caches every generated module's source for ever: ~19 entries (0.5 MiB) per trace stayed after the
    stepper was gone. A copy of a stepper failed with a misleading error about the optimizer's parameters."""
    import gc

    from torch.fx.graph_module import _loader

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    gc.collect()
    before = set(_loader.eval_cache)
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state = stepper.init()
    for n in range(2, 6):
        state = stepper.step(state, torch.randn(n, 4))
    new = set(_loader.eval_cache) - before  # this stepper's (the suite's other graphs may be collected meanwhile)
    assert len(new) >= 4  # 8 here: tracing's own, and the graphs the steps ran (pass graphs generate theirs when read)
    with pytest.raises(TypeError, match=r"copy.deepcopy\(\(model, opt\)\)"):
        copy.deepcopy(stepper)
    kept = stepper.graphs["after cse"]  # a graph the user keeps keeps its source (tracebacks, inspect)
    del stepper, state
    gc.collect()
    assert "def forward" in inspect.getsource(kept.forward)
    del kept
    gc.collect()
    assert len(new & set(_loader.eval_cache)) <= 2


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_tools_and_eager_calls_between_steps_do_not_retrace():
    """FlopCounterMode registers torch's global module hooks around each call, and hook-based weight_norm re-binds
    module.weight at every eager forward: neither is what a step graph bakes in (each traced every step anew)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state = stepper.init()
    for _ in range(3):
        with FlopCounterMode(display=False):
            state = stepper.step(state, torch.randn(5, 4))
        model(torch.randn(2, 4))  # an eager forward: the weight_norm hook re-binds model[0].weight
    assert stepper.trace_count == 1


def test_a_meta_modules_buffer_and_the_attributes_its_forward_writes():
    """A buffer of a loss network passed as meta, re-bound between steps, is seen (the graph reads it by reference);
    an attribute its forward writes is put back after tracing, pointed out, and traces nothing more."""

    class LossNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(1, 1)
            self.register_buffer("w", torch.ones(1))
            self.calls = 0

        def forward(self, r):
            self.calls += 1
            return self.l(r) * self.w

    torch.manual_seed(0)
    model, net = nn.Linear(3, 1), LossNet()
    eager = copy.deepcopy(model)
    loss_fn = lambda m, b, n: n((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    state = stepper.init()
    with pytest.warns(UserWarning, match=r"LossNet \(meta argument 0\)\.calls"):
        state = stepper.step(state, (torch.randn(6, 3), torch.randn(6, 1)), net)
    torch.manual_seed(0)
    eager_net = copy.deepcopy(net)
    for i in range(4):
        b = (torch.randn(6, 3), torch.randn(6, 1))
        if i == 2:
            net.w = torch.full((1,), 5.0)
            eager_net.w = torch.full((1,), 5.0)
        state = stepper.step(state, b, net) if i else stepper.init()
        opt.zero_grad()
        if i:
            loss_fn(eager, b, eager_net).backward()
            opt.step()
    assert net.calls == 0 and stepper.trace_count == 2
    for n, p in eager.named_parameters():
        assert torch.equal(state.params[n], p), n


def test_anomaly_mode_does_not_break_tracing():
    """torch.autograd.set_detect_anomaly(True) (default check_nan) read every traced gradient into Python, so every
    trace failed with a capture error blaming the user's code (found by the interop tester). Tracing turns it off;
    the steps run under it as eager code does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                              lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    batches = [(torch.randn(6, 4), torch.randn(6, 1)) for _ in range(3)] + [(torch.randn(3, 4), torch.randn(3, 1))]
    with torch.autograd.set_detect_anomaly(True):
        state = stepper.unroll(stepper.init(), batches, checkpoint=2)  # traces, including a new layout
        assert torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()
        torch.stack(state.losses).sum().backward()
    plain = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    reference = plain.unroll(plain.init(), batches)
    for n, p in reference.params.items():
        assert torch.equal(state.params[n], p), n


def test_wrappers_and_modes_unrollc_cannot_step_are_refused_with_the_fix():
    """Found by the interop tester: these failed with torch's internal errors, blamed on loss_fn."""
    def make():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    batch = (torch.randn(6, 4), torch.randn(6, 1))
    wrapped = torch.compile(make(), backend="eager")
    with pytest.raises(TypeError, match=r"torch.compile wrapper .*unrollc.compile\(model._orig_mod, opt, loss_fn\)"):
        unrollc.compile(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), loss_fn)
    scripted = torch.jit.script(make())
    with pytest.raises(TypeError, match=r"ScriptModule .*Pass the nn.Module before scripting it"):
        unrollc.compile(scripted, torch.optim.SGD(scripted.parameters(), lr=0.1), loss_fn)

    model = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    state = stepper.init()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"Stepper.step: called inside torch.inference_mode\(\).*torch.no_grad"):
            stepper.step(state, batch)
        with pytest.raises(RuntimeError, match=r"Stepper.unroll: called inside torch.inference_mode\(\)"):
            stepper.unroll(state, [batch])
        made_there = stepper.init()
        out = stepper.forward(state, batch[0])  # evaluation is fine
    assert out.shape == (6, 1)
    with pytest.raises(RuntimeError, match=r"on a state made inside torch.inference_mode\(\).*stepper.init\(\)"):
        stepper.step(made_there, batch)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    stepper.step(state, batch)  # still works outside


def test_a_tensor_re_bound_every_outer_iteration_is_pointed_out_with_the_fix():
    """A tensor read by reference is part of the graph key: re-bound every outer iteration (class weights recomputed
    per epoch), each iteration traced a new graph and the cache kept the old tensors alive, with no warning (found
    by the re-tracing tester). The third re-bind warns, once per name; an in-place update traces nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model.scale = torch.ones(1)
    W = torch.ones(8)

    def loss_fn(m, b):
        return (W * (m(b[0]) - b[1]).pow(2).squeeze(1)).mean() * m.scale.sum()

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(2)]
    stepper.unroll(stepper.init(), batches)
    messages = []
    for _ in range(5):
        W = torch.rand(8)  # noqa: F841 - read by loss_fn
        model.scale = torch.rand(1)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            stepper.unroll(stepper.init(), batches)
        messages += [str(w.message) for w in rec if "re-bound" in str(w.message)]
    assert len(messages) == 2, messages
    assert any("loss_fn's variable 'W' was re-bound to a new tensor 3 times" in m and "W.copy_(new_value)" in m
               for m in messages)
    assert any("the tensor attribute model.scale was re-bound" in m for m in messages)
    traced = stepper.trace_count
    for _ in range(3):
        with torch.no_grad():
            W.copy_(torch.rand(8))
        stepper.unroll(stepper.init(), batches)
    assert stepper.trace_count == traced


@pytest.mark.parametrize("checkpoint", [None, "sqrt", 2])
def test_a_generator_that_changes_the_model_between_batches(checkpoint, float64):
    """A generator setting ``model.temp`` before each batch (an annealing schedule in the data pipeline): the plain
    unroll runs each step with its batch's value, as a step() loop does; a checkpointed one reads every batch
    first, so every step would run with the last value: refused, naming the attribute. A value set once, before
    the first batch, holds for every step either way."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.temp = nn.Linear(3, 2), 1.0

        def forward(self, x):
            return self.lin(x) / self.temp

    torch.manual_seed(0)
    model = Net()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(4)]

    def annealed():
        for i, b in enumerate(batches):
            model.temp = 1.0 + i
            yield b

    def set_once():
        model.temp = 3.0
        yield from batches

    state = stepper.init()
    if checkpoint is None:
        got = stepper.unroll(state, annealed())
        ref = state
        for i, b in enumerate(batches):
            model.temp = 1.0 + i
            ref = stepper.step(ref, b)
        assert torch.equal(got.params["lin.weight"], ref.params["lin.weight"])
    else:
        with pytest.raises(unrollc.ModelChangedError, match=r"before batch 1 \(model.temp\).*checkpoint=None") as info:
            stepper.unroll(state, annealed(), checkpoint=checkpoint)
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    model.temp = 1.0
    got = stepper.unroll(state, set_once(), checkpoint=checkpoint)
    ref = stepper.unroll(state, batches)  # temp is 3.0 now
    assert torch.equal(got.params["lin.weight"], ref.params["lin.weight"])


@pytest.mark.parametrize("retain_graph", [False, True])
def test_backward_inside_loss_fn_is_refused_with_what_to_remove(retain_graph):
    """An eager loop's ``loss.backward(); opt.step()`` left in loss_fn: torch's "backward through the graph a second
    time" (from unrollc's code) or functorch's error said nothing useful. The user's model is left alone."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model.weight.detach().clone()

    def loss_fn(m, b):
        loss = (m(b[0]) - b[1]).pow(2).mean()
        loss.backward(retain_graph=retain_graph)
        opt.step()
        return loss

    stepper = unrollc.compile(model, opt, loss_fn)
    with pytest.raises(unrollc.CaptureError, match=r"Stepper.step: loss_fn.* called backward\(\).*Remove loss.backward\(\)"):
        stepper.step(stepper.init(), (torch.randn(4, 3), torch.randn(4, 1)))
    assert torch.equal(model.weight, weight) and model.weight.grad is None


def test_a_counter_the_forward_keeps_reads_as_in_eagers_first_step():
    """Tracing runs loss_fn twice (once to find the parameters the loss uses, once traced): a counter attribute the
    forward increments was baked in as 2 where eager's first step sees 1 (the baked value is warned about)."""

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(3, 1), 0

        def forward(self, x):
            self.calls += 1
            return self.lin(x) * self.calls

    torch.manual_seed(0)
    model = Counting()
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    eager = copy.deepcopy(model)
    expected = loss_fn(eager, batch)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    with pytest.warns(UserWarning, match="calls"):
        state = stepper.step(stepper.init(), batch)
    assert torch.equal(state.loss, expected.detach()) and model.calls == 0


def test_an_error_in_a_step_graph_names_the_line_it_was_traced_from():
    """An op failing when a cached graph runs (an index out of range at step 2) showed only the generated code."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(5, 3)

        def forward(self, idx):
            return self.e(idx).mean(1)  # the line

    model = Bag()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    state = stepper.step(stepper.init(), torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(IndexError) as info:
        stepper.step(state, torch.tensor([[0, 1], [2, 9]]))
    assert any(re.search(r"unrollc: raised by the step graph's `embedding` .*test_api.py:\d+ in forward: return self.e\(idx\)", n)
               for n in getattr(info.value, "__notes__", []))


def test_manual_seed_in_the_forward_is_pointed_out():
    """``torch.manual_seed(123)`` in forward (a fixed dropout mask in eager) runs only while tracing: the steps draw
    on from the generator, another trajectory from step 1, silently before."""

    class Seeded(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(4, 1), nn.Dropout(0.5)

        def forward(self, x):
            torch.manual_seed(123)
            return self.lin(self.drop(x))

    model = Seeded()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).pow(2).mean())
    with pytest.warns(UserWarning, match=r"called torch.manual_seed .*torch.Generator seeded each step"):
        stepper.step(stepper.init(), torch.randn(3, 4))


def test_a_string_that_changes_every_batch_is_pointed_out():
    """A dict batch with an unused ``"id": f"shard-{i}"`` traced a new graph every step (70 in 70 steps), silently."""
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b["x"]).pow(2).mean())
    state = stepper.init()
    with pytest.warns(UserWarning, match=r"8 step graphs traced so far. .*not tensors \('shard-7'\).*ids, file names"):
        for i in range(8):
            state = stepper.step(state, {"x": torch.randn(2, 3), "id": f"shard-{i}"})


@pytest.mark.parametrize("register", ["register_full_backward_hook", "register_full_backward_pre_hook"])
def test_a_full_backward_hook_is_refused_at_compile(register):
    """The README says at compile; it was refused at the first step with a message about autograd.Function."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    getattr(model[2], register)(lambda *args: None)
    with pytest.raises(ValueError, match=r"unrollc.compile: model.2 \(Linear\) has a backward hook .*grad_callback"):
        unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum())


@pytest.mark.parametrize("returned, said", [
    (lambda loss: (loss, loss.detach()), r"must return the loss alone, a scalar tensor, got a tuple of 2; return only the loss"),
    (lambda loss: {"loss": loss}, r"must return the loss alone, .*got a dict of 1; return only the loss"),
    (lambda loss: loss.expand(3), r"must return a scalar tensor, got Tensor\(3,\); reduce it"),
])
def test_a_loss_fn_returning_more_than_the_loss_is_told_what_to_return(returned, said):
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: returned(m(b).mean()))
    with pytest.raises(TypeError, match=rf"Stepper.step: loss_fn\(model, batch, \*meta\) {said}"):
        stepper.step(stepper.init(), torch.randn(2, 3))


def test_review_regressions_of_the_trace_speedup_and_checks(float64):
    """Found in review of this change: a sparse batch crashed the in-place rewrite (no storage to compare); a
    generator pseudo-labelling with model(x), whose forward keeps `self.last_out`, was refused as changing the
    model; torch.manual_seed(s) with the seed already set went unnoticed; a meta module's changed attribute was
    not named; stepper.graphs' values() gave graphs without their code."""

    class Keeping(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            self.last_out = self.lin(x)
            return self.last_out

    torch.manual_seed(0)
    model = Keeping()
    mse = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    xs = [torch.randn(4, 3) for _ in range(4)]

    def pseudo_labelled():
        for x in xs:
            with torch.no_grad():
                y = model(x).round()
            yield x, y

    state = stepper.unroll(stepper.init(), pseudo_labelled(), checkpoint="sqrt")  # a cold stepper
    assert len(state.losses) == 4
    stepper.unroll(stepper.init(), pseudo_labelled())
    assert stepper.trace_count == 1
    assert all("def forward" in inspect.getsource(gm.forward) for gm in stepper.graphs.values())

    linear = nn.Linear(5, 1)
    sparse = unrollc.compile(linear, torch.optim.SGD(linear.parameters(), lr=0.1), lambda m, b: m(torch.sparse.mm(b[0], b[1])).sum())
    sparse.step(sparse.init(), (torch.eye(4).to_sparse(), torch.randn(4, 5)))

    torch.manual_seed(0)
    seeded = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: (torch.manual_seed(0), m(b).sum())[1])
    with pytest.warns(UserWarning, match="called torch.manual_seed"):
        seeded.step(seeded.init(), xs[0])

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 1.0

    weight = Scale()
    scaled = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b, w: m(b).sum() * w.scale)

    def annealed():
        for i, x in enumerate(xs):
            weight.scale = 1.0 + i
            yield x

    with pytest.raises(unrollc.ModelChangedError, match=r"before batch 1 \(meta0.scale\)"):
        scaled.unroll(scaled.init(), annealed(), weight, checkpoint=2)


def test_a_data_dependent_shape_copies_as_a_torch_size():
    seen = []

    def loss_fn(m, b):
        seen.append(copy.deepcopy(b[b[:, 0] > 0].shape))
        return m(b).sum()

    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    stepper.step(stepper.init(), torch.randn(6, 3))
    assert seen and all(type(s) is torch.Size for s in seen)


def test_second_review_regressions(float64):
    """Found in the second review: (1) a number the forward writes (an annealed temperature) dropped out of the key,
    so the user's own change of it was ignored (1.11 off eager); (2) an inference-mode buffer crashed the trace's
    write check; (3) a generator whose first batch needs no forward was refused when later ones pseudo-label;
    (4) a numpy index on a masked selection crashed."""

    class Annealed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.temp = nn.Linear(3, 1), 1.0
            with torch.inference_mode():
                self.register_buffer("shift", torch.full((3,), 0.1))

        def forward(self, x):
            out = self.lin(x - self.shift) / self.temp
            self.temp = max(self.temp * 0.5, 0.1)
            self.last_out = out
            return out

    torch.manual_seed(0)
    model = Annealed()
    mse = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    with pytest.warns(UserWarning, match="temp"):
        state = stepper.step(stepper.init(), batch)
    model.temp = 0.2  # the user sets it between steps: the next step uses it, as eager's would
    got = stepper.step(state, batch)
    eager = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in eager.named_parameters():
            p.copy_(state.params[name])
    opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    mse(eager, batch).backward()
    opt.step()
    assert torch.equal(got.params["lin.weight"], eager.lin.weight) and stepper.trace_count == 2

    labelled = (torch.randn(8, 3), torch.randn(8, 1))

    def pseudo_labelled():
        yield labelled  # no forward before the first batch
        for _ in range(3):
            x = torch.randn(8, 3)
            with torch.no_grad():
                y = model(x)
            yield x, y

    model.temp = 1.0
    assert len(stepper.unroll(stepper.init(), pseudo_labelled(), checkpoint=2).losses) == 4

    import numpy as np

    indexed = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, b: m(b[0])[b[1].squeeze(1) > 0][np.array([0])].sum())
    indexed.step(indexed.init(), (torch.randn(4, 3), torch.tensor([[1.0], [1.0], [-1.0], [1.0]])))
