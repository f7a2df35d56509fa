"""An example mudsc plugin: a layer handler for ``LowRankLinear``, an architecture using it, and a
matching strategy (``greedy``) that ``merge(method="greedy")`` and ``mudsc merge --method greedy``
then accept, like the built-in methods."""

from __future__ import annotations

import torch
from torch import nn

from mudsc_graph import Architecture, LayerHandler, MatcherParameter, MatchingStrategy, hookimpl
from mudsc_graph.merging.matching import matching_from_labels, validate_sims


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


def greedy_match(sims, n_models, blocks=1, *, threshold=-1.0, **options):
    """Pair every model's units with model 0's greedily: repeatedly the most similar free pair of the
    cross block (a cheaper, less exact stand-in for the linear assignment of ``align``). Pairs less
    similar than ``threshold`` are not trusted: the units left over keep their order (paired by index)."""
    if options:
        raise ValueError(f"matching strategy 'greedy' takes only threshold, got {', '.join(options)}")
    out = []
    for sim, o in zip(sims, validate_sims(sims, n_models, blocks)):
        labels = torch.empty(n_models * o, dtype=torch.long)
        labels[:o] = torch.arange(o)
        scores = []
        for i in range(1, n_models):
            cross = sim[:o, i * o : (i + 1) * o].detach().cpu()
            order = torch.argsort(cross.flatten(), descending=True)
            taken_rows, taken_cols = torch.zeros(o, dtype=torch.bool), torch.zeros(o, dtype=torch.bool)
            for flat in order.tolist():
                r, c = divmod(flat, o)
                if float(cross[r, c]) < threshold or bool(taken_rows.all()):
                    break
                if not taken_rows[r] and not taken_cols[c]:
                    taken_rows[r] = taken_cols[c] = True
                    labels[i * o + c] = r
                    scores.append(float(cross[r, c]))
            for r, c in zip((~taken_rows).nonzero().flatten().tolist(), (~taken_cols).nonzero().flatten().tolist()):
                labels[i * o + c] = r  # the untrusted rest, in order
                scores.append(float(cross[r, c]))
        out.append(matching_from_labels(labels.to(sim.device), n_models, o, sum(scores) / max(len(scores), 1)))
    return out


@hookimpl
def mudsc_matching_strategies():
    return [MatchingStrategy("greedy", greedy_match, supports_blocks=False, uses_within_model=False,
                             description="greedy pairs against model 0 (from mudsc-example-plugin); no block matching",
                             parameters=(MatcherParameter("threshold", -1.0, "pairs less similar than this keep their order",
                                                          minimum=-1.0, maximum=1.0),))]
