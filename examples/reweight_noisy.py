"""Learning to reweight training examples under label noise, after Ren, Zeng, Yang & Urtasun, "Learning
to Reweight Examples for Robust Deep Learning", ICML 2018 (Algorithm 1).

The training set (scikit-learn's ``load_digits``, real 8x8 handwritten digits) has 40% of its labels
flipped to another class at random; 100 examples (10 per class) with clean labels form a small meta set.
At every training step, for a mini-batch:

1. take one *virtual* SGD step on the loss weighted by per-example weights eps = 0 (a ``*meta`` input of
   ``loss_fn``): ``virtual = stepper.step(stepper.init(), batch, eps)``;
2. the gradient of the clean meta-set loss at the virtual weights w.r.t. eps says which examples help:
   w = max(-grad, 0), normalised to sum to 1;
3. take the real optimizer step on the loss weighted by w.

The learning rate drops tenfold after 2/3 of training (as in the paper); the virtual step uses the current lr.

Baseline: the same network, initialisation, optimizer and batches, trained on the plain mean loss.

    pip install scikit-learn
    python examples/reweight_noisy.py            # ~10 s on 2 CPU cores (8 s measured, examples/README.md)
    python examples/reweight_noisy.py --quick
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import unrollc

NOISE, LR, BATCH = 0.4, 0.1, 100


def load_data(seed: int):
    """(train x, noisy y, flipped mask), clean meta set, clean test set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    x, y = x[perm], y[perm]
    meta = torch.cat([torch.nonzero(y == c)[:10, 0] for c in range(10)])  # 10 clean examples per class
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[meta] = False
    xr, yr = x[rest], y[rest]
    train_x, train_y, test = xr[:1200], yr[:1200].clone(), (xr[1200:], yr[1200:])
    flipped = torch.rand(len(train_y), generator=gen) < NOISE
    shift = torch.randint(1, 10, (len(train_y),), generator=gen)  # another class, uniformly
    train_y[flipped] = (train_y[flipped] + shift[flipped]) % 10
    return (train_x, train_y, flipped), (x[meta], y[meta]), test


def weighted_ce(model: nn.Module, batch, weights: torch.Tensor) -> torch.Tensor:
    x, y = batch
    return (weights * F.cross_entropy(model(x), y, reduction="none")).sum()


def example_weights(stepper, batch, meta_set, lr: float) -> torch.Tensor:
    """Steps 1-2: the per-example weights from one virtual step (Ren et al., Algorithm 1, lines 4-11)."""
    eps = torch.zeros(len(batch[1]), requires_grad=True)
    virtual = stepper.step(stepper.init(hyper={"lr": lr}), batch, eps)  # time 0 = the model's current weights
    meta_loss = F.cross_entropy(stepper.forward(virtual, meta_set[0]), meta_set[1])
    (grad,) = torch.autograd.grad(meta_loss, eps)
    w = (-grad).clamp(min=0)
    return w / w.sum() if w.sum() > 0 else w


def accuracy(model, data) -> float:
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few training steps (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/out/reweight_noisy.png", help="plot path")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 1000, --quick 30)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and does not fight other processes
    torch.manual_seed(args.seed)
    steps = args.steps or (30 if args.quick else 1000)
    start = time.time()
    (x, y, flipped), meta_set, test = load_data(args.seed)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9)
    # the virtual step of step 1 is a plain SGD step with the same learning rate
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=LR), weighted_ce)

    gen = torch.Generator().manual_seed(args.seed)
    history = []  # (step, mean weight of clean examples, of flipped examples, test acc, plain test acc)
    for step in range(steps):
        idx = torch.randint(len(y), (BATCH,), generator=gen)
        batch = (x[idx], y[idx])
        if step == 2 * steps // 3:
            for g in opt.param_groups + plain_opt.param_groups:
                g["lr"] = LR / 10
        w = example_weights(stepper, batch, meta_set, opt.param_groups[0]["lr"])
        opt.zero_grad()
        weighted_ce(model, batch, w).backward()
        opt.step()
        plain_opt.zero_grad()
        F.cross_entropy(plain(batch[0]), batch[1]).backward()
        plain_opt.step()
        f = flipped[idx]
        history.append((step, w[~f].mean().item() * BATCH, w[f].mean().item() * BATCH if f.any() else float("nan")))
        if step % 100 == 0 or step == steps - 1:
            history[-1] += (accuracy(model, test), accuracy(plain, test))
            print(f"step {step:5d}  test acc: reweighted {100 * history[-1][3]:.1f}%  plain {100 * history[-1][4]:.1f}%")

    # the weights the last model gives to every training example, in batches as in training
    final_w = torch.cat([example_weights(stepper, (x[i : i + BATCH], y[i : i + BATCH]), meta_set, LR) for i in range(0, len(y), BATCH)])
    acc, plain_acc = accuracy(model, test), accuracy(plain, test)
    clean_w, flipped_w = final_w[~flipped].mean().item() * BATCH, final_w[flipped].mean().item() * BATCH
    zero_flipped = (final_w[flipped] == 0).float().mean().item()
    elapsed = time.time() - start
    print(f"clean test accuracy: reweighted {100 * acc:.1f}%, plain training {100 * plain_acc:.1f}% ({NOISE:.0%} flipped labels)")
    print(f"mean weight (x batch size): clean examples {clean_w:.2f}, flipped {flipped_w:.2f}; "
          f"{100 * zero_flipped:.0f}% of flipped examples get weight 0")
    plot(args.out, history, final_w, flipped)
    print(
        f"RESULT reweight_noisy: test acc {100 * acc:.1f}% reweighted vs {100 * plain_acc:.1f}% plain; mean weight "
        f"clean {clean_w:.2f} vs flipped {flipped_w:.2f} steps={steps} time={elapsed:.0f}s plot={args.out}"
    )


def plot(path, history, final_w, flipped) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    h = torch.tensor([r[:3] for r in history]).nan_to_num(0.0)
    k = max(1, len(h) // 30)  # moving average over k steps
    smooth = lambda v: torch.nn.functional.avg_pool1d(v[None, None], k, k)[0, 0]  # noqa: E731
    a.plot(smooth(h[:, 0]), smooth(h[:, 1]), label="clean labels")
    a.plot(smooth(h[:, 0]), smooth(h[:, 2]), label="flipped labels")
    a.set(xlabel="training step", ylabel="mean weight x batch size", title="learned example weights")
    a.legend()
    evals = [r for r in history if len(r) == 5]
    b.plot([r[0] for r in evals], [100 * r[3] for r in evals], "o-", label="reweighted (Ren et al.)")
    b.plot([r[0] for r in evals], [100 * r[4] for r in evals], "o-", label="plain training")
    b.set(xlabel="training step", ylabel="clean test accuracy (%)", title="40% flipped labels")
    b.legend()
    bins = torch.linspace(0, final_w.max().item() * 1.01 + 1e-9, 30)
    c.hist([final_w[~flipped].numpy(), final_w[flipped].numpy()], bins=bins.numpy(), label=["clean", "flipped"])
    c.set(xlabel="weight after training", ylabel="training examples", yscale="log", title="final weights")
    c.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
