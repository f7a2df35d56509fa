"""An example mudsc plugin: a layer handler for ``LowRankLinear`` and an architecture using it."""

from __future__ import annotations

import torch
from torch import nn

from mudsc_graph import Architecture, LayerHandler, hookimpl


class LowRankLinear(nn.Module):
    """``y = x @ U @ V + b`` with ``U: (in, rank)`` and ``V: (rank, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.randn(in_features, rank) / in_features**0.5)
        self.V = nn.Parameter(torch.randn(rank, out_features) / rank**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.multi_dot([x.reshape(-1, x.shape[-1]), self.U, self.V]).reshape(*x.shape[:-1], -1) + self.bias


def propagate_low_rank(ctx) -> None:
    """x's features are read by U's rows; U's columns and V's rows share the rank units;
    the outputs are V's columns (and the bias)."""
    x = ctx.input(0)
    ctx.contract(x.axis(-1), ctx.param("U", 0))
    ctx.contract(ctx.param("U", 1), ctx.param("V", 0))
    ctx.link(ctx.param("bias", 0), ctx.param("V", 1))
    ctx.internal_probe(ctx.param("U", 1), "rank")  # the rank units never appear as a value: say how to read them
    out = ctx.like(x)
    out[-1] = ctx.param("V", 1)
    ctx.set_output(out)


def lowrank_mlp(hidden: int = 32, rank: int = 8, num_classes: int = 10) -> nn.Module:
    """A small MLP on 8x8 inputs whose middle layer is low-rank."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), LowRankLinear(hidden, hidden, rank), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def low_rank_features(module: LowRankLinear, args: tuple, kwargs: dict, key: str) -> torch.Tensor:
    """Activations of the rank units (``x @ U``), units on the last axis."""
    return args[0] @ module.U


@hookimpl
def mudsc_layer_handlers():
    return [LayerHandler("example.LowRankLinear", "call_module", (LowRankLinear,), propagate_low_rank,
                         description="low-rank linear: the rank axis is a space of its own", features=low_rank_features)]


@hookimpl
def mudsc_architectures():
    return [Architecture("example_lowrank_mlp", factory=lowrank_mlp,
                         example_inputs=lambda b: (torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0)),),
                         description="MLP with a low-rank middle layer (from mudsc-example-plugin)")]
