"""strip_detach: remove the ``detach`` nodes that cut second-order paths, keep the user's own.

Invariant established: every remaining ``aten.detach`` node was written by the user (its innermost
stack frame is in the user's code).

Autograd's traced backward and ``torch.optim`` insert detaches that the eager, differentiable unroll
does not have, e.g. SGD's first momentum buffer ``torch.clone(grad).detach()``::

    clone = aten.clone(grad);  detach = aten.detach(clone);  ...  return [..., detach]

Meta-gradients must flow through them, so each such node is replaced by its input::

    clone = aten.clone(grad);  ...  return [..., clone]

A ``.detach()`` in the user's ``forward``, ``loss_fn`` or ``grad_callback`` is a deliberate stop-gradient and
stays (first-order MAML detaches in the callback), and so do the detaches capture adds after the ops of a
``torch.no_grad()`` block in them (``capture.NoGradRegions``)."""

from __future__ import annotations

import traceback

from torch import fx

from ..capture import DETACH_OPS, in_optimizer_step, stops_gradient
from ..errors import user_frame

__all__ = ["strip_detach", "strippable", "written_by_user"]


def written_by_user(node: fx.Node) -> bool:
    """Whether the innermost frame of the node's stack trace is in the user's code."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return False
    frames = _parse(trace)
    return bool(frames) and user_frame(frames[-1:]) is not None


def _parse(trace: str) -> list[traceback.FrameSummary]:
    frames = []
    for line in trace.splitlines():
        line = line.strip()
        if line.startswith('File "'):
            filename, _, rest = line[len('File "') :].partition('"')
            lineno = rest.split("line ")[-1].split(",")[0].strip()
            frames.append(traceback.FrameSummary(filename, int(lineno) if lineno.isdigit() else 0, "", line=""))
    return frames


def strippable(node: fx.Node) -> bool:
    """A ``detach``/``alias`` that autograd or the optimizer inserted: any in the optimizer's ``step()`` (even one
    the user wrote there: ``p.data``), else one that is not the user's, not the end of a no_grad block, not in the
    grad_callback."""
    if node.op != "call_function" or node.target not in DETACH_OPS:
        return False
    return in_optimizer_step(node) or (not written_by_user(node) and not stops_gradient(node))


def strip_detach(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace autograd- and optimizer-inserted ``detach``/``alias`` nodes by their input."""
    for node in list(gm.graph.nodes):
        if strippable(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
