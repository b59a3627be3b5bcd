"""``python -m unrollc``: a short demo, and ``explain`` for a user's script.

Usage::

    python -m unrollc                                   # demo: MLP + Adam, 20 steps, checkpoint="sqrt"
    python -m unrollc explain path/to/script.py:make    # explain the stepper that make() returns
    python -m unrollc explain script.py:make --graph "after functionalize"   # + that graph, with source lines
    python -m unrollc explain script.py:make --draw step.svg [--collapse]    # + a drawing (needs unrollc[draw])

``make`` takes no arguments and returns either a :class:`unrollc.Stepper` that has run a step, or a tuple
``(stepper, state, batch, *meta)``: then the step graph is traced for them (``Stepper.trace``; no step is run).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
from typing import Any

import torch
from torch import nn

import unrollc

from .errors import CaptureError
from .inspect import annotated_code, draw, explain


def demo() -> int:
    """Compile an MLP + Adam, unroll 20 steps with checkpoint="sqrt", print the meta-gradient and explain."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((m(x) - y) ** 2).mean()

    stepper = unrollc.compile(model, opt, loss_fn)
    lr = torch.tensor(1e-2, dtype=torch.float64, requires_grad=True)
    state = stepper.init(hyper={"lr": lr})
    w = torch.randn(8, 1)
    batches = [(x, x @ w) for x in torch.randn(20, 16, 8)]
    state = stepper.unroll(state, batches, checkpoint="sqrt")
    x_val = torch.randn(64, 8)
    meta_loss = ((stepper.forward(state, x_val) - x_val @ w) ** 2).mean()
    meta_loss.backward()
    weight_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    print("unrollc demo: MLP 8-32-1 + Adam, 20 unrolled steps, checkpoint='sqrt'")
    print(f"  validation loss after 20 steps      {meta_loss.item():.4f}")
    print(f"  d loss / d lr                       {lr.grad.item():+.4f}")
    print(f"  |d loss / d initial weights|        {weight_grad.norm().item():.4f}")
    print()
    print(explain(stepper))
    return 0


def load(target: str) -> Any:
    """Call ``function`` of ``path/to/script.py:function`` (the script is run as a module, not as __main__)."""
    path, sep, func = target.rpartition(":")
    if not sep or not path or not func:
        raise SystemExit(f"python -m unrollc explain: expected path/to/script.py:function, got {target!r}.")
    if not os.path.exists(path):
        raise SystemExit(f"python -m unrollc explain: no such file {path!r}.")
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise SystemExit(f"python -m unrollc explain: {path!r} is not a Python file; expected path/to/script.py:function.")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"python -m unrollc explain: cannot load {path!r} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    if not callable(getattr(module, func, None)):
        raise SystemExit(f"python -m unrollc explain: {path} defines no function {func!r}.")
    fn = getattr(module, func)
    try:
        inspect.signature(fn).bind()
    except TypeError:
        raise SystemExit(
            f"python -m unrollc explain: {func}{inspect.signature(fn)} takes arguments; the command line calls it "
            f"with none. Give its parameters defaults, or write a function without parameters that calls it."
        ) from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
    return fn()


def run_explain(args: argparse.Namespace) -> int:
    result = load(args.target)
    stepper, rest = (result[0], tuple(result[1:])) if isinstance(result, tuple) else (result, ())
    if not isinstance(stepper, unrollc.Stepper):
        raise SystemExit(
            "python -m unrollc explain: the function must return a Stepper or (stepper, state, batch, *meta), "
            f"got {type(stepper).__name__}."
        )
    if rest and len(rest) < 2:
        raise SystemExit(
            "python -m unrollc explain: a returned tuple must be (stepper, state, batch, *meta), got a tuple of "
            f"{len(rest) + 1}."
        )
    if not rest and stepper._last is None:  # noqa: SLF001 - a bare stepper: nothing traced yet
        raise SystemExit(
            "python -m unrollc explain: the stepper has not traced a step yet (the graph depends on the batch's "
            f"shapes); return (stepper, state, batch, *meta) from {args.target.rsplit(':', 1)[-1]}(), or run one "
            "step before returning the stepper."
        )
    try:
        report = explain(stepper, *rest)
    except CaptureError as exc:  # it names the user's line; other errors keep their traceback
        raise SystemExit(f"python -m unrollc explain: {exc}") from None
    print(report)
    if args.graph:
        if args.graph not in stepper.graphs:
            raise SystemExit(f"python -m unrollc explain: no graph {args.graph!r}; the stepper keeps {list(stepper.graphs)}.")
        print(annotated_code(stepper.graphs[args.graph]))
    if args.draw:
        try:
            print(f"wrote {draw(stepper, args.draw, collapse=args.collapse)}")
        except (ImportError, OSError, RuntimeError, ValueError) as exc:  # no pydot / Graphviz / folder; a bad suffix
            print(exc, file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unrollc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    ex = commands.add_parser("explain", help="explain the stepper a script's function returns")
    ex.add_argument("target", help="path/to/script.py:function (returns a Stepper or (stepper, state, batch, *meta))")
    ex.add_argument("--graph", help='also print this graph with source lines, e.g. "after functionalize"')
    ex.add_argument("--draw", metavar="FILE", help="also draw the step graph (.dot, .svg, .png, .pdf)")
    ex.add_argument("--collapse", action="store_true", help="draw one node per module / backward / optimizer")
    args = parser.parse_args(argv)
    if args.command == "explain":
        return run_explain(args)
    return demo()


if __name__ == "__main__":
    sys.exit(main())
