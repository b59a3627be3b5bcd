"""Source mapping: which line of the user's code (or of the optimizer's ``step``) each graph node came from.

Recording (during capture, see :func:`recording_sources`):

1. ``make_fx(record_stack_traces=True)`` keeps only frames of functions named ``forward``; the user's
   ``loss_fn`` and the optimizer's update functions are registered as extra *anchors* for the duration of
   the trace, so their lines are kept too;
2. global module hooks keep ``node.meta["nn_module_stack"]`` — ``{path: (path, class)}`` of the modules being
   run, outermost first — so a node knows its module path (``"encoder.0"``) as in ``torch.export``;
3. ``functionalize`` re-traces under ``preserve_node_meta``, so both survive every pass.

Reading (:func:`source_of`, :func:`annotated_code`): the innermost frame in the user's own files wins; else
the innermost frame of ``torch.optim`` (the optimizer's step); else the innermost ``forward`` (a torch
module such as ``nn.Linear``). Nodes of the traced backward have no Python frame: they are shown as
``autograd``; an op inside a module's forward without a frame (code run by ``exec``) is a ``module`` node whose
line is unknown.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn

from ..errors import user_frame

__all__ = ["SourceLine", "recording_sources", "source_of", "module_path", "annotated_code", "describe_input"]

_OPTIM_DIR = os.path.join(os.path.dirname(torch.__file__), "optim")


@dataclass(frozen=True)
class SourceLine:
    """Where a node came from: ``kind`` is ``"user"``, ``"optimizer"``, ``"module"`` (a torch module's
    forward) or ``"autograd"`` (the traced backward, no Python line)."""

    kind: str
    filename: str = ""
    lineno: int = 0
    function: str = ""
    code: str = ""
    module: str | None = None  # module path, "" for the root module, None when not inside a module

    def short(self) -> str:
        """``file.py:12 in fn: code`` with the file relative to torch or to the working directory."""
        if self.kind == "autograd":
            return "autograd: gradient of the loss (traced backward)"
        if not self.filename:
            return "source not recorded (code without a file, e.g. run by exec)"
        where = f"{_shorten(self.filename)}:{self.lineno} in {self.function}"
        return f"{where}: {self.code}" if self.code else where


def _shorten(filename: str) -> str:
    torch_root = os.path.dirname(os.path.dirname(torch.__file__))
    if filename.startswith(torch_root + os.sep):
        return os.path.relpath(filename, torch_root)
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


# ----------------------------------------------------------------------------------------------- recording
def _function_of(callable_: Callable) -> Any:
    """The Python function behind a callable: a ``functools.partial``'s, a callable object's ``__call__``."""
    fn = getattr(callable_, "func", callable_)  # functools.partial
    fn = getattr(fn, "__call__", fn) if not inspect.isfunction(fn) and not inspect.ismethod(fn) else fn
    return inspect.unwrap(fn)


def _anchors(model: nn.Module, functions: Sequence[Callable], opt_cls: type) -> set[tuple[str, str]]:
    """(file, function) pairs whose frames make_fx should keep: the functions of the files that define the given
    functions (loss_fn, grad_callback), the optimizer and the model's own (non-torch) module classes, with the
    functions nested in them (a helper that forward or loss_fn calls, a closure, a lambda), so that their ops map
    to the helper's line."""
    fns = [_function_of(f) for f in functions]
    codes = [getattr(fn, "__code__", None) for fn in fns]
    classes = [*opt_cls.__mro__[:-1], *{type(m) for m in model.modules() if not _in_torch(type(m))}]
    modules = {*(sys.modules.get(getattr(fn, "__module__", None) or "") for fn in fns), *(sys.modules.get(c.__module__) for c in classes)}
    members = [value for cls in classes for value in vars(cls).values()]
    members += [value for mod in modules if mod is not None for value in vars(mod).values()]
    for value in members:
        if inspect.isclass(value) and not _in_torch(value):  # helper classes of the same file: their methods
            members += [v for v in vars(value).values() if inspect.isfunction(v)]
        elif callable(value) or isinstance(value, (staticmethod, classmethod)):
            with contextlib.suppress(Exception):
                codes.append(getattr(inspect.unwrap(getattr(value, "__func__", value)), "__code__", None))
    return {(c.co_filename, c.co_name) for c in _with_nested(c for c in codes if c is not None)}


def _on_stack() -> set[tuple[str, str]]:
    """(file, function) of the frames running now: the user's code that called ``step``, whose frames are in every
    node's stack trace, and would make every node (the backward's too) look as if it came from that call."""
    frame, out = sys._getframe(1), set()
    while frame is not None:
        out.add((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    return out


def _in_torch(cls: type) -> bool:
    return (cls.__module__ or "").split(".")[0] == "torch"


def _with_nested(codes: Iterator[Any]) -> list[Any]:
    """The code objects and those nested in them (functions defined inside functions, lambdas, comprehensions)."""
    out, todo, seen = [], list(codes), set()
    while todo:
        code = todo.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        out.append(code)
        todo += [c for c in code.co_consts if inspect.iscode(c)]
    return out


@contextlib.contextmanager
def recording_sources(model: nn.Module, opt_cls: type, loss_fn: Callable, grad_callback: Callable | None = None) -> Iterator[None]:
    """While capturing: keep the lines of ``loss_fn``, ``grad_callback`` and the optimizer in stack traces, record
    module paths."""
    try:
        import torch.fx.proxy as fx_proxy

        registry: set = fx_proxy._STACK_TRACE_ANCHORS  # private: degrade to forward-only traces without it
    except (ImportError, AttributeError):
        registry = set()
    functions = [loss_fn] if grad_callback is None else [loss_fn, grad_callback]
    new = _anchors(model, functions, opt_cls) - registry - _on_stack()  # not the callers of compile/step
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    stack: list[tuple[str, str]] = []

    def publish() -> None:
        if stack:
            fx_traceback.current_meta["nn_module_stack"] = {path: (path, cls) for path, cls in stack}
        else:
            fx_traceback.current_meta.pop("nn_module_stack", None)

    def pre(module: nn.Module, args: Any) -> None:
        if id(module) in names:
            stack.append((names[id(module)], f"{type(module).__module__}.{type(module).__qualname__}"))
            publish()

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if id(module) in names and stack:
            stack.pop()
            publish()

    hooks = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post, always_call=True),
    ]
    registry.update(new)
    try:
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        registry.difference_update(new)
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------- reading
def _frames(node: fx.Node) -> list[traceback.FrameSummary]:
    trace = node.meta.get("stack_trace") or ""
    frames: list[traceback.FrameSummary] = []
    lines = trace.splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line.startswith('File "'):
            continue
        filename, _, rest = line[len('File "') :].partition('"')
        lineno = rest.partition("line ")[2].split(",")[0].strip()
        function = rest.partition(" in ")[2].strip()
        code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith('File "') else ""
        frames.append(traceback.FrameSummary(filename, int(lineno) if lineno.isdigit() else 0, function, line=code))
    return frames


def module_path(node: fx.Node) -> str | None:
    """The innermost module path the node was computed in (``""``: the root model), None outside modules."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def module_class(node: fx.Node) -> str | None:
    """The class name of the innermost module (``"Linear"``), None outside modules."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][1]).rsplit(".", 1)[-1]


def source_of(node: fx.Node) -> SourceLine | None:
    """The source line of a node (see the module docstring); None for placeholders and the output."""
    if node.op in ("placeholder", "output"):
        return None
    frames = _frames(node)
    if not frames and _is_returned_loss(node) and isinstance(node.args[0], fx.Node):
        return source_of(node.args[0])  # the loss the step returns: a view of loss_fn's result
    if not frames:
        # The traced backward runs outside every module's forward; an op inside one whose frames were not kept
        # comes from code without a file (a model defined by exec or compile of a string)
        path = module_path(node)
        return SourceLine("autograd") if path is None else SourceLine("module", module=path)
    chosen, kind = user_frame(frames), "user"
    if chosen is None:
        optim = [f for f in frames if f.filename.startswith(_OPTIM_DIR)]
        chosen, kind = (optim[-1], "optimizer") if optim else (frames[-1], "module")
    return SourceLine(kind, chosen.filename, chosen.lineno or 0, chosen.name, chosen.line or "", module_path(node))


def _is_returned_loss(node: fx.Node) -> bool:
    """Whether ``node`` is the loss the step graph returns (its last output) made by a view op without a stack
    trace of its own (torch.func's reshape of loss_fn's result)."""
    if not node.args or not any(u.op == "output" for u in node.users):
        return False
    output = next(u for u in node.users if u.op == "output")
    values = output.args[0]
    return isinstance(values, (list, tuple)) and bool(values) and values[-1] is node and "view" in str(node.target)


def describe_input(node: fx.Node) -> str:
    """``param 0.weight`` for a placeholder with unrollc's NodeInfo, else its name."""
    info = node.meta.get("unrollc")
    return f"{info.role} {info.name}" if info is not None else node.name


def _fmt(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in arg.items()) + "}"
    return repr(arg)


def _target(node: fx.Node) -> str:
    if node.op == "get_attr":
        return f"self.{node.target}"
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    return getattr(node.target, "__qualname__", str(node.target))


def _header(src: SourceLine | None, node: fx.Node) -> str:
    if src is None:
        return ""
    where = src.short()
    if src.module is not None:
        cls = module_class(node)
        where = f"[{src.module or '<model>'}: {cls}] {where}"
    return where


def annotated_code(gm: fx.GraphModule | Any, name: str = "step") -> str:
    """The graph (a GraphModule, e.g. ``stepper.graphs["after functionalize"]``, or a Stepper: its latest graph)
    as readable Python, each run of nodes headed by the source line it came from; returned as a string."""
    from .draw import _graph_of

    gm = _graph_of(gm, api="unrollc.inspect.annotated_code")
    lines = [f"def {name}("]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"    {node.name},  # {describe_input(node)}")
    lines.append("):")
    previous = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append(f"    return {_fmt(node.args[0])}")
            continue
        header = _header(source_of(node), node)
        if header != previous:
            lines.append(f"    # {header}")
            previous = header
        args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
        call = _target(node) if node.op == "get_attr" else f"{_target(node)}({', '.join(args)})"
        lines.append(f"    {node.name} = {call}")
    return "\n".join(lines) + "\n"
