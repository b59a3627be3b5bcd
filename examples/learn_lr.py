"""Learning per-layer learning-rate and momentum schedules by hypergradient descent through a long,
checkpointed unroll, after Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning", ICML 2015 (learned per-layer schedules), and Baydin et al., "Online
Learning Rate Adaptation with Hypergradient Descent", ICLR 2018.

An MLP classifies scikit-learn's ``load_digits`` (real 8x8 handwritten digits) with ``torch.optim.SGD``
(momentum), one parameter group per layer, for T=120 steps. The schedule is piecewise constant: 4
segments of 30 steps, each with its own lr and momentum per layer (``state.hyper["0.lr"]``, ...). The
meta-objective is the validation loss after the T steps; its gradient w.r.t. all 24 hyperparameters
flows back through the whole unroll, which ``checkpoint="sqrt"`` keeps at about sqrt(T) stored states.

Baseline: a grid of fixed learning rates (momentum 0.9, constant); the best by validation loss.
Both are scored on 3 fresh initialisations and batch orders, not the ones used for meta-training.

    pip install scikit-learn
    python examples/learn_lr.py            # ~15 s on 2 CPU cores (measured, examples/README.md)
    python examples/learn_lr.py --quick
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import unrollc

LAYERS, SEGMENTS, BATCH = 3, 4, 64
GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def load_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:])  # train, val, test


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def fresh_params(seed: int) -> dict[str, torch.Tensor]:
    """A new random initialisation, as a parameter dict for ``stepper.init(params=...)``."""
    return {n: p.detach() for n, p in make_model(seed).named_parameters()}


def batches(train, steps: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    idx = [torch.randint(len(train[1]), (BATCH,), generator=gen) for _ in range(steps)]
    return [(train[0][i], train[1][i]) for i in idx]


def train_run(stepper, params, lrs, moms, data, checkpoint=None):
    """T steps from ``params`` with the schedule lrs/moms [SEGMENTS, LAYERS]; returns the final state."""
    seg = len(data) // SEGMENTS
    per_segment = [{f"{i}.lr": lrs[s, i] for i in range(LAYERS)} | {f"{i}.momentum": moms[s, i] for i in range(LAYERS)}
                   for s in range(SEGMENTS)]
    # one unroll over all T steps, each with its segment's hyperparameters (one checkpoint schedule for the whole run)
    return stepper.unroll(stepper.init(params=params), data, hyper=[per_segment[t // seg] for t in range(len(data))],
                          checkpoint=checkpoint)


def score(stepper, lrs, moms, train, val, test, steps, seeds) -> tuple[float, float, float]:
    """Validation loss, validation accuracy and test accuracy after training fresh initialisations with
    the schedule (mean over seeds)."""
    loss = acc = test_acc = 0.0
    for seed in seeds:
        with torch.no_grad():
            state = train_run(stepper, fresh_params(seed), lrs, moms, batches(train, steps, seed))
            out, out_test = stepper.forward(state, val[0]), stepper.forward(state, test[0])
        loss += F.cross_entropy(out, val[1]).item() / len(seeds)
        acc += (out.argmax(1) == val[1]).float().mean().item() / len(seeds)
        test_acc += (out_test.argmax(1) == test[1]).float().mean().item() / len(seeds)
    return loss, acc, test_acc


def sgd_per_layer(model: nn.Sequential) -> torch.optim.SGD:
    layers = [m for m in model if isinstance(m, nn.Linear)]
    return torch.optim.SGD([{"params": m.parameters()} for m in layers], lr=0.01, momentum=0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short unroll, few meta-iterations (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/out/learn_lr.png", help="plot path")
    ap.add_argument("--iters", type=int, default=None, help="meta-iterations (default 50, --quick 2)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and does not fight other processes
    start = time.time()
    iters, steps = (args.iters or 2, 20) if args.quick else (args.iters or 50, 120)
    train, val, test = load_data()
    eval_seeds = [1000 + args.seed + i for i in range(1 if args.quick else 3)]

    # hyperparameters live in an unconstrained space: lr = exp(log_lr), momentum = sigmoid(logit)
    log_lr = torch.full((SEGMENTS, LAYERS), torch.tensor(0.03).log().item(), requires_grad=True)
    logit_mom = torch.full((SEGMENTS, LAYERS), torch.tensor(0.9).logit().item(), requires_grad=True)
    hyper_opt = torch.optim.Adam([log_lr, logit_mom], lr=0.1)
    model = make_model(args.seed)
    stepper = unrollc.compile(model, sgd_per_layer(model), cross_entropy)
    for it in range(iters):
        seed = args.seed * 1000 + it  # a fresh initialisation and batch order every meta-iteration
        hyper = log_lr.exp(), logit_mom.sigmoid()
        state = train_run(stepper, fresh_params(seed), *hyper, batches(train, steps, seed), checkpoint="sqrt")
        val_loss = F.cross_entropy(stepper.forward(state, val[0]), val[1])
        hyper_opt.zero_grad()
        val_loss.backward()  # hypergradient through all T steps
        hyper_opt.step()
        if it % 5 == 0 or it == iters - 1:
            print(f"meta-iter {it:3d}  val loss {val_loss.item():.3f}  lr (last segment) {log_lr[-1].exp().tolist()}")

    lrs, moms = log_lr.detach().exp(), logit_mom.detach().sigmoid()
    learned = score(stepper, lrs, moms, train, val, test, steps, eval_seeds)
    grid = {}
    for lr in GRID:
        const = torch.full((SEGMENTS, LAYERS), lr), torch.full((SEGMENTS, LAYERS), 0.9)
        grid[lr] = score(stepper, *const, train, val, test, steps, eval_seeds)
        print(f"fixed lr {lr:5.2f}, momentum 0.9: val loss {grid[lr][0]:.3f}  val acc {100 * grid[lr][1]:.1f}%")
    best = min(grid, key=lambda lr: grid[lr][0])
    elapsed = time.time() - start
    for name, (loss, acc, test_acc) in (("learned schedule", learned), (f"best fixed lr {best}", grid[best])):
        print(f"{name:20s} val loss {loss:.3f}  val acc {100 * acc:.1f}%  test acc {100 * test_acc:.1f}%")
    plot(args.out, lrs, moms, grid, learned, steps)
    print(
        f"RESULT learn_lr: val loss {learned[0]:.3f} learned vs {grid[best][0]:.3f} best fixed lr {best} "
        f"(test acc {100 * learned[2]:.1f}% vs {100 * grid[best][2]:.1f}%) T={steps} iters={iters} "
        f"time={elapsed:.0f}s plot={args.out}"
    )


def plot(path, lrs, moms, grid, learned, steps) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    t = torch.arange(steps)
    seg = t * SEGMENTS // steps
    for i in range(LAYERS):
        a.plot(t, lrs[seg, i], label=f"layer {i}")
        b.plot(t, moms[seg, i], label=f"layer {i}")
    a.set(xlabel="training step", ylabel="learning rate", yscale="log", title="learned lr schedule")
    b.set(xlabel="training step", ylabel="momentum", title="learned momentum schedule")
    a.legend(), b.legend()
    c.plot(list(grid), [v[0] for v in grid.values()], "C7o-", label="fixed lr (momentum 0.9)")
    c.axhline(learned[0], color="C0", label="learned schedule")
    c.set(xlabel="lr", xscale="log", ylabel=f"validation loss after {steps} steps", title="against a grid")
    c.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
