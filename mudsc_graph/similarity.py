"""Weight-space similarity of one group, given the current matchings of its neighbours.

For group ``p`` and model ``i``: every tensor axis in the group (producing rows, biases, norm
affines, the consuming columns of every reader, cls tokens and positional embeddings; buffers such
as BatchNorm running statistics excluded) is a set of feature rows. Every *other* axis of the
tensor is first brought into merged coordinates with the neighbours' current matchings (an axis
that reads its units by model ``i``'s merge block, any other axis by its unmerge block), then
``p``'s axis is moved first and flattened to ``O x D_t``; the tensors are concatenated along
features. Stacking the N models gives ``(N*O) x D`` and the similarity is the Pearson correlation
between rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .groups import Expr, MergeSpec
from .transform import apply_along, densify_grouped, take_group


@dataclass(frozen=True)
class Occurrence:
    """Group ``gid`` on axis ``axis`` of tensor ``name``; ``expr`` is that axis's expression."""

    name: str
    axis: int
    expr: Expr
    inner_groups: int = 0  # > 0: a grouped-conv weight, densified before use


def occurrences(spec: MergeSpec, gid: int) -> list[Occurrence]:
    """Where group ``gid`` appears in parameters (buffers excluded)."""
    buffers = set(spec.buffers)
    out = []
    for name, axis in spec.groups[gid].members:
        if name in buffers:
            continue
        exprs = spec.axes[name]
        inner = next((e[2] for e in exprs if e[0] == "inner"), 0)
        e = exprs[axis]
        out.append(Occurrence(name, axis, e[1] if e[0] == "inner" else e, inner))
    return out


def neighbours(spec: MergeSpec, gid: int) -> set[int]:
    """Groups on the other axes of ``gid``'s tensors (``gid`` itself when it appears twice)."""
    from .groups import _gids

    out: set[int] = set()
    for occ in occurrences(spec, gid):
        for a, e in enumerate(spec.axes[occ.name]):
            if a != occ.axis:
                out.update(_gids(e))
        if _gids(occ.expr).count(gid) > 1:
            out.add(gid)
    return out


def weight_features(
    spec: MergeSpec,
    state: Mapping[str, torch.Tensor],
    gid: int,
    merge_of: Callable[[int], "torch.Tensor | None"],
    unmerge_t_of: Callable[[int], "torch.Tensor | None"],
    occs: list[Occurrence] | None = None,
) -> torch.Tensor:
    """Model features of group ``gid``: ``(O, D)``, other axes in merged coordinates."""
    sizes = {g.id: g.size for g in spec.groups}
    feats = []
    for occ in occs if occs is not None else occurrences(spec, gid):
        t = state[occ.name].float()
        exprs = list(spec.axes[occ.name])
        if occ.inner_groups:
            t = densify_grouped(t, occ.inner_groups)
            exprs = [e[1] if e[0] == "inner" else e for e in exprs]
        consumed = set(spec.consumed.get(occ.name, ()))
        for a, e in enumerate(exprs):
            if a == occ.axis:
                continue
            t = apply_along(t, a, e, merge_of if a in consumed else unmerge_t_of, sizes)
        t = t.movedim(occ.axis, 0)
        for piece in take_group(t, occ.expr, gid, sizes):
            feats.append(piece.reshape(piece.shape[0], -1))
    if not feats:
        raise ValueError(f"group {gid} has no parameter to compare")
    return torch.cat(feats, dim=1)


@dataclass(frozen=True)
class NormalRows:
    """Rows centred and scaled to unit norm, with their means and which rows were constant."""

    x: torch.Tensor
    mean: torch.Tensor
    dead: torch.Tensor


def normal_rows(x: torch.Tensor) -> NormalRows:
    mean = x.mean(dim=1)
    x = x - mean[:, None]
    norm = x.norm(dim=1, keepdim=True)
    dead = norm.squeeze(1) <= 1e-12 * (1 + mean.abs())
    return NormalRows(x / norm.clamp_min(1e-30), mean, dead)


def stacked_correlation(rows: list[NormalRows], cross_only: bool = False) -> torch.Tensor:
    """Pearson correlation of the stacked rows of N models.

    Constant rows correlate 0 with the others and 1 with constant rows of the same value.
    ``cross_only`` computes only the blocks between model 0 and each other model (what a
    permutation matcher reads); the other blocks are 0.
    """
    from .stats import _equal_constants

    sizes = [r.x.shape[0] for r in rows]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    corr = rows[0].x.new_zeros(sum(sizes), sum(sizes))
    for i, ri in enumerate(rows):  # upper blocks only: the matrix is symmetric
        for j in range(i, len(rows)):
            if cross_only and (i != 0 or j == 0):
                continue
            block = ri.x @ rows[j].x.T
            corr[starts[i] : starts[i] + sizes[i], starts[j] : starts[j] + sizes[j]] = block
            if j != i:
                corr[starts[j] : starts[j] + sizes[j], starts[i] : starts[i] + sizes[i]] = block.T
    corr.clamp_(-1.0, 1.0)
    dead = torch.cat([r.dead for r in rows])
    if dead.any():
        corr[dead] = 0.0
        corr[:, dead] = 0.0
        _equal_constants(corr, dead, torch.cat([r.mean for r in rows]))
    corr.fill_diagonal_(1.0)
    return corr


def row_correlation(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the rows of ``x`` (constant rows: see :func:`stacked_correlation`)."""
    return stacked_correlation([normal_rows(x)])
