"""Random-number generator states, so that recomputed steps draw the numbers their first run drew.

A step with dropout draws from the CPU generator (and from the generator of each CUDA device its tensors
live on), and noise drawn with ``generator=g`` from the user's own ``torch.Generator`` objects (found in the step
graph by :func:`step_generators`). A checkpointed unroll runs some steps twice: once in the forward sweep and again when the
backward pass recomputes them from a stored state. :class:`RngState` is taken with every stored state
and restored with it, so the replay sees the same masks, as ``torch.utils.checkpoint`` does for one
segment; when no step draws, none is kept (a CPU generator's state is 5056 bytes, :func:`stored_rng_bytes`). :func:`fork_rng` runs code (tracing, the backward sweep) without moving the user's generators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["RngState", "cuda_devices", "draws_global_rng", "draws_random", "fork_rng", "step_generators", "stored_rng_bytes"]


def cuda_devices(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """The CUDA devices ``tensors`` live on (whose generators a step may draw from), sorted."""
    return tuple(sorted({t.device.index for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda and t.device.index is not None}))


def step_generators(gm: torch.fx.GraphModule) -> tuple[torch.Generator, ...]:
    """The user's ``torch.Generator`` objects a step graph draws from (``torch.randn(..., generator=g)``)."""
    found = (getattr(gm, str(n.target), None) for n in gm.graph.nodes if n.op == "get_attr")
    return tuple({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


def draws_global_rng(gm: torch.fx.GraphModule) -> bool:
    """Whether the step graph has a random op (dropout) that draws from torch's global generator, not a
    ``torch.Generator`` of the user's."""
    return any(
        node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in node.target.tags and node.kwargs.get("generator") is None
        for node in gm.graph.nodes
    )


def draws_random(gm: torch.fx.GraphModule) -> bool:
    """Whether the step graph draws random numbers: from torch's global generator or from one of the user's."""
    return draws_global_rng(gm) or bool(step_generators(gm))


def stored_rng_bytes(graphs: Iterable[torch.fx.GraphModule], devices: tuple[int, ...] = ()) -> int:
    """Bytes a checkpointed unroll keeps with every stored state for steps running ``graphs``: the generators'
    states (:class:`RngState`) when a step draws random numbers, else nothing (none is kept)."""
    graphs = list(graphs)
    if not any(map(draws_random, graphs)):
        return 0
    generators = {id(g): g for gm in graphs for g in step_generators(gm)}.values()
    states = [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices), *(g.get_state() for g in generators)]
    return sum(t.numel() * t.element_size() for t in states)


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state, those of the CUDA devices the unroll's tensors live on, and those of the user's
    own generators the step draws from."""

    cpu: torch.Tensor
    devices: tuple[int, ...]
    device_states: tuple[torch.Tensor, ...]
    generators: tuple[torch.Generator, ...] = ()
    generator_states: tuple[torch.Tensor, ...] = ()

    @classmethod
    def now(cls, devices: tuple[int, ...], generators: tuple[torch.Generator, ...] = ()) -> "RngState":
        """The generators' states at this moment: the CPU's, those of the CUDA ``devices`` and of ``generators``."""
        return cls(torch.get_rng_state(), devices, tuple(torch.cuda.get_rng_state(d) for d in devices),
                   generators, tuple(g.get_state() for g in generators))

    def restore(self) -> None:
        """Set the generators back to this state."""
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.device_states, strict=True):
            torch.cuda.set_rng_state(state, device)
        for generator, state in zip(self.generators, self.generator_states, strict=True):
            generator.set_state(state)


@contextlib.contextmanager
def fork_rng(devices: tuple[int, ...], generators: tuple[torch.Generator, ...] = ()) -> Iterator[None]:
    """Run the body with the generators (the CPU's, those of the CUDA ``devices`` and ``generators``) restored
    afterwards."""
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)
