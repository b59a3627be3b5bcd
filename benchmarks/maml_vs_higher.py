"""MAML written against higher's API: ``unrollc.higher`` vs ``higher`` 0.2.1, each library in fresh processes.

One meta-iteration is ``--tasks`` inner loops of ``--steps`` ``diffopt.step`` calls each (``innerloop_ctx`` with
``copy_initial_weights=False``, second order), a query loss and ``backward()`` per task, then the outer Adam step:
the sinusoid-regression MAML (MLP 1-w-w-1, 10 points per task) or the Omniglot-style one (4 conv blocks of width w
with BatchNorm and max-pooling on 5 images of 28x28). Each library runs in its own process, ``--rounds`` times,
alternating (a shared machine's slow phases then hit both); each process reports the median of ``--iters`` timed
meta-iterations after a warm-up, and the table gives the median over rounds. On small models the time is mostly
Python per op and per call, which is what this measures; the same code with a bigger width becomes FLOP-bound.

    python benchmarks/maml_vs_higher.py [--model mlp|conv] [--width 40] [--optimizer sgd|adam] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _model(kind: str, width: int):  # noqa: ANN202
    from torch import nn

    if kind == "mlp":
        return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, width), *block(width, width), *block(width, width), *block(width, width),
                         nn.Flatten(), nn.Linear(width, 5))


def worker(args: argparse.Namespace) -> None:
    """Time ``args.iters`` meta-iterations with one library and print ``{"ms": median}`` as JSON."""
    import torch

    torch.set_num_threads(1)
    if args.worker == "higher":
        import higher as lib
    else:
        import unrollc.higher as lib
    torch.manual_seed(0)
    model = _model(args.model, args.width)
    x, y = (torch.randn(10, 1), None) if args.model == "mlp" else (torch.randn(5, 1, 28, 28), torch.randn(5, 5))
    y = torch.sin(x) if y is None else y
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner = {"sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.01),
             "adam": lambda: torch.optim.Adam(model.parameters(), lr=0.01)}[args.optimizer]

    def meta_iteration() -> None:
        opt = inner()
        meta_opt.zero_grad()
        for _ in range(args.tasks):
            with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(args.steps):
                    diffopt.step(((fmodel(x) - y) ** 2).mean())
                ((fmodel(x) - y) ** 2).mean().backward()
        meta_opt.step()

    for _ in range(3):
        meta_iteration()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        meta_iteration()
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms": statistics.median(times) * 1e3}))


def main() -> None:
    """Run both libraries in alternating fresh processes and print their medians and the ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", choices=("mlp", "conv"))
    p.add_argument("--width", type=int, default=40)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--iters", type=int, default=None, help="timed meta-iterations per process (default: 40 mlp, 10 conv)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", choices=("higher", "unrollc"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.iters = args.iters or (40 if args.model == "mlp" else 10)
    if args.worker:
        worker(args)
        return
    options = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "rounds") and v is not None]
    medians: dict[str, list[float]] = {"higher": [], "unrollc": []}
    for r in range(args.rounds):
        for lib in medians:
            out = subprocess.run([sys.executable, __file__, *options, f"--worker={lib}"], capture_output=True, text=True,
                                 env=os.environ, check=False)
            if out.returncode:
                sys.exit(f"{lib} failed:\n{out.stderr}")
            medians[lib].append(json.loads(out.stdout.splitlines()[-1])["ms"])
            print(f"round {r + 1}/{args.rounds} {lib}: {medians[lib][-1]:.2f} ms", file=sys.stderr)
    h, u = statistics.median(medians["higher"]), statistics.median(medians["unrollc"])
    print(f"{args.model} width {args.width}, {args.optimizer}, {args.tasks} tasks x {args.steps} steps: "
          f"higher {h:.2f} ms, unrollc.higher {u:.2f} ms per meta-iteration, ratio {u / h:.2f}")


if __name__ == "__main__":
    main()
