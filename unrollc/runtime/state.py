"""UnrollState: everything that changes during training, as plain dicts of tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = ["UnrollState", "hyper_to_groups", "groups_to_hyper"]


@dataclass(frozen=True, repr=False)
class UnrollState:
    """The state of an unrolled training run at step ``t``.

    Attributes:
        params: parameter name (as in ``model.named_parameters()``) -> tensor.
        buffers: buffer name (as in ``model.named_buffers()``) -> tensor; BatchNorm running stats advance.
        opt_state: parameter name -> the optimizer's state for it (``{"step": ..., "exp_avg": ...}``).
        hyper: hyperparameters as tensors: ``{"lr": ..., "betas": (b1, b2), ...}`` for a single
            parameter group; with several groups the keys carry the group index: ``"0.lr"``, ``"1.lr"``.
        t: number of optimizer steps taken (a warm optimizer starts at its own count).
        loss: the loss of the step that produced this state (None for the initial state).
        losses: after ``unroll``, the loss of every step of that unroll, in order.
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: dict[str, dict[str, torch.Tensor]]
    hyper: dict[str, Any]
    t: int = 0
    loss: torch.Tensor | None = None
    losses: list[torch.Tensor] = field(default_factory=list)

    def __repr__(self) -> str:
        """A summary: names and shapes, scalar values, the number of losses (the tensors would fill a screen)."""
        def short(x: Any) -> str:
            if isinstance(x, (tuple, list)):
                return "(" + ", ".join(map(short, x)) + ")"
            if not isinstance(x, torch.Tensor):
                return repr(x)
            grad = " (requires grad)" if x.requires_grad else ""
            if x.dim() == 0 and x.device.type != "meta":
                with contextlib.suppress(RuntimeError):  # inside a torch.func transform
                    return f"{x.item():.6g}{grad}"
            return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}{grad}"

        def entries(d: Mapping[str, Any]) -> str:
            return "{" + ", ".join(f"{k!r}: {short(v)}" for k, v in d.items()) + "}"

        opt = sorted({k for st in self.opt_state.values() for k in st})
        return (f"UnrollState(t={self.t}, loss={short(self.loss)}, params={entries(self.params)}, "
                f"buffers={entries(self.buffers)}, opt_state={len(self.opt_state)} parameters x {opt}, "
                f"hyper={entries(self.hyper)}, losses=[{len(self.losses)} values])")

    def replace(self, **changes: Any) -> "UnrollState":
        """A copy with some fields changed (the state itself is immutable)."""
        fields = tuple(self.__dataclass_fields__)
        unknown = [k for k in changes if k not in fields]
        if unknown:
            raise TypeError(f"UnrollState.replace: no field {unknown[0]!r}; the fields are {', '.join(fields)}.")
        for name in ("params", "buffers", "opt_state", "hyper"):
            if name in changes and not isinstance(changes[name], Mapping):
                raise TypeError(f"UnrollState.replace: expected `{name}` as a dict, got {type(changes[name]).__name__}.")
        t = changes.get("t", 0)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise TypeError(f"UnrollState.replace: expected `t`, the number of steps taken, as an int >= 0, got {t!r}.")
        return replace(self, **changes)


def groups_to_hyper(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-group hyperparameters -> the user-facing dict (bare keys for a single group)."""
    if len(groups) == 1:
        return dict(groups[0])
    return {f"{i}.{k}": v for i, g in enumerate(groups) for k, v in g.items()}


def hyper_to_groups(hyper: Mapping[str, Any], n_groups: int, api: str = "unrollc") -> list[dict[str, Any]]:
    """The user-facing dict -> per-group dicts. Bare keys apply to every group, ``"i.key"`` to group i
    (``api`` names the caller in the error for a group the optimizer does not have)."""
    groups: list[dict[str, Any]] = [{} for _ in range(n_groups)]
    for key, value in hyper.items():
        head, dot, rest = key.partition(".")
        if dot and head.isdigit():
            index = int(head)
            if index >= n_groups:
                keys = f"'0.{rest}'" if n_groups == 1 else f"'0.{rest}' .. '{n_groups - 1}.{rest}'"
                raise KeyError(
                    f"{api}: hyperparameter {key!r} names parameter group {index}, but the optimizer has "
                    f"{n_groups} group(s); use {keys} or a bare {rest!r} (every group)."
                )
            groups[index][rest] = value
        else:
            for g in groups:
                g[key] = value
    return groups


def first_positions(items: Sequence[Any]) -> tuple[int, ...]:
    """For each position, the first position holding the same object (shared step counters are one tensor)."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(id(x), j) for j, x in enumerate(items))


def aliased_state_inputs(state_in: Sequence[tuple[str, str]], opt_state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, str]:
    """``{"name.key": "first.key"}`` for optimizer-state inputs that are the same tensor as an earlier one (the
    ``cse`` pass reads them through one placeholder: ``gm.meta["unrollc"]["aliased_inputs"]``)."""
    names = [f"{n}.{k}" for n, k in state_in]
    firsts = first_positions([opt_state[n][k] for n, k in state_in])
    return {names[j]: names[f] for j, f in enumerate(firsts) if f != j}


def guard_aliases(aliased_inputs: Mapping[str, str]) -> dict[str, str]:
    """:func:`aliased_state_inputs` as guard leaf names (``"state:0.bias.step" -> "state:0.weight.step"``), for
    :class:`~unrollc.guards.GuardSet`."""
    return {f"state:{a}": f"state:{b}" for a, b in aliased_inputs.items()}


def distinct_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each tensor counted once however often it appears (the step counter that the
    parameters share, a tensor passed both as a batch and as a meta input)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
