"""Partial zip: a merged trunk, then each model's own tail fed by its unmerged features.

``build_partial(gm_merged, gms, cut_nodes, ...)`` writes one fx graph: the trunk's nodes run once
with the merged weights (submodule ``trunk``); every value that crosses the cut is unmerged for model
``i`` (``U_i f`` along each axis that carries a merged group, submodule ``unmerge{i}_{node}``) and
fed to a copy of the tail that uses model ``i``'s weights (submodule ``tail{i}``). The module returns
a tuple with one output per model. It is an ordinary ``nn.Module`` (a GraphModule): it can be saved,
moved to a device and hooked like any other.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import MudscError, did_you_mean
from ..spec.axes import Expr, group_ids
from .assignment import Gather
from .weights import apply_along


class Unmerge(nn.Module):
    """Maps merged features back to one model's units along the axes that carry merged groups."""

    def __init__(self, axes: list[tuple[int, Expr]], matrices: dict[int, torch.Tensor], sizes: dict[int, int]) -> None:
        super().__init__()
        self.axes = axes
        self.sizes = sizes
        self.keys = sorted(matrices)
        for gid in self.keys:
            self.register_buffer(f"u{gid}", matrices[gid].clone())

    def _matrix(self, gid: int) -> "torch.Tensor | Gather | None":
        """The unmerge block: a gather when every model unit reads one merged unit (always, for the
        built-in matchers: no multiply-adds), else the dense matrix."""
        if gid not in self.keys:
            return None
        A = getattr(self, f"u{gid}")
        return Gather.of(A) or A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for axis, e in self.axes:
            x = apply_along(x, axis, e, self._matrix, self.sizes)
        return x


def stop_index(order: Sequence[tuple[str, str]], stop_at: str) -> int:
    """Index (in execution order) of the last node that belongs to ``stop_at``.

    ``order`` lists (node name, module path). ``stop_at`` is a node name or a module path: the
    trunk ends with the last node run by that module or one of its submodules.
    """
    last = -1
    for k, (name, path) in enumerate(order):
        if name == stop_at or path == stop_at or path.startswith(stop_at + "."):
            last = k
    if last < 0:
        paths = sorted({p for _, p in order if p} | {n for n, _ in order})
        hint = did_you_mean(stop_at, paths)
        raise MudscError(f"stop point {stop_at!r} is neither a module path nor a node of the model{hint}")
    return last


def build_partial(
    merged: nn.Module,
    models: list[nn.Module],
    graph: fx.Graph,
    trunk: set[str],
    value_axes: Callable[[str], list[Any]],
    unmerge_of: Callable[[int, int], torch.Tensor | None],
    sizes: dict[int, int],
    trunk_graph: fx.Graph | None = None,
) -> fx.GraphModule:
    """The partial-zip module (see the module docstring).

    ``value_axes(node)`` gives the axis expressions of a node's output (``None`` for an axis whose
    structure depends on another axis); ``unmerge_of(i, gid)`` model ``i``'s unmerge block
    ``(O, O_m)`` of a merged group, or ``None`` if the group is not merged; ``sizes`` the merged
    groups' units. ``trunk_graph``: the merged model's own graph when its sizes differ from the
    models' (a width budget: the same nodes, other constants), whose nodes the trunk runs.
    """
    trunk_nodes = {n.name: n for n in (trunk_graph or graph).nodes}
    root = nn.Module()
    root.trunk = merged
    out = fx.Graph()
    env: dict[str, fx.Node] = {}
    nodes = list(graph.nodes)
    output_node = next(n for n in nodes if n.op == "output")

    def copy(n: fx.Node, prefix: str, lookup: dict[str, fx.Node]) -> fx.Node:
        new = out.node_copy(n, lambda a: lookup[a.name])
        if n.op in ("call_module", "get_attr"):
            new.target = f"{prefix}.{n.target}"
        return new

    for n in nodes:
        if n.name in trunk and n.op != "output":
            env[n.name] = copy(trunk_nodes[n.name], "trunk", env) if n.op != "placeholder" else out.node_copy(n)
    tail = [n for n in nodes if n.name not in trunk and n.op != "output"]
    if not tail:
        out.output(fx.node.map_arg(output_node.args[0], lambda a: env[a.name]))
        return fx.GraphModule(root, out, "PartialMerge")
    crossing = {a.name for n in tail for a in n.all_input_nodes if a.name in trunk}
    results = []
    for i, model in enumerate(models):
        setattr(root, f"tail{i}", model)
        local = dict(env)
        for name in sorted(crossing):
            src = graph_node = next(x for x in nodes if x.name == name)
            if src.op == "placeholder":
                continue
            if src.op == "get_attr":  # the tail reads its own model's parameter
                local[name] = copy(graph_node, f"tail{i}", local)
                continue
            axes = _cut_axes(name, value_axes(name), lambda g: unmerge_of(i, g) is not None)
            if axes:
                mats = {g: unmerge_of(i, g) for _, e in axes for g in group_ids(e) if unmerge_of(i, g) is not None}
                mod_name = f"unmerge{i}_{name}"
                setattr(root, mod_name, Unmerge(axes, mats, sizes))
                local[name] = out.call_module(mod_name, (env[name],))
        for n in tail:
            local[n.name] = copy(n, f"tail{i}", local)
        results.append(fx.node.map_arg(output_node.args[0], lambda a: local[a.name]))
    out.output(tuple(results))
    gm = fx.GraphModule(root, out, "PartialMerge")
    gm.graph.lint()
    return gm


def _cut_axes(name: str, exprs: list[Expr | None] | None, merged: Callable[[int], bool]) -> list[tuple[int, Expr]]:
    """The axes of value ``name`` that carry a merged group (an axis split by structure: an error)."""
    if exprs is None:
        return []
    axes = []
    for axis, e in enumerate(exprs):
        if e is None:
            raise MudscError(
                f"cannot cut the model at value {name!r}: one of its axes is split by structure (e.g. inside an "
                "attention layer); choose a stop point at a layer boundary"
            )
        if any(merged(g) for g in group_ids(e)):
            axes.append((axis, e))
    return axes


#: The most models a partial-zip checkpoint may stand for (each gets its own tail when it is rebuilt).
