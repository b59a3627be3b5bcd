"""Model families: trajectories equal eager torch.optim, meta-gradients equal finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unrollc
from oracles import central_difference
from test_optimizers import assert_same_trajectory


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)  # a bias before BN has zero gradient: Adam would amplify noise
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(self.norm(self.emb(tokens))).mean(1)[:, :2]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class PaddedAttention(Attention):
    """A key padding mask the model closes over (a plain tensor attribute): torch canonicalizes it with
    ``zeros_like(mask).masked_fill_(mask, -inf)``, which functionalize left in place (an InternalError, found in
    review)."""

    def __init__(self):
        super().__init__()
        self.mask = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2, [False, True] * 2 + [False]])

    def forward(self, x):
        return self.head(self.layer(x, src_key_padding_mask=self.mask).mean(1))


def restored():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    other = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model.load_state_dict(other.state_dict())
    return model


MODELS = {
    "conv-batchnorm": (ConvBN, lambda: torch.randn(4, 2, 4, 4)),
    "lstm": (lambda: Recurrent(nn.LSTM), lambda: torch.randn(4, 5, 3)),
    "gru": (lambda: Recurrent(nn.GRU), lambda: torch.randn(4, 5, 3)),
    "tied-embedding-layernorm": (Tied, lambda: torch.randint(0, 7, (4, 5))),
    "transformer-encoder": (Attention, lambda: torch.randn(4, 5, 4)),
    "transformer-padding-mask": (PaddedAttention, lambda: torch.randn(4, 5, 4)),
    "load_state_dict": (restored, lambda: torch.randn(4, 3)),
}


def loss_fn(model, batch, w=None):
    x, y = batch
    per = ((model(x) - y) ** 2).mean(1)
    return (per * w).mean() if w is not None else per.mean()


@pytest.mark.parametrize("name", list(MODELS))
def test_trajectory(name):
    make, data = MODELS[name]
    model = make()
    # SGD: Adam turns the ~1e-9 noise in parameters with zero true gradient (an attention key bias)
    # into full-size steps, so its trajectories compare rounding noise, not the compiler.
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(data(), torch.randn(4, 2)) for _ in range(30)]
    stepper, state = assert_same_trajectory(model, opt, loss_fn, batches, tol=1e-4)
    if name == "conv-batchnorm":  # running stats advance in state.buffers, the model's stay put
        assert state.buffers["bn.num_batches_tracked"].item() == 30
        assert model.bn.num_batches_tracked.item() == 0
        assert not torch.equal(state.buffers["bn.running_mean"], model.bn.running_mean)


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_gradient(name, float64):
    make, data = MODELS[name]
    model = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn)
    batches = [(data(), torch.randn(4, 2)) for _ in range(3)]
    xv, yv = data(), torch.randn(4, 2)
    w0 = torch.rand(4) + 0.5
    lr0 = torch.tensor(0.1)

    def meta(w, lr):
        state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, w)
        return ((stepper.forward(state, xv) - yv) ** 2).mean()

    w, lr = w0.clone().requires_grad_(), lr0.clone().requires_grad_()
    g_w, g_lr = torch.autograd.grad(meta(w, lr), [w, lr])
    with torch.no_grad():
        fd_w = central_difference(lambda v: meta(v, lr0), w0)
        fd_lr = central_difference(lambda v: meta(w0, v), lr0)
    assert ((g_w - fd_w).abs().max() / fd_w.abs().max()) < 1e-6
    assert ((g_lr - fd_lr).abs() / fd_lr.abs()) < 1e-6


def test_model_and_optimizer_are_never_mutated():
    model = ConvBN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stepper = unrollc.compile(model, opt, loss_fn)
    state = stepper.unroll(stepper.init(), [(torch.randn(4, 2, 4, 4), torch.randn(4, 2)) for _ in range(3)], checkpoint="sqrt")
    stepper.forward(state, torch.randn(4, 2, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {}
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_gradient_matches_hand_written_eager_unroll(name, float64):
    """Every model family: SGD-momentum meta-gradient equals a hand-written create_graph=True unroll."""
    from oracles import eager_unroll, sgd_momentum

    make, data = MODELS[name]
    model = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn)
    batches = [(data(), torch.randn(4, 2)) for _ in range(3)]
    xv = data()
    final = stepper.unroll(stepper.init(), batches)
    ours = torch.autograd.grad(stepper.forward(final, xv).sum(), list(model.parameters()))
    params = eager_unroll(model, loss_fn, batches, sgd_momentum(0.1, 0.9))
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    if name == "conv-batchnorm":  # forward() uses the unroll's running stats; the eager unroll's copies match
        buffers = {n: b.detach() for n, b in final.buffers.items()}
    with torch.nn.utils.stateless._reparametrize_module(model, {**dict(zip(names, params)), **buffers}, tie_weights=True):
        out = model(xv)
    ref = torch.autograd.grad(out.sum(), list(model.parameters()))
    for a, b in zip(ours, ref, strict=True):
        assert ((a - b).abs().max() / (b.abs().max() + 1e-12)) < 1e-9


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_weight_norm_meta_gradient_equals_finite_differences(kind, float64):
    """weight_norm(dim=0) runs ATen's fused kernel, whose double backward is wrong on CPU (torch's own
    create_graph unroll is ~0.2% off here); the capture decomposes it, so the meta-gradient is exact."""
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        if kind == "hook":
            nn.utils.weight_norm(model[0])
        else:
            nn.utils.parametrizations.weight_norm(model[0])
        return model

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)) for _ in range(3)]
    xv, yv = torch.randn(7, 4, generator=gen), torch.randn(7, 2, generator=gen)
    model = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)

    def meta(lr):
        state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches)
        return ((stepper.forward(state, xv) - yv) ** 2).mean()

    lr = torch.tensor(0.1, requires_grad=True)
    (g,) = torch.autograd.grad(meta(lr), lr)
    with torch.no_grad():
        fd = central_difference(meta, torch.tensor(0.1))
    assert abs(g - fd) / abs(fd) < 1e-7


def test_parameter_gradient_hooks_are_applied_as_in_eager_training(float64):
    """``Tensor.register_hook`` on a parameter (gradient masking, clamping) changes the gradient eager
    ``loss.backward()`` accumulates: the step graph applies it too (it was ignored: a weight whose hook zeroes its
    gradient moved, found in review). Trajectory = eager torch.optim, meta-gradient = a hand-written unroll that
    applies the hooks; adding or removing a hook traces a new graph; a post-accumulate-grad hook is refused."""
    from oracles import eager_unroll, sgd_momentum

    torch.manual_seed(0)
    mask = (torch.rand(5, 4) > 0.5).double()
    hooks = {"0.weight": lambda g: g * mask, "2.weight": lambda g: g.clamp(-0.01, 0.01), "2.bias": lambda g: None}

    def make():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        for n, hook in hooks.items():
            model.get_parameter(n).register_hook(hook)
        return model

    batches = [(torch.randn(3, 4), torch.randn(3, 2)) for _ in range(4)]
    model = make()
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn)
    final = stepper.unroll(stepper.init(), batches)
    eager = make()  # deepcopy would drop the hooks
    opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    for b in batches:
        opt.zero_grad()
        loss_fn(eager, b).backward()
        opt.step()
    for n, p in eager.named_parameters():
        torch.testing.assert_close(final.params[n], p, rtol=1e-12, atol=1e-14)
    assert torch.equal(final.params["0.weight"][mask == 0], model[0].weight[mask == 0])  # masked entries stay
    assert not torch.equal(final.params["0.weight"][mask == 1], model[0].weight[mask == 1])

    lr = torch.tensor(0.1, requires_grad=True)
    for checkpoint in (None, 2):
        out = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, checkpoint=checkpoint)
        ours = torch.autograd.grad(sum(p.sum() for p in out.params.values()), lr)[0]
        names = [n for n, _ in model.named_parameters()]
        sgd = sgd_momentum(lr, 0.9)

        def hooked(params, grads, states, t):
            grads = [h(g) if (h := hooks.get(n)) is not None and h(g) is not None else g for n, g in zip(names, grads)]
            return sgd(params, grads, states, t)

        ref = eager_unroll(model, loss_fn, batches, hooked)
        torch.testing.assert_close(ours, torch.autograd.grad(sum(p.sum() for p in ref), lr)[0], rtol=1e-10, atol=0)

    traced = stepper.trace_count
    handle = model[2].bias.register_hook(lambda g: g * 0)
    assert torch.equal(stepper.step(stepper.init(), batches[0]).params["2.bias"], model[2].bias)
    assert stepper.trace_count == traced + 1
    handle.remove()
    model[0].bias.register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(TypeError, match=r"Stepper.step: parameter '0.bias' has a hook registered with "
                                        r"register_post_accumulate_grad_hook.*grad_callback"):
        stepper.step(stepper.init(), batches[0])


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.alias = self.block  # one submodule under two names
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.alias(torch.tanh(self.block(x)))))


def test_a_submodule_registered_under_two_names_steps_and_leaves_the_model_as_it_was(float64):
    """``self.alias = self.block``: torch's tie_weights swap saw two names for one (module, attribute) and left a plain
    tensor in the user's model (first the stepped values, then a capture error; found in review). Trajectory =
    eager torch.optim; the model keeps its Parameters, also when it is a meta argument; the lr meta-gradient equals
    central differences of the eager trajectory."""
    torch.manual_seed(0)
    model = _Aliased()
    before = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in before.items()}
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn)
    lr = torch.tensor(0.1, requires_grad=True)
    final = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, checkpoint=2)
    meta = stepper.forward(final, batches[0][0]).square().sum()
    (ours,) = torch.autograd.grad(meta, lr)
    for n, p in model.named_parameters():
        assert p is before[n] and type(p) is nn.Parameter and torch.equal(p.detach(), values[n]), n
    assert model.alias is model.block

    def eager(lr_value):
        m = _Aliased()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(values[n])
        opt = torch.optim.SGD(m.parameters(), lr=float(lr_value), momentum=0.9)
        for b in batches:
            opt.zero_grad()
            loss_fn(m, b).backward()
            opt.step()
        with torch.no_grad():
            return m, m(batches[0][0]).square().sum()

    m, _ = eager(0.1)
    for n, p in m.named_parameters():
        torch.testing.assert_close(final.params[n], p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, central_difference(lambda x: eager(x)[1], lr.detach()), rtol=1e-6, atol=1e-9)

    def weighted(m, b, critic):  # the aliased module as a meta argument
        return loss_fn(m, b) + critic(b[1][:, :1].expand(-1, 3)).square().mean()

    critic = _Aliased()
    critic_params = dict(critic.named_parameters())
    meta_stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), weighted)
    meta_stepper.unroll(meta_stepper.init(), batches, critic)
    assert all(p is critic_params[n] and type(p) is nn.Parameter for n, p in critic.named_parameters())


class _EmbeddingMaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3, max_norm=1.0)
        self.head = nn.Linear(3, 1)
        with torch.no_grad():
            self.emb.weight.mul_(3)  # rows above max_norm: the lookups renormalize them

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def _plain_sgd_meta_gradient(model, batches, lr):
    """d loss(batches[0]) after an SGD(lr) unroll over ``batches`` / d lr, by a hand-written create_graph unroll of
    copies of ``model``'s weights (which its forward may write into under no_grad, as eager training would)."""
    from oracles import eager_unroll, sgd_momentum

    params = eager_unroll(model, loss_fn, batches, sgd_momentum(lr, 0.0), params=[p.clone() for p in model.parameters()])
    weights = dict(zip((n for n, _ in model.named_parameters()), params))
    with torch.nn.utils.stateless._reparametrize_module(model, weights):
        return torch.autograd.grad(loss_fn(model, batches[0]), lr)[0]


def test_embedding_max_norm_renormalizes_as_eager_and_has_eager_autograds_meta_gradient(float64):
    """F.embedding renormalizes the looked-up rows in place under no_grad: the trajectory is eager torch.optim's, and
    the meta-gradient an eager create_graph unroll's (autograd differentiates as if the weight were unchanged). The
    functionalized embedding_renorm has no derivative: the meta-backward failed (found in review)."""
    import copy

    from oracles import eager_trajectory

    torch.manual_seed(0)
    model = _EmbeddingMaxNorm()
    pristine = copy.deepcopy(model)
    batches = [(torch.randint(0, 6, (4, 3)), torch.randn(4, 1)) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = unrollc.compile(model, opt, loss_fn)
    ref = eager_trajectory(model, opt, loss_fn, batches)[-1][0]
    with torch.no_grad():
        final = stepper.unroll(stepper.init(), batches)
    for n, p in ref.items():
        assert torch.equal(final.params[n], p), n

    lr = torch.tensor(0.1, requires_grad=True)
    expected = _plain_sgd_meta_gradient(pristine, batches, lr)
    for checkpoint in (None, "sqrt"):
        out = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, checkpoint=checkpoint)
        got = torch.autograd.grad(loss_fn(lambda x: stepper.forward(out, x), batches[0]), lr)[0]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


class _ClampedInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-0.3, 0.3)  # a weight constraint written in the forward
        return self.head(torch.tanh(self.lin(x)))


def test_an_in_place_write_into_a_weight_under_no_grad_changes_values_not_gradients(float64):
    """Eager autograd does not see a write under no_grad: the weight takes the new values and its gradient path is
    unchanged. The meta-gradient went through clamp's mask (-1.649 where eager's is -1.481)."""
    import copy

    from oracles import eager_trajectory

    torch.manual_seed(0)
    model = _ClampedInForward()
    pristine = copy.deepcopy(model)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stepper = unrollc.compile(model, opt, loss_fn)
    ref = eager_trajectory(model, opt, loss_fn, batches)[-1][0]
    lr = torch.tensor(0.5, requires_grad=True)
    final = stepper.unroll(stepper.init(hyper={"lr": lr}), batches)
    for n, p in ref.items():
        assert torch.equal(final.params[n].detach(), p), n
    assert torch.equal(model.lin.weight, pristine.lin.weight)  # the user's weight is not clamped
    ours = torch.autograd.grad(loss_fn(lambda x: stepper.forward(final, x), batches[0]), lr)[0]
    torch.testing.assert_close(ours, _plain_sgd_meta_gradient(pristine, batches, lr), rtol=1e-12, atol=0)


@pytest.mark.parametrize("checkpoint", [None, "sqrt"])
def test_rrelu_in_training_has_eager_autograds_meta_gradient(checkpoint, float64):
    """``nn.RReLU`` draws a slope per element in training; torch's derivative of the functional op the step graph
    holds (``rrelu_with_noise_functional``) reads its uninitialised input buffer instead of the slopes drawn, so
    the meta-gradient was garbage (found in review). The trajectory and the meta-gradient must equal eager
    training and a hand-written ``create_graph`` unroll under the same seed, and finite differences of eager
    ``torch.optim`` training."""
    from oracles import eager_trajectory, eager_unroll, sgd_momentum

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.RReLU(0.1, 0.3), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(6, 4), torch.randn(6, 2)) for _ in range(3)]
    xv = torch.randn(5, 4)
    stepper = unrollc.compile(model, opt, loss_fn)

    def validation(forward, params):
        model.eval()  # RReLU's eval slope is fixed: the validation loss draws nothing
        try:
            return (forward(params, xv) ** 2).mean()
        finally:
            model.train()

    lr = torch.tensor(0.1, requires_grad=True)
    torch.manual_seed(99)
    final = stepper.unroll(stepper.init(hyper={"lr": lr}), batches, checkpoint=checkpoint)
    ours = torch.autograd.grad(validation(lambda s, x: stepper.forward(s, x), final), [lr, *model.parameters()])

    torch.manual_seed(99)
    trained = eager_trajectory(model, opt, lambda m, b: loss_fn(m, b), batches)[-1][0]
    assert all(torch.equal(final.params[k], v) for k, v in trained.items())

    names = [n for n, _ in model.named_parameters()]

    def eager_forward(params, x):
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, params, strict=True))):
            return model(x)

    def eager_meta_loss(lr_value):
        torch.manual_seed(99)
        return validation(eager_forward, eager_unroll(model, loss_fn, batches, sgd_momentum(lr_value, 0.9)))

    lr_ref = torch.tensor(0.1, requires_grad=True)
    ref = torch.autograd.grad(eager_meta_loss(lr_ref), [lr_ref, *model.parameters()])
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    fd = central_difference(lambda v: eager_meta_loss(v).detach(), torch.tensor(0.1))  # autograd inside: no no_grad
    assert abs(ours[0] - fd) < 1e-6 * abs(fd)
