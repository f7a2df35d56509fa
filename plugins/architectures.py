"""Registers every model of the zoo (:data:`mudsc_plugins.zoo.ZOO`) as a named architecture.

This is an ordinary plugin: it implements :func:`~mudsc_graph.plugin.hookspecs.mudsc_architectures`
exactly as a third-party package would. Example inputs are drawn from a seeded generator, so
``arch.example_inputs(2)`` gives the same tensors on every call and in every process.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from mudsc_graph.plugin.hookspecs import hookimpl
from mudsc_graph.plugin.records import Architecture

from .zoo import ZOO

#: Seed of the generator that draws every architecture's example inputs.
EXAMPLE_INPUTS_SEED = 0


def example_inputs_for(input_shape: Sequence[int], seed: int = EXAMPLE_INPUTS_SEED) -> Callable[[int], tuple]:
    """A deterministic ``example_inputs(batch_size)``: one standard-normal tensor of
    shape ``(batch_size, *input_shape)``, the same on every call."""
    shape = tuple(int(s) for s in input_shape)

    def example_inputs(batch_size: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(int(batch_size), *shape, generator=generator),)

    return example_inputs


@hookimpl
def mudsc_architectures() -> list[Architecture]:
    return [
        Architecture(
            name,
            factory=entry.factory,
            example_inputs=example_inputs_for(entry.input_shape),
            aliases=tuple(entry.aliases or ()),
            description=entry.description or "",
            defaults=dict(entry.defaults or {}),
        )
        for name, entry in ZOO.items()
    ]
