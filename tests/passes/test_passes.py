"""Each pass establishes the invariant its docstring states; the final graph is lean."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import unrollc
from oracles import HandWritten
from unrollc.passes import PIPELINE
from unrollc.passes.schema import is_mutating, namespace


def compiled(opt_cls=torch.optim.SGD, **kwargs):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    opt = opt_cls(model.parameters(), **(kwargs or {"lr": 0.1, "momentum": 0.9}))
    stepper = unrollc.compile(model, opt, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    state = stepper.init()
    batch = (torch.randn(8, 3), torch.randn(8, 2))
    state = stepper.step(state, batch)
    state = stepper.step(state, batch)  # the steady-state graph (optimizer state exists)
    return stepper


def calls(gm: fx.GraphModule):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def test_pipeline_is_the_documented_literal_tuple():
    assert [p.__name__ for p in PIPELINE] == [
        "lift_inputs", "functionalize", "strip_detach", "strip_profiler", "remove_copies", "eliminate_dead_code",
        "python_pow", "cse", "safe_sqrt",
    ]


def test_graphs_after_every_pass_are_kept():
    stepper = compiled()
    assert list(stepper.graphs) == ["captured"] + [f"after {p.__name__}" for p in PIPELINE]


def test_lift_inputs_leaves_no_parameter_attributes():
    stepper = compiled()
    before = stepper.graphs["captured"]
    after = stepper.graphs["after lift_inputs"]
    assert any(n.op == "get_attr" for n in before.graph.nodes)
    roles = [n.meta["unrollc"].role for n in after.graph.nodes if n.op == "placeholder"]
    assert roles == sorted(roles, key=["param", "buffer", "opt_state", "hyper", "batch", "meta"].index)
    for n in after.graph.nodes:
        if n.op == "get_attr":
            assert not isinstance(getattr(after, n.target), nn.Parameter)
    names = [n.name for n in after.graph.nodes if n.op == "placeholder"]
    assert "p_0_weight" in names and "b_1_running_mean" in names and "s_0_weight_momentum_buffer" in names and "h_lr" in names


@pytest.mark.parametrize(
    "opt_cls,kwargs",
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.01, "foreach": True}), (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5})],
)
def test_functionalize_leaves_no_mutation_read_from_schemas(opt_cls, kwargs):
    stepper = compiled(opt_cls, **kwargs)
    raw = stepper.graphs["after lift_inputs"]
    assert any(is_mutating(n.target) for n in calls(raw))
    for name in list(stepper.graphs)[2:]:
        assert not any(is_mutating(n.target) for n in calls(stepper.graphs[name])), name


def test_cleanup_removes_profiler_detach_and_copies():
    stepper = compiled()
    final = stepper.graph
    targets = [n.target for n in calls(final)]
    assert not any(namespace(t) == "profiler" for t in targets)
    assert torch.ops.aten.detach.default not in targets
    assert torch.ops.aten.clone.default not in targets
    assert torch.ops.aten.lift_fresh_copy.default not in targets
    assert any(namespace(n.target) == "profiler" for n in calls(stepper.graphs["captured"]))


def test_users_own_detach_is_kept():
    model = nn.Linear(3, 2)

    def loss_fn(m, batch):
        x, y = batch
        target = m(y).detach()  # deliberate stop-gradient
        return ((m(x) - target) ** 2).mean()

    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    stepper.step(stepper.init(), (torch.randn(4, 3), torch.randn(4, 3)))
    assert torch.ops.aten.detach.default in [n.target for n in calls(stepper.graph)]


def test_final_graph_signature_and_no_view_copies():
    stepper = compiled()
    gm = stepper.graph
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    sig = gm.meta["unrollc"]["signature"]
    assert len(outputs) == len(sig.params) + len(sig.buffers) + len(sig.state_out) + 1
    targets = {str(n.target) for n in calls(gm)}
    assert not any(t.endswith("_copy.default") for t in targets - {"aten._to_copy.default"})


@pytest.mark.parametrize("opt_cls,kwargs", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.01})])
def test_each_pass_is_idempotent_on_the_final_graph(opt_cls, kwargs):
    stepper = compiled(opt_cls, **kwargs)
    gm = stepper.graph
    code = gm.code
    for p in PIPELINE[2:]:
        gm = p(gm)
    assert gm.code == code


def test_adam_meta_gradient_is_finite_with_dead_units(float64):
    """Dead ReLU units keep Adam's exp_avg_sq at 0; sqrt'(0) = inf must not turn the meta-gradient into NaN."""
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # four units never fire
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01), lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batches = [(torch.randn(6, 3), torch.randn(6, 1)) for _ in range(4)]
    xv = torch.randn(5, 3)
    W0 = model[2].weight.detach().clone()

    def meta(W):
        final = stepper.unroll(stepper.init(params={"2.weight": W}), batches)
        return stepper.forward(final, xv).pow(2).mean()

    W = W0.clone().requires_grad_()
    (g,) = torch.autograd.grad(meta(W), W)
    assert torch.isfinite(g).all()
    from oracles import central_difference

    with torch.no_grad():
        fd = central_difference(meta, W0)
    assert ((g - fd).abs().max() / fd.abs().max()) < 1e-6
    assert (g[0, :4] == 0).all()  # the dead units' outgoing weights get no meta-gradient
    targets = [n.target for n in stepper.graph.graph.nodes]
    assert torch.ops.aten.sqrt.default not in targets
    assert torch.ops.unrollc.safe_sqrt.default in targets or torch.ops.unrollc.safe_sqrt_masked.default in targets


def test_python_pow_touches_only_the_optimizers_powers_of_python_numbers(float64):
    """Adam's ``bias_correction2 ** 0.5`` (hyperparameters and the step counter only) gets C's pow; the user's own
    ``** 0.5`` on a 0-dim tensor, and Adam's maths on a 0-dim parameter's state, stay ATen's; lint checks it."""
    from unrollc.inspect.lint import check_after
    from unrollc.passes.python_pow import pows_of_python_numbers

    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)
            self.temperature = nn.Parameter(torch.tensor(1.5))  # 0-dim: its exp_avg_sq is 0-dim too

        def forward(self, x):
            return self.l(x) / self.temperature ** 0.5  # the user's own power of a 0-dim tensor

    model = Tempered()
    stepper = unrollc.compile(model, torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99)),
                              lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batch = (torch.randn(8, 3), torch.randn(8, 2))
    stepper.step(stepper.step(stepper.init(), batch), batch)
    before, after = stepper.graphs["after eliminate_dead_code"], stepper.graphs["after python_pow"]
    found = pows_of_python_numbers(before)
    assert len(found) == 3  # bias_correction2 ** 0.5 for each of the 3 parameters, before cse merges them
    assert all(n.args[1] == 0.5 and n.meta["val"].dim() == 0 for n in found)
    user = [n for n in before.graph.nodes if n.target is torch.ops.aten.pow.Tensor_Scalar and n not in found]
    assert any(n.args[1] == 0.5 for n in user)  # the forward's ** 0.5 (its backward's powers, the loss's pow(2))
    kept = [n for n in after.graph.nodes if n.target is torch.ops.aten.pow.Tensor_Scalar]
    assert [n.name for n in kept] == [n.name for n in user]
    assert pows_of_python_numbers(after) == []
    assert PIPELINE[6].__name__ == "python_pow"
    check_after(after, [p.__name__ for p in PIPELINE[:7]])
    with pytest.raises(Exception, match="python_pow"):
        check_after(before, [p.__name__ for p in PIPELINE[:7]])


def _views(x: torch.Tensor) -> list[torch.Tensor]:
    return [x, x.t(), x[1:3], x[:, 2:5], x[1:4, 2:7], x[:, 1::3], x[::2, ::3], x[:, 2], x[3], x[2:3, 4:5],
            x.t()[::2, 1:], x.t()[5], x[1:2], x[4:, 7]]


def test_as_strided_scatter_of_a_box_of_slices_becomes_slice_scatters_with_the_same_values():
    """The reading of as_strided's (size, stride, offset) as slices, permutes and selects, compared with
    as_strided_scatter itself on every kind of view an in-place update can take."""
    from unrollc.passes.functionalize import _scatter_as_slices, _view_as_slices

    base = torch.arange(48.0).reshape(6, 8)
    for view in _views(base):
        size, stride, offset = view.shape, view.stride(), view.storage_offset()
        recipe = _view_as_slices(base, size, stride, offset)
        assert recipe is not None, (size, stride, offset)
        src = torch.randn(size)
        got = _scatter_as_slices(lambda f, *a, **k: f(*a, **k), base, src, recipe)
        assert torch.equal(got, torch.as_strided_scatter(base, src, size, stride, offset))


@pytest.mark.parametrize("view", [((6, 8), (0, 1), 0), ((3, 3), (1, 1), 0), ((4,), (3,), 40)])
def test_overlapping_or_out_of_range_views_are_not_read_as_slices(view):
    from unrollc.passes.functionalize import _view_as_slices

    assert _view_as_slices(torch.zeros(6, 8), *view) is None


def test_a_contiguous_base_with_other_strides_in_size_one_dims_is_read_by_its_shape():
    """Linear(.., 1)(h).t() is contiguous with strides (1, 1): its view [:, 1:3] was read with those strides and
    the rewrite crashed the compile."""
    from unrollc.passes.functionalize import _scatter_as_slices, _view_as_slices

    base = torch.arange(6.0).reshape(6, 1).t()
    assert base.is_contiguous() and base.stride() == (1, 1)
    view = base[:, 1:3]
    recipe = _view_as_slices(base, view.shape, view.stride(), view.storage_offset())
    src = torch.randn(view.shape)
    got = _scatter_as_slices(lambda f, *a, **k: f(*a, **k), base, src, recipe)
    assert torch.equal(got, torch.as_strided_scatter(base, src, view.shape, view.stride(), view.storage_offset()))


def _functionalize_module():
    import sys

    return sys.modules["unrollc.passes.functionalize"]


@pytest.mark.parametrize("model_fn, opt_cls", [
    (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)), torch.optim.SGD),
    (lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), torch.optim.Adam),
])
def test_functionalize_rewrites_common_steps_without_a_re_trace(monkeypatch, model_fn, opt_cls):
    """The optimizer's updates, an in-place activation and BatchNorm's running statistics are rewritten in place
    (step 0, no make_fx re-trace); the trajectory stays eager's, bit for bit."""
    from oracles import eager_trajectory

    module = _functionalize_module()
    taken = []
    original = module._rewrite_in_place
    monkeypatch.setattr(module, "_rewrite_in_place", lambda graph: taken.append(original(graph)) or taken[-1])
    torch.manual_seed(0)
    model = model_fn()
    kwargs = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = opt_cls(model.parameters(), lr=0.1, **kwargs)
    loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    batches = [(torch.randn(6, 4), torch.randn(6, 2)) for _ in range(3)]
    expected = eager_trajectory(model, opt, loss_fn, batches)
    stepper = unrollc.compile(model, opt, loss_fn)
    state = stepper.init()
    for batch, (params, buffers, _) in zip(batches, expected, strict=True):
        state = stepper.step(state, batch)
        for name, p in params.items():
            assert torch.equal(state.params[name], p), name
        for name, b in buffers.items():
            assert torch.equal(state.buffers[name], b), name
    assert taken and all(taken)


class _WideMomentum(HandWritten):
    """SGD-momentum keeping a float64 buffer for float32 weights: ``p.add_(buf)`` computes in float64 and stores
    float32, where the out-of-place ``add`` would give float64."""

    def update(self, p, st, group):
        if "buf" not in st:
            st["buf"] = torch.zeros_like(p, dtype=torch.float64)
        st["buf"].mul_(0.9).add_(p.grad)
        p.add_(st["buf"], alpha=-group["lr"])


def test_functionalize_keeps_an_in_place_ops_dtype():
    from oracles import eager_trajectory

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = _WideMomentum(model.parameters())
    loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    batches = [(torch.randn(6, 4), torch.randn(6, 2)) for _ in range(4)]
    stepper = unrollc.compile(model, opt, loss_fn)
    state = stepper.init()
    for batch, (params, _, opt_state) in zip(batches, eager_trajectory(model, opt, loss_fn, batches), strict=True):
        state = stepper.step(state, batch)
        for name, p in params.items():
            assert state.params[name].dtype == torch.float32
            assert torch.equal(state.params[name], p), name
            assert torch.equal(state.opt_state[name]["buf"], opt_state[name]["buf"]), name


def test_functionalize_re_traces_when_a_view_is_read_across_a_write():
    """``v = w.view(-1)`` read after ``w.add_`` sees the new values: step 0 leaves such graphs to the re-trace."""
    graph = fx.Graph()
    w = graph.placeholder("w")
    v = graph.call_function(torch.ops.aten.view.default, (w, [-1]))
    add = graph.call_function(torch.ops.aten.add_.Tensor, (w, 1.0))
    s = graph.call_function(torch.ops.aten.sum.default, (v,))
    graph.output([add, s])
    w.meta["val"] = torch.zeros(2, 2)
    before = [n.format_node() for n in graph.nodes]
    assert _functionalize_module()._rewrite_in_place(graph) is False
    assert [n.format_node() for n in graph.nodes] == before  # unchanged


class _SetAliasMomentum(HandWritten):
    """``view = empty_like(p).set_(buf)`` shares the buffer's memory: the update written into buf is read through it."""

    def update(self, p, st, group):
        if "m" not in st:
            st["m"] = torch.zeros_like(p)
        view = torch.empty_like(p).set_(st["m"])
        st["m"].mul_(0.9).add_(p.grad)
        p.add_(view, alpha=-group["lr"])


class _ViewOfClone(nn.Module):
    """``h[:, :2].clone()`` is contiguous where its source is not: a view or as_strided of it reads that layout."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = self.l1(x)[:, :2].clone()
        return self.l2(h.reshape(-1)).expand(4, 2) + torch.as_strided(h, (4, 2), (2, 1))


@pytest.mark.parametrize("model_fn, opt_cls", [(lambda: nn.Linear(3, 2), _SetAliasMomentum), (_ViewOfClone, torch.optim.SGD)])
def test_aliasing_the_passes_must_keep(model_fn, opt_cls, float64):
    """Found in review: ``set_`` aliasing was rewritten as a plain write (0.2 off eager, and no derivative for
    aten.set); remove_copies dropped a clone that changes the layout (a view error, or as_strided reading other
    memory, 0.086 off)."""
    from oracles import eager_trajectory

    torch.manual_seed(0)
    model = model_fn()
    opt = opt_cls(model.parameters(), lr=0.1)
    loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]
    expected = eager_trajectory(model, opt, loss_fn, batches)[-1][0]
    stepper = unrollc.compile(model, opt, loss_fn)
    lr = torch.tensor(0.1, requires_grad=True)
    state = stepper.unroll(stepper.init(hyper={"lr": lr}), batches)
    for name, p in expected.items():
        torch.testing.assert_close(state.params[name], p, rtol=0, atol=1e-15)
    torch.autograd.grad(sum(p.sum() for p in state.params.values()), lr)  # differentiable
