"""Inspecting the compiled step: :func:`explain`, source-annotated code, drawings and the ``check=True`` lint.

* :func:`explain` — what each pass did, op histogram, inputs/outputs, bytes and FLOPs of a step;
* :func:`annotated_code` — a graph of ``stepper.graphs`` as readable code, with the user's source lines;
* :func:`to_dot` / :func:`draw` — a drawing of the step graph (needs ``pip install unrollc[draw]``);
* :mod:`unrollc.inspect.lint` — the guarantees checked after each pass by ``unrollc.compile(..., check=True)``.
"""

from .draw import draw, to_dot
from .explain import Report, explain
from .source import annotated_code, source_of

__all__ = ["explain", "Report", "annotated_code", "source_of", "to_dot", "draw"]
