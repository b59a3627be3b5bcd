r"""A drop-in replacement for ``higher`` 0.2.1: ``import unrollc.higher as higher``.

Same modules (``higher.patch``, ``higher.optim``, ``higher.utils``), names, signatures and documented
semantics, built on unrollc's core: the functional module runs the user's module with explicit weights
(``torch.nn.utils.stateless``; no monkey-patched classes), and the differentiable optimizers run the real
``torch.optim`` update, captured and functionalized by unrollc (:mod:`unrollc.update`), so every
``torch.optim`` optimizer the core supports works and matches ``torch.optim`` exactly.

Where it differs from ``higher`` (all deliberate, all tested in ``tests/higher/``):

* Adam and every other optimizer are exactly ``torch.optim``'s (``higher``'s Adam puts ``eps`` elsewhere,
  ignores ``maximize``, and has no AdamW, NAdam or RAdam).
* ``track_higher_grads=False``: ``parameters(time=0)`` returns the initial weights (``higher`` returns the
  latest), and first-order gradients reach the initial weights — ``model.parameters()`` with
  ``copy_initial_weights=False`` (first-order MAML; ``higher`` silently gives None).
* Leaving ``innerloop_ctx`` releases the intermediate fast weights (times 1 .. n-1) and the graph of the
  optimizer state; the latest weights keep their graph, so a meta-loss computed after the block still
  back-propagates.
* ``fmodel.write_back()`` and ``diffopt.write_back()`` copy the adapted weights, buffers and optimizer state
  into the original module and optimizer.
* ``type(fmodel)`` is :class:`~unrollc.higher.patch.FunctionalModule`, though ``isinstance(fmodel, MyNet)``
  holds as in ``higher``; submodules (``fmodel.encoder(x)``, ``fmodel[0](x)``) and methods of the user's class run with the fast weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import optim, patch, utils
from .optim import create_diff_optim, get_diff_optim, register_optim
from .patch import monkeypatch

__all__ = ["innerloop_ctx", "monkeypatch", "get_diff_optim", "create_diff_optim", "register_optim", "optim", "patch", "utils"]


@contextlib.contextmanager
def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | None = None,
    copy_initial_weights: bool = True,
    override: optim._OverrideType | None = None,
    track_higher_grads: bool = True,
) -> Iterator[tuple[patch.FunctionalModule, optim.DifferentiableOptimizer]]:
    r"""A context manager for writing differentiable inner loops, as in ``higher``.

    Args:
        model: a ``torch.nn.Module``; never modified inside the context (see ``fmodel.write_back``).
        opt: a ``torch.optim`` optimizer over (some of) ``model``'s parameters; its options and state are the
            starting point; never modified (see ``diffopt.write_back``).
        device (optional): a device to cast the fast weights, buffers and optimizer state to.
        copy_initial_weights: True: the initial fast weights are detached copies — meta-gradients stop there
            and are read with ``fmodel.parameters(time=0)``, NOT ``model.parameters()``. False: they are
            ``clone()`` s of ``model``'s parameters, so ``meta_loss.backward()`` fills ``model.parameters()``'s
            ``.grad`` (MAML, with ``track_higher_grads=False`` too: first-order MAML).
        override (optional): ``{option: [value]}`` (one value, or one per parameter group); tensors that
            require grad (e.g. a learned ``lr``) receive gradients.
        track_higher_grads: False for first-order or test mode: no graph through the updates.

    Yields:
        ``(fmodel, diffopt)``: the functional module and the differentiable optimizer.
        ``diffopt.step(loss)`` replaces ``opt.zero_grad(); loss.backward(); opt.step()``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unrollc.higher.innerloop_ctx: expected a torch.nn.Module as `model`, got {type(model).__name__}.")
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"unrollc.higher.innerloop_ctx: expected a torch.optim.Optimizer over the model's parameters as `opt`, "
            f"got {type(opt).__name__}."
        )
    fmodel = monkeypatch(model, device, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads)
    diffopt = optim.get_diff_optim(
        opt, model.parameters(), fmodel=fmodel, device=device, override=override, track_higher_grads=track_higher_grads
    )
    try:
        yield fmodel, diffopt
    finally:
        fmodel._release()
        diffopt._release()
