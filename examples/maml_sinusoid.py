"""MAML on sinusoid regression, after Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", ICML 2017 (section 5.1).

A task is a sine wave y = A sin(x + phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]. The learner sees
K=10 points of a new task and takes 5 SGD steps (lr 0.01) on them; MAML learns the initial weights so
that these 5 steps fit the whole wave. The meta-gradient flows through the 5 steps (second order): the
inner loop is ``stepper.unroll(stepper.init(), [support] * 5)``, whose time-0 parameters ARE the model's,
so ``query_loss.backward()`` fills ``model.parameters()``' grads for an ordinary outer Adam.

Baseline, equally trained: the same network, the same tasks and the same number of Adam steps, trained
to regress all tasks jointly ("pretrained" in the paper), then fine-tuned at test time exactly as MAML.

    python examples/maml_sinusoid.py            # ~25 s on 2 CPU cores (24 s measured, examples/README.md)
    python examples/maml_sinusoid.py --quick    # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import unrollc


def sample_tasks(n: int, k: int, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """n tasks, each (x_support, y_support, x_query, y_query, amplitude, phase) with k support points."""
    tasks = []
    for _ in range(n):
        amp = 0.1 + 4.9 * torch.rand((), generator=gen)
        phase = math.pi * torch.rand((), generator=gen)
        x = 10 * torch.rand(2 * k, 1, generator=gen) - 5
        y = amp * torch.sin(x + phase)
        tasks.append((x[:k], y[:k], x[k:], y[k:], amp, phase))
    return tasks


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def query_mse_curve(stepper: unrollc.Stepper, tasks, steps: int) -> list[float]:
    """Mean query MSE after 0, 1, ..., steps SGD steps on each task's support set."""
    curve = torch.zeros(steps + 1)
    for xs, ys, xq, yq, _, _ in tasks:
        state = stepper.init()
        for i in range(steps + 1):
            curve[i] += F.mse_loss(stepper.forward(state, xq), yq).item() / len(tasks)
            if i < steps:
                state = stepper.step(state, (xs, ys))
    return curve.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few meta-iterations (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/out/maml_sinusoid.png", help="plot path")
    ap.add_argument("--iters", type=int, default=None, help="meta-iterations (default 1000, --quick 20)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and does not fight other processes
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    iters = args.iters or (20 if args.quick else 1000)
    k, inner_steps, inner_lr, meta_batch = 10, 5, 0.01, 4
    start = time.time()

    maml = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    baseline = copy.deepcopy(maml)  # same initial weights
    stepper = unrollc.compile(maml, torch.optim.SGD(maml.parameters(), lr=inner_lr), mse)
    meta_opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    base_opt = torch.optim.Adam(baseline.parameters(), lr=1e-3)

    for it in range(iters):
        tasks = sample_tasks(meta_batch, k, gen)
        meta_opt.zero_grad()
        meta_loss = 0.0
        for xs, ys, xq, yq, _, _ in tasks:
            adapted = stepper.unroll(stepper.init(), [(xs, ys)] * inner_steps)
            loss = F.mse_loss(stepper.forward(adapted, xq), yq) / meta_batch
            loss.backward()  # through the 5 SGD steps into maml.parameters()
            meta_loss += loss.item()
        meta_opt.step()
        # the baseline sees the same points, as plain regression of all tasks at once
        base_opt.zero_grad()
        x, y = torch.cat([torch.cat(t[0:3:2]) for t in tasks]), torch.cat([torch.cat(t[1:4:2]) for t in tasks])
        F.mse_loss(baseline(x), y).backward()
        base_opt.step()
        if it % 250 == 0:
            print(f"iter {it:5d}  post-adaptation query MSE on this meta-batch {meta_loss:.3f}")

    test_tasks = sample_tasks(20 if args.quick else 300, k, torch.Generator().manual_seed(10_000 + args.seed))
    eval_steps = 10
    maml_curve = query_mse_curve(stepper, test_tasks, eval_steps)
    base_stepper = unrollc.compile(baseline, torch.optim.SGD(baseline.parameters(), lr=inner_lr), mse)
    base_curve = query_mse_curve(base_stepper, test_tasks, eval_steps)
    elapsed = time.time() - start
    print(f"held-out tasks, K={k}, query MSE:   before adaptation   after {inner_steps} steps")
    print(f"  MAML                            {maml_curve[0]:8.3f}           {maml_curve[inner_steps]:8.3f}")
    print(f"  pretrained baseline             {base_curve[0]:8.3f}           {base_curve[inner_steps]:8.3f}")
    plot(args.out, stepper, base_stepper, test_tasks[0], maml_curve, base_curve, inner_steps)
    print(
        f"RESULT maml_sinusoid: post-adaptation MSE {maml_curve[inner_steps]:.3f} (pre-adaptation "
        f"{maml_curve[0]:.3f}; pretrained baseline after adaptation {base_curve[inner_steps]:.3f}) "
        f"iters={iters} time={elapsed:.0f}s plot={args.out}"
    )


def plot(path, stepper, base_stepper, task, maml_curve, base_curve, inner_steps) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, _, _, amp, phase = task
    grid = torch.linspace(-5, 5, 200).unsqueeze(1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(grid, amp * torch.sin(grid + phase), "k", label="true task")
    a.plot(xs, ys, "k^", label=f"K={len(xs)} support points")
    with torch.no_grad():
        a.plot(grid, stepper.forward(stepper.init(), grid), "C0:", label="MAML, before adaptation")
    for st, name, color in ((stepper, "MAML", "C0"), (base_stepper, "pretrained", "C1")):
        adapted = st.unroll(st.init(), [(xs, ys)] * inner_steps)
        a.plot(grid, st.forward(adapted, grid).detach(), color, label=f"{name}, after {inner_steps} steps")
    a.set_title("one held-out task")
    a.legend(fontsize=8)
    b.plot(maml_curve, "C0o-", label="MAML")
    b.plot(base_curve, "C1o-", label="pretrained baseline")
    b.axvline(inner_steps, color="gray", ls=":")
    b.set(xlabel="SGD steps on the K support points", ylabel="query MSE (held-out tasks)", title="adaptation")
    b.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
