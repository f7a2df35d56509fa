"""Weight-space similarity of one group, given the current matchings of its neighbours.

For group ``p`` and model ``i``: every tensor axis in the group (producing rows, biases, norm
affines, the consuming columns of every reader, cls tokens and positional embeddings; buffers such
as BatchNorm running statistics excluded) is a set of feature rows. Every *other* axis of the
tensor is first brought into merged coordinates with the neighbours' current matchings (an axis
that reads its units by model ``i``'s merge block, any other axis by its unmerge block), then
``p``'s axis is moved first and flattened to ``O x D_t``; the tensors are concatenated along
features. Stacking the N models gives ``(N*O) x D`` and the similarity is the Pearson correlation
between rows.

Two equal ways to compute it: :func:`normal_rows` + :func:`stacked_correlation` on the concatenated
features (each model's rows can be cached and reused), and :func:`streamed_correlation`, which
accumulates the correlation tensor by tensor so that only one tensor's features per model are
alive at a time. The residual stream of a transformer spans nearly every weight (ViT-B/16: 768 x
112,633 floats, 330 MiB per model, plus as much again in temporaries), so wide groups use the latter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from ..spec.axes import Expr, group_ids, grouped_axis, take, ungroup
from ..spec.merge_spec import MergeSpec
from .statistics import equal_constants
from .weights import apply_along, densify_grouped


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
        exprs, inner = ungroup(spec.axes[name])
        out.append(Occurrence(name, axis, exprs[axis], inner))
    return out


def neighbours(spec: MergeSpec, gid: int) -> set[int]:
    """Groups on the other axes of ``gid``'s tensors (``gid`` itself when it appears twice)."""
    out: set[int] = set()
    for occ in occurrences(spec, gid):
        for a, e in enumerate(spec.axes[occ.name]):
            if a != occ.axis:
                out.update(group_ids(e))
        if group_ids(occ.expr).count(gid) > 1:
            out.add(gid)
    return out


def feature_pieces(
    spec: MergeSpec,
    state: Mapping[str, torch.Tensor],
    gid: int,
    merge_of: Callable[[int], "torch.Tensor | None"],
    unmerge_t_of: Callable[[int], "torch.Tensor | None"],
    occs: list[Occurrence] | None = None,
) -> Iterator[torch.Tensor]:
    """Model features of group ``gid``, one ``(O, D_t)`` piece at a time (other axes in merged
    coordinates), lazily: only the tensor being read is transformed."""
    sizes = {g.id: g.size for g in spec.groups}
    for occ in occs if occs is not None else occurrences(spec, gid):
        t = state[occ.name].float()
        inner = grouped_axis(spec.axes[occ.name])
        if occ.inner_groups and occ.axis in (0, inner) and t.shape[0] == occ.inner_groups:
            yield from _expert_pieces(spec, t, occ, inner, gid, merge_of, unmerge_t_of, sizes)
            continue
        exprs = ungroup(spec.axes[occ.name])[0] if occ.inner_groups else spec.axes[occ.name]
        if occ.inner_groups:
            t = densify_grouped(t, occ.inner_groups, grouped_axis(spec.axes[occ.name]))
        consumed = set(spec.consumed.get(occ.name, ()))
        for a, e in enumerate(exprs):
            if a == occ.axis:
                continue
            t = apply_along(t, a, e, merge_of if a in consumed else unmerge_t_of, sizes)
        t = t.movedim(occ.axis, 0)
        for piece in take(t, occ.expr, gid, sizes):
            yield piece.reshape(piece.shape[0], -1)


def _expert_pieces(spec: MergeSpec, t: torch.Tensor, occ: Occurrence, inner: int, gid: int, merge_of: Callable,
                   unmerge_t_of: Callable, sizes: Mapping[int, int]) -> Iterator[torch.Tensor]:
    """Features of a tensor with one block per row (experts stored as ``(experts, hidden, ...)``),
    without the block index in them: densified, an expert's features would sit in its own block and
    units would match by expert index, not by their weights. The units inside the blocks (``occ.axis
    == inner``): each unit's row of its expert. The blocks themselves (axis 0): each expert's slab
    with its hidden units in merged coordinates (the inner group's map, then summed over blocks)."""
    consumed = set(spec.consumed.get(occ.name, ()))
    exprs = spec.axes[occ.name]
    for a, e in enumerate(exprs):
        if a not in (0, inner):
            t = apply_along(t, a, e, merge_of if a in consumed else unmerge_t_of, sizes)
    if occ.axis == 0:
        blocks = t.shape[0]
        dense = apply_along(densify_grouped(t, blocks, inner), inner, ungroup(exprs)[0][inner],
                            merge_of if inner in consumed else unmerge_t_of, sizes).movedim(inner, 1)
        t = dense.reshape(blocks, blocks, dense.shape[1] // blocks, *dense.shape[2:]).sum(1)
    else:
        t = t.movedim(inner, 1)
        t = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
    for piece in take(t, occ.expr, gid, sizes):
        yield piece.reshape(piece.shape[0], -1)


def weight_features(
    spec: MergeSpec,
    state: Mapping[str, torch.Tensor],
    gid: int,
    merge_of: Callable[[int], "torch.Tensor | None"],
    unmerge_t_of: Callable[[int], "torch.Tensor | None"],
    occs: list[Occurrence] | None = None,
) -> torch.Tensor:
    """Model features of group ``gid``: ``(O, D)``, the pieces of :func:`feature_pieces` concatenated."""
    feats = list(feature_pieces(spec, state, gid, merge_of, unmerge_t_of, occs))
    if not feats:
        raise ValueError(f"group {gid} has no parameter to compare")
    return torch.cat(feats, dim=1)


def feature_numel(spec: MergeSpec, state: Mapping[str, torch.Tensor], occs: list[Occurrence]) -> int:
    """About how many floats :func:`weight_features` holds for one model (an upper estimate from the
    tensors read, grouped convolutions densified), to choose between caching and streaming."""
    return sum(state[o.name].numel() * max(o.inner_groups, 1) for o in occs)


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
    return NormalRows(x.div_(norm.clamp_min(1e-30)), mean, dead)


def _pairs(n: int, within_model: bool) -> list[tuple[int, int]]:
    """The blocks ``(i, j)``, ``i <= j``, that are computed (the matrix is symmetric)."""
    return [(i, j) for i in range(n) for j in range(i, n)] if within_model else [(0, j) for j in range(1, n)]


def _assemble(
    sizes: list[int],
    pairs: list[tuple[int, int]],
    block: Callable[[int, int], torch.Tensor],
    dead: torch.Tensor,
    mean: torch.Tensor,
) -> torch.Tensor:
    """The stacked correlation from its upper blocks: mirrored, clamped to [-1, 1], constant rows
    set to 0 (1 against constant rows of the same value), diagonal 1."""
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    corr = dead.new_zeros(sum(sizes), sum(sizes), dtype=mean.dtype)
    for i, j in pairs:
        b = block(i, j)
        corr[starts[i] : starts[i] + sizes[i], starts[j] : starts[j] + sizes[j]] = b
        if j != i:
            corr[starts[j] : starts[j] + sizes[j], starts[i] : starts[i] + sizes[i]] = b.T
    corr.clamp_(-1.0, 1.0)
    if dead.any():
        corr[dead] = 0.0
        corr[:, dead] = 0.0
        equal_constants(corr, dead, mean)
    corr.fill_diagonal_(1.0)
    return corr


def stacked_correlation(rows: list[NormalRows], within_model: bool = True) -> torch.Tensor:
    """Pearson correlation of the stacked rows of N models.

    Constant rows correlate 0 with the others and 1 with constant rows of the same value.
    ``within_model=False`` computes only the blocks between model 0 and each other model (what a
    permutation matcher reads: :attr:`MatchingStrategy.uses_within_model`); the other blocks are 0.
    """
    return _assemble(
        [r.x.shape[0] for r in rows],
        _pairs(len(rows), within_model),
        lambda i, j: rows[i].x @ rows[j].x.T,
        torch.cat([r.dead for r in rows]),
        torch.cat([r.mean for r in rows]),
    )


def streamed_correlation(pieces: list[Iterator[torch.Tensor]], within_model: bool = True) -> torch.Tensor:
    """:func:`stacked_correlation` of N models whose features come as aligned pieces (one iterator
    per model, the k-th pieces of all models covering the same features), never concatenated.

    Row means and the centred cross products ``sum_f (x_if - mean_i)(x_jf - mean_j)`` are merged
    piece by piece with Chan et al.'s parallel update (each piece centred on its own mean, as
    :class:`~mudsc_graph.merging.statistics.CorrelationAccumulator`), so large row means cost no precision.
    """
    n_models, pairs = len(pieces), _pairs(len(pieces), within_model)
    count = 0
    mean: list[torch.Tensor] = []
    sq: list[torch.Tensor] = []
    cross: dict[tuple[int, int], torch.Tensor] = {}
    for batch in zip(*pieces, strict=True):
        nb = batch[0].shape[1]
        if nb == 0:
            continue
        mb = [p.mean(dim=1) for p in batch]
        xc = [p - m[:, None] for p, m in zip(batch, mb)]
        if not count:
            mean, sq = mb, [(x * x).sum(dim=1) for x in xc]
            cross = {(i, j): xc[i] @ xc[j].T for i, j in pairs}
            count = nb
            continue
        total = count + nb
        w = count * nb / total
        delta = [m - mu for m, mu in zip(mb, mean)]
        for (i, j), c in cross.items():
            c.addmm_(xc[i], xc[j].T).addr_(delta[i], delta[j], alpha=w)
        for i in range(n_models):
            sq[i].add_((xc[i] * xc[i]).sum(dim=1)).add_(delta[i] * delta[i], alpha=w)
            mean[i] = mean[i] + delta[i] * (nb / total)
        count = total
    if not count:
        raise ValueError("no features to compare")
    norm = [s.clamp_min(0).sqrt() for s in sq]
    dead = [nm <= 1e-12 * (1 + m.abs()) for nm, m in zip(norm, mean)]
    inv = [1.0 / nm.clamp_min(1e-30) for nm in norm]
    return _assemble(
        [m.shape[0] for m in mean],
        pairs,
        lambda i, j: cross[(i, j)].mul_(inv[i][:, None]).mul_(inv[j][None, :]),
        torch.cat(dead),
        torch.cat(mean),
    )

