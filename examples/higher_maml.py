"""MAML on sine-wave regression, after Finn, Abbeel & Levine 2017, written for ``higher`` 0.2.1.

It runs unchanged on unrollc: the only difference is the import line. Run it with
``python examples/higher_maml.py`` (unrollc) or ``python examples/higher_maml.py --higher``;
``--quick`` is a smoke test, ``--seed N`` and ``--out path.png`` as in the other examples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

if "--higher" in sys.argv:
    import higher
else:
    import unrollc.higher as higher  # the one line that changes when migrating from higher


def sample_tasks(n_tasks: int, k: int, generator: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Per task: a sine with random amplitude and phase; K support and K query points."""
    tasks = []
    for _ in range(n_tasks):
        amp = 0.1 + 4.9 * torch.rand((), generator=generator)
        phase = 3.1416 * torch.rand((), generator=generator)
        xs = 10 * torch.rand(2 * k, 1, generator=generator) - 5
        ys = amp * torch.sin(xs + phase)
        tasks.append((xs[:k], ys[:k], xs[k:], ys[k:]))
    return tasks


def meta_loss(model: nn.Module, inner_opt: torch.optim.Optimizer, tasks, inner_steps: int, train: bool) -> float:
    total = 0.0
    for x_spt, y_spt, x_qry, y_qry in tasks:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=train) as (fnet, diffopt):
            for _ in range(inner_steps):
                diffopt.step(F.mse_loss(fnet(x_spt), y_spt))
            qry_loss = F.mse_loss(fnet(x_qry), y_qry)
            if train:
                (qry_loss / len(tasks)).backward()
        total += qry_loss.item() / len(tasks)
    return total


def main(meta_steps: int = 300, seed: int = 0, verbose: bool = True, meta_lr: float = 1e-3,
         eval_tasks: int = 25) -> tuple[float, float, list[float]]:
    """Meta-train; return the post-adaptation query loss on held-out tasks before and after, and the curve."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    meta_opt = torch.optim.Adam(model.parameters(), lr=meta_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    held_out = sample_tasks(eval_tasks, 10, torch.Generator().manual_seed(seed + 1))
    before = meta_loss(model, inner_opt, held_out, inner_steps=5, train=False)
    curve = []
    for step in range(meta_steps):
        meta_opt.zero_grad()
        curve.append(meta_loss(model, inner_opt, sample_tasks(4, 10, gen), inner_steps=1, train=True))
        meta_opt.step()
        if verbose and step % 100 == 0:
            print(f"meta-step {step:4d}  query loss {curve[-1]:.3f}")
    after = meta_loss(model, inner_opt, held_out, inner_steps=5, train=False)
    if verbose:
        print(f"held-out query loss after 5 adaptation steps: {before:.3f} before meta-training, {after:.3f} after")
    return before, after, curve


def save_plot(curve: list[float], before: float, after: float, path: str) -> None:
    """The meta-training query loss, smoothed, with the held-out losses before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(curve) // 20)
    smooth = [sum(curve[max(0, i - window + 1): i + 1]) / len(curve[max(0, i - window + 1): i + 1]) for i in range(len(curve))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(smooth, label="meta-training query loss (1 inner step)")
    ax.axhline(before, color="grey", ls="--", label=f"held-out, 5 steps, before: {before:.2f}")
    ax.axhline(after, color="green", ls="--", label=f"held-out, 5 steps, after: {after:.2f}")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("MSE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--higher", action="store_true", help="use higher 0.2.1 instead of unrollc.higher")
    parser.add_argument("--steps", type=int, default=300, help="meta-training steps (default 300)")
    parser.add_argument("--quick", action="store_true", help="a few meta-steps (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "higher_maml.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and steady on a shared machine
    start = time.perf_counter()
    before, after, curve = main(20 if args.quick else args.steps, args.seed, eval_tasks=5 if args.quick else 25)
    save_plot(curve, before, after, args.out)
    print(f"RESULT higher_maml: held-out query MSE after 5 steps {after:.3f} (before meta-training {before:.3f}) "
          f"with {higher.__name__} steps={len(curve)} time={time.perf_counter() - start:.0f}s plot={args.out}")
