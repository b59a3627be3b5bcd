"""Run a module with other tensors in place of its parameters and buffers, restoring them afterwards.

``torch.nn.utils.stateless._reparametrize_module(tie_weights=True)`` (what ``torch.func.functional_call`` uses)
swaps every name a tensor is reachable by. A submodule registered under two names (``self.alias = self.block``)
makes two names for one ``(module, attribute)``: the second swap saves the first one's replacement as the
"original", so the restore leaves a plain tensor in the user's model (torch 2.13). :func:`reparametrized` expands
the tied names itself, one per ``(module, attribute)``: tied weights (``out.weight = emb.weight``, two modules)
are set in both modules, an aliased submodule once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["reparametrized", "tied_names"]


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """For each name ``model.named_parameters()`` / ``named_buffers()`` give (duplicates removed), every name of
    the same tensor that lives in another ``(module, attribute)`` slot, itself first."""
    out: dict[str, list[str]] = {}
    for named in (model.named_parameters, model.named_buffers):
        first: dict[int, str] = {}
        slots: set[tuple[int, str]] = set()
        for name, t in named(remove_duplicate=False):
            path, _, attr = name.rpartition(".")
            slot = (id(model.get_submodule(path)), attr)
            if slot in slots:
                continue  # the same module under another name
            slots.add(slot)
            canonical = first.setdefault(id(t), name)
            out.setdefault(canonical, []).append(name)
    return out


@contextlib.contextmanager
def reparametrized(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``model`` runs with ``weights`` (by the names of ``named_parameters()``/``named_buffers()``; tied and aliased
    names follow) in place of its tensors; names the model does not have are set as attributes, as
    ``_reparametrize_module(strict=False)`` does. The model's own tensors are back afterwards, by identity."""
    ties = tied_names(model)
    expanded: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        for alias in ties.get(name, [name]):
            expanded.setdefault(alias, t)
    with _reparametrize_module(model, expanded, tie_weights=False, strict=False):
        yield
