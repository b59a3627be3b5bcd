"""Tracing pitfalls, each with the behaviour unrollc guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import unrollc


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch
            return self.lin(x)
        return -self.lin(x)


def test_data_dependent_branch_names_the_users_line():
    model = Branchy()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    with pytest.raises(unrollc.CaptureError) as info:
        stepper.step(stepper.init(), (torch.randn(4, 3), torch.randn(4, 2)))
    message = str(info.value)
    assert f"{__file__}:" in message and "x.sum() > 0" in message
    assert "torch.where" in message


def test_new_batch_shape_retraces_and_is_cached():
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    state = stepper.init()
    for n in (4, 5, 4, 5):
        state = stepper.step(state, (torch.randn(n, 3), torch.randn(n, 2)))
    assert stepper.trace_count == 2


def test_radam_rectification_switch_is_guarded_not_baked_in():
    """RAdam branches on rho_t > 5, which turns true after a few steps: a graph of step 1 would be wrong."""
    model = nn.Linear(3, 2)
    opt = torch.optim.RAdam(model.parameters(), lr=0.1)
    stepper = unrollc.compile(model, opt, mse)
    state = stepper.init()
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    for _ in range(8):
        state = stepper.step(state, batch)
    assert stepper.trace_count == 3  # fresh state; rho_t <= 5; rho_t > 5
    assert any("hyper:betas.1" in str(g) for g in stepper.guards)


def test_python_float_hyperparameters_are_inputs_not_constants():
    """A new lr in init(hyper=...) takes effect without re-tracing: lr is a graph input."""
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.1), mse)
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    a = stepper.step(stepper.step(stepper.init(hyper={"lr": 0.1}), batch), batch)
    b = stepper.step(stepper.step(stepper.init(hyper={"lr": 0.2}), batch), batch)
    assert stepper.trace_count == 2
    assert not torch.equal(a.params["weight"], b.params["weight"])
    hyper_inputs = [n.name for n in stepper.graph.graph.nodes if n.op == "placeholder" and n.name.startswith("h_")]
    assert {"h_lr", "h_eps", "h_betas_0", "h_betas_1"} <= set(hyper_inputs)


def test_momentum_zero_and_nonzero_give_different_graphs():
    """`if momentum != 0` in torch.optim is a guard: a lifted momentum of 0 must not reuse the momentum graph."""
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mse)
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    with_momentum = stepper.step(stepper.init(), batch)
    without = stepper.step(stepper.init(hyper={"momentum": 0.0}), batch)
    assert "momentum_buffer" in with_momentum.opt_state["weight"]
    assert "momentum_buffer" not in without.opt_state.get("weight", {})


def test_item_in_loss_is_refused_with_a_fix():
    model = nn.Linear(3, 2)

    def loss_fn(m, batch):
        x, y = batch
        scale = float(y.abs().max())  # .item() on data
        return ((m(x) - y) ** 2).mean() / scale

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    with pytest.raises(unrollc.CaptureError, match="float\\(y.abs\\(\\).max\\(\\)\\)"):
        stepper.step(stepper.init(), (torch.randn(4, 3), torch.randn(4, 2)))


def test_non_scalar_loss_is_refused():
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b))
    with pytest.raises(TypeError, match="scalar"):
        stepper.step(stepper.init(), torch.randn(4, 3))


def test_graph_before_any_step_says_what_to_do():
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    with pytest.raises(RuntimeError, match="call stepper.step"):
        stepper.graph  # noqa: B018


def test_unknown_checkpoint_is_refused_with_the_allowed_values():
    model = nn.Linear(3, 2)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    with pytest.raises((ValueError, TypeError), match="sqrt"):
        stepper.unroll(stepper.init(), [(torch.randn(4, 3), torch.randn(4, 2))], checkpoint="everything")


def _one_hot_loss(model, batch):
    x, y = batch
    return (model(x) - nn.functional.one_hot(y, 3).to(x.dtype)).pow(2).mean()


def test_one_hot_with_num_classes_is_traced_as_tensor_ops(float64):
    """F.one_hot checks its class values with .item() inside ATen; with num_classes given the step graph
    computes it with a comparison, and the trajectory is eager's bit for bit."""
    from tests.oracles import eager_trajectory

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ref = eager_trajectory(model, opt, _one_hot_loss, batches)
    stepper = unrollc.compile(model, opt, _one_hot_loss)
    state = stepper.unroll(stepper.init(), batches)
    assert all(torch.equal(state.params[n], p) for n, p in ref[-1][0].items())


@pytest.mark.parametrize("checkpoint", [None, 2])
def test_one_hot_of_a_class_value_out_of_range_raises_as_in_eager(checkpoint):
    """The traced comparison alone would give a row of zeros for label 3 of 3 classes and train on it silently;
    the step checks the values (an assertion node), and the error names the user's line."""
    model = nn.Linear(4, 3)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), _one_hot_loss, check=True)
    good = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    stepper.unroll(stepper.init(), good, checkpoint=checkpoint)
    with pytest.raises(RuntimeError, match="Class values must be smaller than num_classes"):
        nn.functional.one_hot(torch.tensor([0, 3]), 3)  # eager
    bad = (torch.randn(5, 4), torch.tensor([0, 1, 3, 2, 1]))
    with pytest.raises(RuntimeError, match=r"F.one_hot\(y, 3\) at .*test_pitfalls.py:\d+ .*outside \[0, 3\)"):
        stepper.unroll(stepper.init(), [*good, bad], checkpoint=checkpoint)


def test_one_hot_without_num_classes_asks_for_it():
    def loss_fn(model, batch):
        x, y = batch
        return (model(x) - nn.functional.one_hot(y).to(x.dtype)).pow(2).mean()

    model = nn.Linear(4, 3)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    with pytest.raises(unrollc.CaptureError, match=r"F.one_hot without num_classes at .*test_pitfalls.py:\d+ .*pass it: "
                       r"F.one_hot\(y, num_classes\)"):
        stepper.step(stepper.init(), (torch.randn(5, 4), torch.randint(0, 3, (5,))))


def _positives_mse(model, batch):
    x, y = batch
    return (model(x).squeeze(1) - y)[y > 0].pow(2).mean()  # boolean-mask indexing: a data-dependent size


def _positives(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for k in counts:
        y = -torch.ones(8)
        y[torch.randperm(8, generator=gen)[:k]] = torch.rand(k, generator=gen) + 0.1
        batches.append((torch.randn(8, 4, generator=gen), y))
    return batches


@pytest.mark.parametrize("checkpoint", [None, "sqrt"])
def test_a_data_dependent_size_that_stays_the_same_runs_like_eager(checkpoint, float64):
    from tests.oracles import eager_trajectory

    model = nn.Linear(4, 1)
    batches = _positives([3, 3, 3, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = eager_trajectory(model, opt, _positives_mse, batches)
    stepper = unrollc.compile(model, opt, _positives_mse)
    state = stepper.unroll(stepper.init(), batches, checkpoint=checkpoint)
    assert all(torch.allclose(state.params[n], p, rtol=0, atol=1e-14) for n, p in ref[-1][0].items())


@pytest.mark.parametrize("first", [1, 2])
def test_a_data_dependent_size_that_changes_stops_the_step_with_the_users_line(first):
    """The ops after `out[mask]` were traced with its first size: with 1 they broadcast a later size and the
    step was silently wrong; with 2 it failed inside the graph. Now it says which line and what to do."""
    model = nn.Linear(4, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), _positives_mse)
    with pytest.raises(unrollc.CaptureError, match=rf"`return \(model\(x\).squeeze\(1\) - y\)\[y > 0\].*test_pitfalls.py:\d+.* "
                       rf"gives a tensor of shape \(5,\) for this batch, but the step graph was traced with shape "
                       rf"\({first},\).*\* mask\).sum\(\) / mask.sum\(\)"):
        stepper.unroll(stepper.init(), _positives([first, 5]))


_COUNTS = {
    "shape": lambda x, y, m: y[m].shape[0], "size": lambda x, y, m: y[m].size(0), "numel": lambda x, y, m: y[m].numel(),
    # found in review (each was frozen at its traced value, without a check)
    "rows shape": lambda x, y, m: x[m].shape[0], "rows unpacked": lambda x, y, m: x[m].shape[:][0],
    "nonzero shape": lambda x, y, m: torch.nonzero(m).shape[0], "nonzero method": lambda x, y, m: m.nonzero().shape[0],
    "nonzero squeezed": lambda x, y, m: torch.nonzero(m).squeeze(1).numel(),
    "where": lambda x, y, m: torch.where(m)[0].shape[0],
    "ones of its shape": lambda x, y, m: torch.ones(x[m].shape).sum() / 4,  # torch reads the size without __getitem__
    "transposed": lambda x, y, m: x[m].T.shape[1], "permuted": lambda x, y, m: x[m].permute(1, 0).size(1),
    "unsqueezed": lambda x, y, m: x[m].unsqueeze(0).shape[1],
}


def _positives_mean_by_count(how):
    def loss_fn(model, batch):
        x, y = batch
        positive = y > 0
        count = _COUNTS[how](x, y, positive)  # read into Python: a constant of the step graph
        return ((model(x).squeeze(1) - y).pow(2) * positive).sum() / count

    return loss_fn


@pytest.mark.parametrize("how", sorted(_COUNTS))
def test_a_data_dependent_size_read_into_python_is_checked_each_step(how, float64):
    """`err[mask].shape[0]` as a divisor was the first batch's count for every step (2 instead of 5), silently."""
    from tests.oracles import eager_trajectory

    model = nn.Linear(4, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), _positives_mean_by_count(how))
    with pytest.raises(unrollc.CaptureError, match=r"gives a tensor of shape \(5,( \d+)?\) for this batch, but the "
                       r"step graph was traced with shape \(2,( \d+)?\)"):
        stepper.unroll(stepper.init(), _positives([2, 5]))
    batches = _positives([3, 3, 3])  # the same count every step: it runs like eager
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = eager_trajectory(model, opt, _positives_mean_by_count(how), batches)
    stepper = unrollc.compile(model, opt, _positives_mean_by_count(how))
    state = stepper.unroll(stepper.init(), batches)
    assert all(torch.allclose(state.params[n], p, rtol=0, atol=1e-14) for n, p in ref[-1][0].items())


def test_a_data_dependent_tensors_other_dims_may_be_read(float64):
    """``x[mask].shape[1]`` reads no data-dependent length: the count may change."""
    from tests.oracles import eager_trajectory

    def loss_fn(model, batch):
        x, y = batch
        rows = x[y > 0]  # (count, 4): only its 4 is read
        return (model(x).squeeze(1) - y).pow(2).mean() + rows.sum() / rows.shape[1] / rows.T.shape[0]

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _positives([2, 5, 3])
    ref = eager_trajectory(model, opt, loss_fn, batches)
    stepper = unrollc.compile(model, opt, loss_fn)
    state = stepper.unroll(stepper.init(), batches)
    assert all(torch.allclose(state.params[n], p, rtol=0, atol=1e-14) for n, p in ref[-1][0].items())


def test_a_python_number_that_keeps_changing_is_pointed_out():
    """A float meta argument is a constant of the step graph: each new value traces a new graph. After a few,
    a warning (at the user's line) says to pass it as a tensor."""
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, b, temperature: (m(b) / temperature).sum())
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"8 step graphs traced so far. The Python numbers .* \(8.0\) .*\(torch.tensor\(value\)\)") as record:
        for i in range(8):
            stepper.step(stepper.init(), x, 1.0 + i)
    assert {w.filename for w in record if "step graphs traced" in str(w.message)} == {__file__}


def test_a_meta_module_updating_its_buffers_is_refused_with_the_fix():
    model = nn.Linear(4, 3)
    loss_net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Softplus(), nn.Linear(5, 1))  # train mode

    def loss_fn(m, b, net):
        return net(m(b[0]) - b[1]).mean()

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    batch = (torch.randn(7, 4), torch.randn(7, 3))
    with pytest.raises(unrollc.CaptureError, match=r"updates in place a tensor that is not the model's parameter or "
                       r"buffer.* put a module passed as a meta argument in eval\(\) mode"):
        stepper.step(stepper.init(), batch, loss_net)
    stepper.step(stepper.init(), batch, loss_net.eval())  # the fix works


def test_an_in_place_change_of_the_batch_is_refused_with_the_fix():
    """The message blamed only meta modules and tensor attributes, whose fixes do not apply (found in review)."""
    def loss_fn(m, b):
        x, y = b
        x.mul_(2)
        return (m(x) - y).pow(2).mean()

    model = nn.Linear(4, 3)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    with pytest.raises(unrollc.CaptureError, match=r"at .*test_pitfalls.py:\d+ \(`x.mul_\(2\)`\).*a tensor of the batch "
                       r".*x = x \* 2, or x = x.clone\(\) first"):
        stepper.step(stepper.init(), (torch.randn(7, 4), torch.randn(7, 3)))


def test_a_module_backward_hook_is_refused_with_the_fix():
    """torch.func's own message (an autograd.Function must override setup_context) named neither the hook nor a fix."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), mse)
    model[2].register_full_backward_hook(lambda mod, grad_in, grad_out: (grad_in[0] * 0.5,))  # after: at the step
    with pytest.raises(unrollc.CaptureError, match=r"module.s full backward hook: register_full_backward_hook.*remove the "
                       r"backward hook; to change the parameters' gradients, pass unrollc.compile\(\.\.\., grad_callback=\.\.\.\)"):
        stepper.step(stepper.init(), (torch.randn(7, 4), torch.randn(7, 3)))


def test_one_batch_given_as_the_batches_of_an_unroll_is_pointed_out():
    """unroll(state, (x, y)) reads x and y as two batches: the model's shape error now carries a note."""
    model = nn.Linear(4, 3)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b[0]).sum())
    with pytest.raises(Exception) as info:
        stepper.unroll(stepper.init(), (torch.randn(7, 4), torch.randn(7, 3)))
    assert any("`batches` is a tuple of 2 tensors of shapes (7, 4), (7, 3), read as 2 batches of one tensor each" in n
               and "stepper.unroll(state, [(x, y)])" in n for n in info.value.__notes__)


def _positives_sum_mse(model, batch):
    x, y = batch
    err = (model(x).squeeze(1) - y).pow(2)
    return err.mean() + 0.1 * y[y > 0].sum()  # a data-dependent size nothing after it was traced with


@pytest.mark.parametrize("checkpoint", [None, "sqrt"])
def test_a_data_dependent_size_no_op_depends_on_may_change(checkpoint, float64):
    from tests.oracles import eager_trajectory

    model = nn.Linear(4, 1)
    batches = _positives([2, 5, 1, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = eager_trajectory(model, opt, _positives_sum_mse, batches)
    stepper = unrollc.compile(model, opt, _positives_sum_mse)
    state = stepper.unroll(stepper.init(), batches, checkpoint=checkpoint)
    assert all(torch.allclose(state.params[n], p, rtol=0, atol=1e-14) for n, p in ref[-1][0].items())


def test_a_unique_whose_size_changes_is_stopped():
    def loss_fn(model, batch):
        x, y = batch
        idx = torch.unique((y > 0).long() * torch.arange(8))
        return (model(x).squeeze(1) - y).index_select(0, idx).pow(2).mean()

    model = nn.Linear(4, 1)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    with pytest.raises(unrollc.CaptureError, match=r"torch.unique.* gives a tensor of shape \(\d+,\) for this batch"):
        stepper.unroll(stepper.init(), _positives([2, 5]))


class _OutOfPlaceDraw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc(x)
        return (h.t() * torch.bernoulli(h.detach().t(), 0.5)).t()  # bernoulli.p out of place: a contiguous draw


def test_an_out_of_place_draw_on_a_transposed_tensor_is_eagers():
    from tests.oracles import eager_trajectory

    torch.manual_seed(0)
    model = _OutOfPlaceDraw()
    batches = [(torch.randn(5, 4), torch.randn(5, 6)) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    ref = eager_trajectory(model, opt, mse, batches)
    stepper = unrollc.compile(model, opt, mse)
    torch.manual_seed(1)
    state = stepper.unroll(stepper.init(), batches)
    assert all(torch.equal(state.params[n], p) for n, p in ref[-1][0].items())


class _ReadsData(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.l, self.how = nn.Linear(3, 3), how

    def forward(self, x):
        h = self.l(x)
        if self.how == "tolist":
            return h * h.max().tolist()
        if self.how == "numpy":
            return h * float(h.detach().numpy().max())
        return h * len(h[h > 0])  # the length of a masked tensor


@pytest.mark.parametrize("how", ["tolist", "numpy", "len"])
def test_reading_data_into_python_in_forward_is_refused_naming_the_line(how):
    """.item() and float() were refused; .tolist() and len(x[mask]) were traced with the first batch's values and
    trained on them silently afterwards (losses 1.05 against eager's 15543 by step 2)."""
    model = _ReadsData(how)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.01), lambda m, x: m(x).pow(2).mean())
    with pytest.raises(unrollc.CaptureError, match=r"test_pitfalls.py:\d+ .*in forward: the code turns a traced tensor "
                       r"into a Python value"):
        stepper.step(stepper.init(), torch.randn(4, 3))


def test_a_closed_over_tensor_may_be_read_into_python():
    weights = torch.tensor([1.0, 2.0, 3.0])

    def loss_fn(model, x):
        return (model(x) * torch.tensor(weights.tolist())).pow(2).mean()  # a constant: its values are fixed

    model = nn.Linear(3, 3)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn)
    stepper.step(stepper.init(), torch.randn(4, 3))


class _NormScaledSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                scale = float(np.linalg.norm(p.grad.numpy()))  # the gradient's values, through numpy
                p.add_(p.grad, alpha=-group["lr"] / (1 + scale))


class _MisspeltSGD(_NormScaledSGD):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["learning_rate"])  # the user's bug


def test_a_custom_optimizer_reading_the_gradient_through_numpy_is_refused():
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, _NormScaledSGD(model.parameters()), lambda m, x: m(x).pow(2).mean())
    with pytest.raises(unrollc.CaptureError, match=r"test_pitfalls.py:\d+ .*in step: the code turns a traced tensor"):
        stepper.step(stepper.init(), torch.randn(4, 3))


def test_a_bug_in_a_custom_optimizer_keeps_its_type_and_traceback():
    """A KeyError in the user's own step() was turned into a CaptureError raised from None."""
    model = nn.Linear(3, 1)
    stepper = unrollc.compile(model, _MisspeltSGD(model.parameters()), lambda m, x: m(x).pow(2).mean())
    with pytest.raises(KeyError, match="learning_rate") as info:
        stepper.step(stepper.init(), torch.randn(4, 3))
    assert any("raised by your code while unrollc.compile traced" in note for note in info.value.__notes__)


def test_a_loss_that_depends_on_no_parameter_is_pointed_out():
    """loss_fn running a copy of the model: every step changed nothing, silently (unrollc.higher warned already)."""
    import copy

    model = nn.Linear(4, 3)
    other = copy.deepcopy(model)
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: mse(other, b))
    batch = (torch.randn(7, 4), torch.randn(7, 3))
    with pytest.warns(UserWarning, match=r"depends on none of the parameters the optimizer updates.*Call model\(\.\.\.\) "
                      r"inside loss_fn") as record:
        state = stepper.step(stepper.init(), batch)
    assert {w.filename for w in record} == {__file__}
    assert all(torch.equal(state.params[n], p) for n, p in model.named_parameters())
