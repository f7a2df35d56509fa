"""Matching: turn a unit similarity of N models into merge / unmerge matrices.

A similarity ``S`` of one group is ``(N*O) x (N*O)``: the O units of model 0, then model 1, ...
A matching says how the ``N*O`` stacked units become ``O`` merged units::

    stacked features f (N*O)  --merge (O x N*O)-->  merged features (O)
    merged features (O)       --unmerge (N*O x O)-> model i's features, rows i*O:(i+1)*O

    e.g. N = 2, O = 2, model 1 = model 0 with its two units swapped (align):
        merge   = [[.5, 0, 0, .5],      unmerge = [[1, 0],
                   [0, .5, .5, 0]]                 [0, 1],
                                                   [0, 1],
                                                   [1, 0]]

Every built-in strategy assigns each stacked unit to exactly one merged unit (a "label"), so
``unmerge`` is 0/1 with one-hot rows and ``merge`` averages the units of each merged unit
(``merge = (U / colsum(U))^T``). Strategies (registered by ``mudsc_plugins.matching``):

- ``identity``: keep every model's order and average (:func:`identity_matching`);
- ``align``: a permutation per model, by linear assignment against model 0 (:mod:`.align`);
- ``zip``: ZipIt!'s greedy pair fusion, within-model fusions allowed (:mod:`.zipit`);
- with ``blocks > 1`` (heads, GroupNorm groups) the group variants of :mod:`.blocks`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..assignment import Assignment
from .align import align_labels
from .blocks import group_align_labels, group_zip_copies, group_zip_labels
from .zipit import zip_labels


class Matching:
    """Merge / unmerge matrices of one group of ``n_models`` models (see the module docstring).

    ``merge`` is ``(O_m, N*O)``: merged features = ``merge @`` stacked features. ``unmerge`` is
    ``(N*O, O_m)``: model i's features ~ ``unmerge[i*O:(i+1)*O] @`` merged features. ``score`` is
    the mean similarity of what the strategy matched (used to compare sweeps).

    ``Matching(merge, unmerge, score, n_models)`` holds dense matrices (any soft or signed map);
    :meth:`from_labels` holds only the label of every stacked unit, the form of every built-in
    strategy: ``merge``/``unmerge`` are then built on access, and the merge uses the sparse
    :meth:`merge_map`/:meth:`read_map` (:class:`~mudsc_graph.merging.assignment.Assignment`), so
    a group of ``O`` units across two models costs ``2 * O`` labels instead of two dense ``O x 2O`` matrices.
    """

    def __init__(self, merge: torch.Tensor, unmerge: torch.Tensor, score: float, n_models: int) -> None:
        self._merge, self._unmerge, self.labels = merge, unmerge, None
        self._merged_units = merge.shape[0]
        self.score, self.n_models = score, n_models

    @classmethod
    def from_labels(cls, labels: torch.Tensor, n_models: int, merged_units: int, score: float,
                    share: torch.Tensor | None = None) -> "Matching":
        """The matching in which stacked unit u belongs to merged unit ``labels[u]`` (cluster
        average; ``share``: each stacked unit's weight in its merged unit instead, summing to 1 per
        merged unit, e.g. a unit and its Net2Net copies counted as one)."""
        m = cls.__new__(cls)
        m._merge = m._unmerge = None
        m.labels, m._merged_units = labels.long(), int(merged_units)
        m.score, m.n_models = float(score), int(n_models)
        if share is None:
            counts = torch.bincount(m.labels, minlength=m._merged_units).float()
            share = (1.0 / counts.clamp_min(1.0))[m.labels]
        m._share = share.float()  # merge weight of every stacked unit
        return m

    def __repr__(self) -> str:
        kind = "labels" if self.labels is not None else "dense"
        return f"Matching({kind}, units={self.units}, merged_units={self.merged_units}, n_models={self.n_models}, score={self.score:.4f})"

    @property
    def merge(self) -> torch.Tensor:
        return self._merge if self.labels is None else self._labels_map(slice(None), self._share).dense()

    @property
    def unmerge(self) -> torch.Tensor:
        return self._unmerge if self.labels is None else self._labels_map(slice(None), torch.ones_like(self._share)).dense().T

    @property
    def units(self) -> int:
        """Units of one model (O)."""
        n = self.labels.numel() if self.labels is not None else self._merge.shape[1]
        return n // self.n_models

    @property
    def merged_units(self) -> int:
        """Units of the merged model (O_m)."""
        return self._merged_units

    def _rows(self, i: int) -> slice:
        o = self.units
        return slice(i * o, (i + 1) * o)

    def _labels_map(self, rows: slice, value: torch.Tensor, unit: bool = False) -> Assignment:
        index = self.labels[rows]
        inverses = self.__dict__.setdefault("_inverses", {})
        key = (rows.start, rows.stop)
        if key not in inverses:  # an align block is a permutation: applied by one gather
            inverses[key] = Assignment.permutation_inverse(index, self._merged_units)
        return Assignment(index, value[rows], self._merged_units, inverses[key], unit)

    def merge_block(self, i: int) -> torch.Tensor:
        """Model i's block of ``merge``, ``(O_m, O)``."""
        return self.merge_map(i).dense() if self.labels is not None else self._merge[:, self._rows(i)]

    def unmerge_block(self, i: int) -> torch.Tensor:
        """Model i's block of ``unmerge``, ``(O, O_m)``."""
        return self.read_map(i).dense().T if self.labels is not None else self._unmerge[self._rows(i)]

    def merge_map(self, i: int) -> "torch.Tensor | Assignment":
        """:meth:`merge_block` ``i``, as an :class:`Assignment` for a labels matching."""
        return self._labels_map(self._rows(i), self._share) if self.labels is not None else self.merge_block(i)

    def read_map(self, i: int) -> "torch.Tensor | Assignment":
        """``unmerge_block(i).T`` (how a consumer of merged units reads model i's), as an
        :class:`Assignment` for a labels matching."""
        if self.labels is None:
            return self.unmerge_block(i).T
        return self._labels_map(self._rows(i), torch.ones_like(self._share), unit=True)

    def signature(self, i: int) -> int:
        """A fingerprint of model i's blocks (equal blocks, equal fingerprints)."""
        cache = self.__dict__.setdefault("_signatures", {})
        if i not in cache:
            if self.labels is not None:
                parts = (self.labels[self._rows(i)], self._share[self._rows(i)])
            else:
                parts = (self.merge_block(i), self.unmerge_block(i))
            cache[i] = hash(tuple(p.detach().cpu().numpy().tobytes() for p in parts))
        return cache[i]

    def permutations(self) -> list[torch.Tensor] | None:
        """``perm[i][r]`` = the unit of model i that forms merged unit r, when every merged unit is
        exactly one unit of each model averaged (align, identity); otherwise ``None`` (zip)."""
        o, n = self.units, self.n_models
        if self.merged_units != o:
            return None
        if self.labels is not None:
            perms = []
            for i in range(n):
                lab = self.labels[self._rows(i)]
                if not bool((torch.bincount(lab, minlength=o) == 1).all()):
                    return None
                perms.append(torch.argsort(lab))
            return perms
        perms = []
        for i in range(n):
            u = self.unmerge_block(i)
            if not (((u == 0) | (u == 1)).all() and (u.sum(0) == 1).all() and (u.sum(1) == 1).all()):
                return None
            if not torch.allclose(self.merge_block(i), u.T / n):
                return None
            perms.append(u.argmax(0))
        return perms

    def to(self, device: Any) -> "Matching":
        if self.labels is not None:
            return Matching.from_labels(self.labels.to(device), self.n_models, self.merged_units, self.score, self._share.to(device))
        return Matching(self._merge.to(device), self._unmerge.to(device), self.score, self.n_models)


def matching_from_labels(labels: torch.Tensor, n_models: int, merged_units: int, score: float,
                         share: torch.Tensor | None = None) -> Matching:
    """The matching in which stacked unit u belongs to merged unit ``labels[u]`` (cluster average,
    or each unit's ``share``)."""
    return Matching.from_labels(labels, n_models, merged_units, score, share)


def identity_matching(units: int, n_models: int, device: Any = None) -> Matching:
    """Keep every model's order and average: merge = ``[I/N, ..., I/N]``, unmerge = ``[I; ...; I]``.

    Its score is 0; :func:`match_identity` scores it against a similarity."""
    labels = torch.arange(units, device=device).repeat(n_models)
    return matching_from_labels(labels, n_models, units, 0.0)


def validate_sims(sims: Sequence[torch.Tensor], n_models: int, blocks: int = 1) -> list[int]:
    """Check the similarity matrices a strategy receives; return each one's units per model (O).

    Raises ``ValueError`` with a one-line message on a bad shape, count or value."""
    if isinstance(sims, torch.Tensor):
        raise ValueError("matching expects a list of similarity matrices, got a single tensor; wrap it in a list")
    if not sims:
        raise ValueError("matching got no similarity matrices")
    if int(n_models) != n_models or n_models < 1:
        raise ValueError(f"n_models must be a positive integer, got {n_models!r}")
    if int(blocks) != blocks or blocks < 1:
        raise ValueError(f"blocks must be a positive integer, got {blocks!r}")
    units = []
    for k, s in enumerate(sims):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[0] != s.shape[1]:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"similarity {k} must be a square 2-d tensor, got {shape}")
        size = s.shape[0]
        if size == 0 or size % n_models:
            raise ValueError(f"similarity {k} has size {size}, not a positive multiple of n_models={n_models}")
        o = size // n_models
        if o % blocks:
            raise ValueError(f"similarity {k} has {o} units per model, not divisible into blocks={blocks}")
        if not s.is_floating_point():
            raise ValueError(f"similarity {k} must be a floating-point tensor, got {s.dtype}")
        if not bool(torch.isfinite(s.sum())) and not bool(torch.isfinite(s).all()):  # one cheap pass when finite
            raise ValueError(f"similarity {k} contains NaN or inf values; check the statistics it was computed from")
        units.append(o)
    return units


def _mean_cross(sim: torch.Tensor, n_models: int) -> float:
    """Mean over units r and models i >= 1 of S[model 0 unit r, model i unit r]."""
    o = sim.shape[0] // n_models
    if n_models < 2:
        return 0.0
    d = torch.stack([torch.diagonal(sim[:o, i * o:(i + 1) * o]) for i in range(1, n_models)])
    return float(d.double().mean())


def _check_options(name: str, options: dict, allowed: Sequence[str]) -> None:
    extra = sorted(set(options) - set(allowed))
    if extra:
        known = ", ".join(allowed) or "none"
        raise ValueError(f"matching strategy {name!r} got unknown options {', '.join(extra)} (accepted: {known})")


def match_identity(sims: Sequence[torch.Tensor], n_models: int, blocks: int = 1, **options: Any) -> list[Matching]:
    """The ``identity`` strategy: average in every model's own order (scored against each S)."""
    _check_options("identity", options, ())
    units = validate_sims(sims, n_models, blocks)
    out = []
    for s, o in zip(sims, units):
        m = identity_matching(o, n_models, device=s.device)
        m.score = _mean_cross(s, n_models)
        out.append(m)
    return out


def validate_widths(merged: Sequence[int] | None, units: list[int], n_models: int, narrow: bool = False) -> list[int]:
    """The merged units asked for per similarity (a width budget), each between O (``narrow``: 1)
    and N*O; ``None``: O each (one model's width)."""
    if merged is None:
        return list(units)
    merged = list(merged)
    if len(merged) != len(units):
        raise ValueError(f"merged= gives {len(merged)} widths for {len(units)} similarities")
    for m, o in zip(merged, units):
        least = 1 if narrow else o
        if isinstance(m, bool) or int(m) != m or not least <= m <= n_models * o:
            what = "one unit" if narrow else "the units of one model"
            raise ValueError(f"a merged width must be an integer between {least} and {n_models * o} ({what}, and the units of "
                             f"all {n_models} models), got {m!r}")
    return [int(m) for m in merged]


def match_align(sims: Sequence[torch.Tensor], n_models: int, blocks: int = 1, *, merged: Sequence[int] | None = None,
                **options: Any) -> list[Matching]:
    """The ``align`` strategy: a permutation per model i >= 1 that maximises its cross block with
    model 0 (Git Re-Basin / MuDSC's permutation mode); block-structured when ``blocks > 1``, with
    coupled similarities sharing one block pairing. ``merged`` (a width budget, per similarity):
    the least similar matched pairs (whole blocks) are left unmerged until each has that many units."""
    _check_options("align", options, ())
    units = validate_sims(sims, n_models, blocks)
    widths = validate_widths(merged, units, n_models)
    if blocks > 1:
        results = group_align_labels(list(sims), n_models, blocks, merged=widths)
    else:
        results = [align_labels(s, n_models, merged=m) for s, m in zip(sims, widths)]
    return [matching_from_labels(lab, n_models, m, sc) for (lab, sc), m in zip(results, widths)]


def match_zip(sims: Sequence[torch.Tensor], n_models: int, blocks: int = 1, *, a: float = 0.5, b: float = 1.0,
              merged: Sequence[int] | None = None, copies: Sequence[Sequence[torch.Tensor | None]] | None = None,
              **options: Any) -> list[Matching]:
    """The ``zip`` strategy (ZipIt!): greedy pair fusion with within-model fusions allowed up to a
    budget ``floor((to_remove // N) * b)`` per model; fused similarities become ``a * min``. With
    ``blocks > 1`` blocks are paired as in group align and zipped within each paired set.
    ``merged`` (a width budget, per similarity): the fusion stops at that many merged units, more or
    fewer than one model's (whole blocks: the weakest block pairings are left unmerged; never fewer). ``copies`` (models of different widths,
    padded to one): per similarity, per model, ``None`` or which of the model's own units each of its
    stacked units is (:func:`~.zipit.zip_labels`); ``merged`` may then be narrower than the padding."""
    _check_options("zip", options, ())
    if not (math.isfinite(a) and a >= 0) or not (math.isfinite(b) and b >= 0):
        raise ValueError(f"zip options a and b must be finite and >= 0, got a={a!r}, b={b!r}")
    units = validate_sims(sims, n_models, blocks)
    copies = list(copies) if copies is not None else [None] * len(sims)
    if any(c is not None and any(x is not None for x in c) for c in copies):
        if merged is None:
            raise ValueError("zip of models of different widths needs merged= (the merged width)")
        if blocks > 1:
            own0 = [c[0] for c in copies]
            first = [int((own0[k] == torch.arange(units[k])).sum()) if own0[k] is not None else units[k] for k in range(len(sims))]
            if list(merged) != first:
                raise ValueError("zip of blocks (heads, GroupNorm groups) whose counts differ merges into model 0's own blocks; "
                                 "a width budget on them is not supported yet")
            results = group_zip_copies(list(sims), n_models, blocks, copies, a=a, b=b)
            return [matching_from_labels(lab, n_models, int(m), sc, share) for (lab, sc, share), m in zip(results, merged)]
        results = [zip_labels(s, n_models, a=a, b=b, merged=int(m), copies=c) for s, m, c in zip(sims, merged, copies)]
        return [matching_from_labels(lab, n_models, int(m), sc, share) for (lab, sc, share), m in zip(results, merged)]
    widths = validate_widths(merged, units, n_models, narrow=blocks == 1)
    if blocks > 1:
        results = group_zip_labels(list(sims), n_models, blocks, a=a, b=b, merged=widths)
    else:
        results = [zip_labels(s, n_models, a=a, b=b, merged=m) for s, m in zip(sims, widths)]
    return [matching_from_labels(lab, n_models, m, sc) for (lab, sc, *_), m in zip(results, widths)]


__all__ = [
    "Assignment", "Matching", "identity_matching", "match_align", "match_identity", "match_zip", "matching_from_labels",
    "validate_sims", "align_labels", "zip_labels", "group_align_labels", "group_zip_labels",
]
