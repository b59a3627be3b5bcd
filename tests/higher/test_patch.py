"""unrollc/higher/patch.py: the functional module, against higher's documented behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unrollc.higher as uh


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x))

    def embed(self, x):
        return self.encoder(x)


def test_forward_with_params_and_history(lib):
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    fmodel = lib.monkeypatch(model)
    torch.testing.assert_close(fmodel(x), model(x))
    new = [torch.randn(2, 3, requires_grad=True), torch.randn(2, requires_grad=True)]
    torch.testing.assert_close(fmodel(x, params=new), F.linear(x, *new))
    assert [p is q for p, q in zip(fmodel.parameters(), new, strict=True)] == [True, True]  # params= become fast weights
    assert all(torch.equal(p, q) for p, q in zip(fmodel.parameters(time=0), model.parameters(), strict=True))
    assert all(p is q for p, q in zip(fmodel.parameters(time=1), new, strict=True))
    fmodel.fast_params = [t * 2 for t in new]
    fmodel.update_params([t * 3 for t in new])
    torch.testing.assert_close(list(fmodel.parameters(time=2))[1], new[1] * 2)
    torch.testing.assert_close(fmodel.fast_params[1], new[1] * 3)
    assert len(list(fmodel.parameters(time=-1))) == 2


def test_copy_initial_weights_semantics(lib):
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    fcopy = lib.monkeypatch(model, copy_initial_weights=True)
    fcopy(x).sum().backward()
    assert model.weight.grad is None  # detached copies: gradients stop at time 0
    assert next(fcopy.parameters(time=0)).grad is not None
    flink = lib.monkeypatch(model, copy_initial_weights=False)
    flink(x).sum().backward()
    torch.testing.assert_close(model.weight.grad, x.sum(0, keepdim=True))  # clones: gradients reach the model


def test_named_parameters_state_dict_and_buffers(lib):
    model = Net()
    x = torch.randn(16, 4)
    fmodel = lib.monkeypatch(model)
    assert [n for n, _ in fmodel.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(fmodel.state_dict()) == list(model.state_dict())
    before = model.encoder[1].running_mean.clone()
    fmodel(x)
    buffers = dict(fmodel.named_buffers())
    torch.testing.assert_close(model.encoder[1].running_mean, before)  # the model is untouched
    assert not torch.equal(buffers["encoder.1.running_mean"], before)  # the copy's statistics advance
    assert int(buffers["encoder.1.num_batches_tracked"]) == 1
    torch.testing.assert_close(fmodel.state_dict()["encoder.1.running_mean"], buffers["encoder.1.running_mean"])
    fmodel.eval()
    assert not fmodel.training and model.training


def test_direct_submodule_calls_use_fast_weights(lib):
    model = Net()
    x = torch.randn(6, 4)
    fmodel = lib.monkeypatch(model)
    fmodel.eval()
    w = [p * 1.5 for p in fmodel.parameters()]
    fmodel.update_params(w)
    hidden = torch.tanh(F.batch_norm(F.linear(x, w[0], w[1]), model.encoder[1].running_mean, model.encoder[1].running_var, w[2], w[3]))
    torch.testing.assert_close(fmodel.encoder(x), hidden)
    torch.testing.assert_close(fmodel.head(hidden), F.linear(hidden, w[4], w[5]))
    torch.testing.assert_close(fmodel.head.weight, w[4])


def test_nested_indexing_and_methods_of_the_users_class():
    # higher 0.2.1 fails here (AttributeError: '_refill_params_box' on fmodel[0][0], wrong weights on fmodel.encoder[0])
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2))
    x = torch.randn(6, 4)
    fmodel = uh.monkeypatch(model)
    w = [p + 1 for p in fmodel.parameters()]
    fmodel.update_params(w)
    torch.testing.assert_close(fmodel[0][0](x), F.linear(x, w[0], w[1]))
    torch.testing.assert_close(fmodel[0](x), F.relu(F.linear(x, w[0], w[1])))
    assert len(fmodel) == 2 and len(list(iter(fmodel[0]))) == 2
    assert [n for n, _ in fmodel[1].named_parameters()] == ["weight", "bias"]
    net = Net().eval()
    fnet = uh.monkeypatch(net)
    fnet.update_params([p * 2 for p in fnet.parameters()])
    torch.testing.assert_close(fnet.embed(x), fnet.encoder(x))


def test_assigning_a_weight(lib):
    model = nn.Linear(8, 2)
    fmodel = lib.monkeypatch(model)
    new = torch.zeros(2, 8, requires_grad=True)
    fmodel.weight = new
    assert list(fmodel.parameters())[0] is new
    assert len(list(fmodel.parameters(time=1))) == 2  # the assignment is a new time step, as in higher
    torch.testing.assert_close(fmodel(torch.randn(3, 8)), fmodel.bias.expand(3, 2))


def test_assigning_a_submodule_weight():
    # higher 0.2.1: AttributeError ('InnerFunctionalLinear' object has no attribute 'update_params')
    fmodel = uh.monkeypatch(Net())
    new = torch.zeros(2, 8, requires_grad=True)
    fmodel.head.weight = new
    assert list(fmodel.parameters())[4] is new
    assert len(list(fmodel.parameters(time=1))) == 6
    torch.testing.assert_close(fmodel(torch.randn(3, 4)), fmodel.head.bias.expand(3, 2))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.embed(idx)))


def test_tied_weights_stay_tied(lib):
    model = Tied()
    idx = torch.randint(0, 10, (7,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert len(list(fmodel.parameters())) == 1
        for _ in range(2):
            diffopt.step(F.cross_entropy(fmodel(idx), idx))
        w = fmodel.fast_params[0]
        torch.testing.assert_close(fmodel(idx), F.linear(torch.tanh(F.embedding(idx, w)), w))
        F.cross_entropy(fmodel(idx), idx).backward()
    # eager reference: the same two steps by hand with create_graph
    w0 = model.embed.weight
    ref_grad = model.embed.weight.grad.clone()
    model.zero_grad()
    w = w0.clone()
    for _ in range(2):
        (g,) = torch.autograd.grad(F.cross_entropy(F.linear(torch.tanh(F.embedding(idx, w)), w), idx), w, create_graph=True)
        w = w - 0.5 * g
    (ref,) = torch.autograd.grad(F.cross_entropy(F.linear(torch.tanh(F.embedding(idx, w)), w), idx), w0)
    torch.testing.assert_close(ref_grad, ref)


RNNS = [
    (nn.RNN, lambda m, x: m(x)[0]),
    (nn.LSTM, lambda m, x: m(x)[0]),
    (nn.GRU, lambda m, x: m(x)[0]),
    (nn.RNNCell, lambda m, x: m(x[:, 0])),
    (nn.LSTMCell, lambda m, x: m(x[:, 0])[0]),
    (nn.GRUCell, lambda m, x: m(x[:, 0])),
]


@pytest.mark.parametrize(("cls", "run"), RNNS, ids=[c.__name__ for c, _ in RNNS])
def test_recurrent_modules_meta_gradient(cls, run):
    import higher

    torch.manual_seed(0)
    kwargs = {"batch_first": True} if cls in (nn.RNN, nn.LSTM, nn.GRU) else {}
    model = cls(3, 5, **kwargs)
    x, y = torch.randn(4, 6, 3), torch.randn(4, 5)
    results = []
    for library in (uh, higher):
        model.zero_grad()
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
        with library.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            torch.testing.assert_close(run(fmodel, x), run(model, x)) if library is uh else None
            for _ in range(2):
                diffopt.step(F.mse_loss(run(fmodel, x).reshape(4, -1)[:, -5:], y))
            F.mse_loss(run(fmodel, x).reshape(4, -1)[:, -5:], y).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_make_functional_takes_weights_per_call(lib):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))  # no buffers: higher's needs buffer_sync
    x = torch.randn(5, 4)
    calls = []
    fmodule = lib.patch.make_functional(model, encapsulator=lambda f, m: calls.append(m))
    assert calls == [model]
    with pytest.raises(Exception):  # noqa: B017 - no fast weights yet: higher raises ValueError too
        fmodule(x)
    weights = [2 * p.detach() for p in model.parameters()]
    out = fmodule(x, params=weights)
    ref = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], weights, strict=True)), (x,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fmodule(x), ref)  # the weights passed last are kept


def test_patching_a_patched_module_is_refused():
    fmodel = uh.monkeypatch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already a functional module"):
        uh.monkeypatch(fmodel)


class WithContext(nn.Module):
    """CAVIA-style: a plain tensor attribute and a float the forward reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.scale = 1.0
        self.context = torch.zeros(3)

    def forward(self, x):
        return self.lin(x + self.context) * self.scale


def test_attributes_are_shared_and_settable_as_in_higher(lib):
    torch.manual_seed(0)
    model = WithContext()
    x = torch.randn(4, 3)
    fmodel = lib.monkeypatch(model)
    before = fmodel(x).sum().item()
    fmodel.scale = 5.0
    context = torch.ones(3, requires_grad=True)
    fmodel.context = context
    out = fmodel(x).sum()
    out.backward()
    ref = (model.lin(x + context.detach()) * 5.0).sum()
    assert out.item() != before and torch.allclose(out, ref)
    assert context.grad is not None and fmodel.scale == 5.0


def test_modules_and_apply_reach_the_layers(lib):
    """The usual "freeze BatchNorm" pattern: fmodel.apply(fn) with isinstance checks on the layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    fmodel = lib.monkeypatch(model)
    assert any(isinstance(m, nn.BatchNorm1d) for m in fmodel.modules())
    assert len(list(fmodel.children())) == 3
    fmodel.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm1d) else None)
    fmodel(torch.randn(8, 4))
    running_mean = dict(fmodel.named_buffers())["1.running_mean"]
    assert torch.equal(running_mean, torch.zeros(3))  # eval mode: the running statistics did not move


def test_isinstance_sees_the_users_classes(lib):
    """Code that branches on layer types (``isinstance(fmodel.encoder[1], nn.BatchNorm1d)``) runs as in higher,
    whose patched modules subclass the user's classes."""
    fmodel = lib.monkeypatch(Net())
    assert isinstance(fmodel, Net) and isinstance(fmodel, nn.Module)
    assert isinstance(fmodel, lib.patch._MonkeyPatchBase)
    assert isinstance(fmodel.encoder, nn.Sequential) and isinstance(fmodel.head, nn.Linear)
    assert isinstance(fmodel.encoder[1], nn.BatchNorm1d) and not isinstance(fmodel.encoder[1], nn.Linear)


class _WithLock(nn.Module):
    """A module ``copy.deepcopy`` refuses: a lock in a private attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.5)
        self._lock = __import__("threading").Lock()
        self.scale = 1.0

    def forward(self, x):
        return self.drop(self.layer(x)) * self.scale


@pytest.mark.parametrize("parametrized", [False, True], ids=["plain", "weight_norm-parametrization"])
def test_a_module_deepcopy_refuses_is_not_changed_through_the_functional_module(lib, parametrized):
    """fmodel.eval() and attribute assignment act on the functional module's own structure, as in higher, even
    when the user's module cannot be deep-copied (nor pickled, as parametrized modules refuse); the weights
    still reach the user's parameters."""
    if parametrized and lib.__name__ == "higher":
        pytest.skip("higher 0.2.1 does not support parametrizations")
    torch.manual_seed(0)
    model = _WithLock()
    if parametrized:
        nn.utils.parametrizations.weight_norm(model.layer)
        with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
            fmodel.eval()
            diffopt.step(fmodel(torch.randn(4, 3)).square().sum())
        assert model.training and model.drop.training
        return
    x = torch.randn(4, 3)
    with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fmodel, diffopt):
        fmodel.eval()
        fmodel.scale = 5.0
        diffopt.step(fmodel(x).square().sum())
        out = fmodel(x)
    assert model.training and model.drop.training and model.scale == 1.0
    expected_w = model.layer.weight - 0.1 * 2 * 5.0 * (5.0 * model.layer(x)).T @ x
    torch.testing.assert_close(out, F.linear(x, expected_w, model.layer.bias - 0.1 * 2 * 25.0 * model.layer(x).sum(0)) * 5.0)
    (g,) = torch.autograd.grad(out.sum(), [model.layer.bias])
    assert g is not None


def test_a_step_after_the_context_exits_is_refused():
    """Leaving innerloop_ctx detaches the optimizer state (to free the unrolled graph); a later step would lose
    the path through it (momentum), so it raises instead of giving a wrong meta-gradient."""
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    with uh.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) as (fmodel, diffopt):
        diffopt.step(fmodel(x).square().mean())
    with pytest.raises(RuntimeError, match=r"DifferentiableOptimizer.step: the innerloop_ctx .* has exited"):
        diffopt.step(fmodel(x).square().mean())
    fmodel(x)  # the latest weights stay usable for a meta-loss


class _WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.h = nn.Linear(5, 3)

    @property
    def w_norm(self):
        return self.l.weight.norm()

    def forward(self, x):
        return self.h(self.bn(self.l(x)))


def test_the_layers_hold_the_fast_weights_outside_a_call_too(lib):
    """A property of the user's class, modules(), a submodule's buffers() / state_dict() and apply() read or
    edit the fast weights and the functional module's buffers, never the user's model (as in higher)."""
    torch.manual_seed(0)
    model = _WithNorm()
    original = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.5)) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x), y))
        fast = dict(fmodel.named_parameters())
        assert torch.equal(fmodel.w_norm, fast["l.weight"].norm())
        lin = next(m for m in fmodel.modules() if isinstance(m, nn.Linear))
        bn = next(m for m in fmodel.modules() if isinstance(m, nn.BatchNorm1d))
        assert torch.equal(lin.weight, fast["l.weight"])
        assert torch.equal(bn.running_mean, fmodel.bn.running_mean) and bn.running_mean.abs().sum() > 0
        assert torch.equal(list(fmodel.bn.buffers())[0], fmodel.bn.running_mean)
        assert torch.equal(fmodel.l.state_dict()["weight"], fast["l.weight"])

    def zero(m):
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.zero_()

    fmodel = lib.monkeypatch(model)
    fmodel.apply(zero)
    assert float(next(iter(fmodel.parameters())).detach().abs().sum()) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original, strict=True))
    assert model.bn.running_mean.abs().sum() == 0  # the user's buffers never moved


class _Tempered(nn.Module):
    def __init__(self, temperature: torch.Tensor) -> None:
        super().__init__()
        self.l = nn.Linear(4, 3)
        self._temperature = temperature  # meta-learned, kept in a private attribute
        self._mask = torch.ones(3, 4)    # a pruning mask, edited in place later

    def forward(self, x):
        return F.linear(x, self.l.weight * self._mask, self.l.bias) / self._temperature


def test_tensors_in_private_attributes_are_shared_with_the_model(lib):
    torch.manual_seed(0)
    temperature = torch.tensor(2.0, requires_grad=True)
    model = _Tempered(temperature)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(x), y).backward()
    assert temperature.grad is not None and temperature.grad != 0  # the meta-gradient reaches it
    fmodel = lib.monkeypatch(model)
    model._mask[:, :2] = 0
    assert torch.allclose(fmodel(x), model(x))  # the in-place edit is seen


def test_a_module_kept_without_registering_it_is_shared():
    """A teacher network kept in ``__dict__`` (so that it is not trained) is used, not copied: its weights
    get their gradient as in ``model(x)`` (higher 0.2.1 fails on such a model)."""
    torch.manual_seed(0)

    class WithTeacher(nn.Module):
        def __init__(self, teacher: nn.Module) -> None:
            super().__init__()
            self.l = nn.Linear(4, 3)
            self.__dict__["teacher"] = teacher

        def forward(self, x):
            return self.l(x) + self.teacher(x)

    teacher = nn.Linear(4, 3)
    model = WithTeacher(teacher)
    x = torch.randn(8, 4)
    fmodel = uh.monkeypatch(model)
    fmodel(x).pow(2).sum().backward()
    expected = torch.autograd.grad(model(x).pow(2).sum(), teacher.weight)[0]
    assert torch.allclose(teacher.weight.grad, expected)


def test_one_tensor_may_be_the_fast_weight_of_two_untied_parameters(lib):
    """Which names are tied is read from the user's module once, not from the fast weights held now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    fmodel = lib.monkeypatch(model)
    w, b = torch.randn(4, 4), torch.randn(4)
    fmodel(x, params=[w, b, w, b])
    out = fmodel(x, params=[w, b, 2 * w, b])
    assert torch.allclose(out, F.linear(F.linear(x, w, b), 2 * w, b))


class _WithContainers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pl = nn.ParameterList([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))])
        self.pd = nn.ParameterDict({"w": nn.Parameter(torch.randn(3))})

    def forward(self, x):
        return x * self.pl[0] + self.pl[1] + self.pd["w"]


def test_parameter_containers_index_to_the_fast_weights(lib):
    torch.manual_seed(0)
    model = _WithContainers()
    with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(fmodel(torch.ones(2, 3)).pow(2).sum())
        fast = dict(fmodel.named_parameters())
        assert torch.equal(fmodel.pl[0], fast["pl.0"]) and torch.equal(fmodel.pl[-1], fast["pl.1"])
        assert torch.equal(fmodel.pd["w"], fast["pd.w"]) and not torch.equal(fast["pd.w"], model.pd["w"])


def test_assigning_training_is_seen_by_the_forward(lib):
    """``fmodel.training = False`` sets the root module's flag, which its forward reads (self.training)."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) + (100.0 if self.training else 0.0)

    model = Noisy()
    fmodel = lib.monkeypatch(model)
    x = torch.randn(2, 3)
    fmodel.training = False
    assert not fmodel.training and model.training
    torch.testing.assert_close(fmodel(x), model.lin(x))
    fmodel.training = True
    torch.testing.assert_close(fmodel(x), model.lin(x) + 100.0)


def test_a_functional_module_pickles_and_lists_its_own_attributes():
    """The __class__ property (isinstance as in higher) made pickle refuse the module and dir() list the user's
    class only."""
    import pickle

    model = Net()
    fmodel = uh.monkeypatch(model)
    x = torch.randn(5, 4)
    fmodel.eval()
    again = pickle.loads(pickle.dumps(fmodel))
    assert type(again) is uh.patch.FunctionalModule and isinstance(again, Net)
    again.eval()
    torch.testing.assert_close(again(x), fmodel(x))
    assert {"write_back", "fast_params", "embed"} <= set(dir(fmodel))


def test_load_state_dict_copies_into_the_fast_weights_and_buffers(lib):
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        saved = {k: v.clone() for k, v in fmodel.state_dict().items()}
        out = fmodel(x)
        fmodel.load_state_dict(saved)  # round trip: keys as state_dict() gives them
        diffopt.step(F.mse_loss(fmodel(x), y))
        fmodel.load_state_dict(saved)
        torch.testing.assert_close(fmodel(x), out)
        zeros = {k: torch.zeros_like(v) for k, v in saved.items() if k.startswith("head.")}
        result = fmodel.load_state_dict(zeros, strict=False)
        assert len(result.unexpected_keys) == 0 and "encoder.0.weight" in result.missing_keys
        assert fmodel.head.weight.abs().sum() == 0 and fmodel.fast_params[-1].abs().sum() == 0
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())  # the user's module is untouched


def test_load_state_dict_with_assign_is_refused_with_the_fix():
    model = nn.Linear(3, 2)
    fmodel = uh.monkeypatch(model)
    with pytest.raises(ValueError, match="update_params"):
        fmodel.load_state_dict(model.state_dict(), assign=True)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # higher's own .to()
def test_converting_to_the_current_device_and_dtype_is_a_no_op(lib):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    grads = []
    for convert in (lambda f: f, lambda f: f.to("cpu").cpu().double().to(torch.float64)):
        with lib.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fmodel, diffopt):
            fmodel = convert(fmodel)
            diffopt.step(F.mse_loss(fmodel(x), y))
            grads.append(torch.autograd.grad(F.mse_loss(fmodel(x + 1), y), list(model.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_real_conversion_is_refused_and_leaves_the_model_alone():
    model = nn.Linear(3, 2)
    fmodel = uh.monkeypatch(model)
    with pytest.raises(RuntimeError, match="convert the model before patching"):
        fmodel.half()
    assert model.weight.dtype == torch.float32 and all(p.dtype == torch.float32 for p in fmodel.parameters())
