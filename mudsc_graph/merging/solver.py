"""The iterative dual-space matching scheme of MuDSC.

Every group starts from its activation-only matching (or the identity when there is no data).
Then sweeps visit the groups in a seeded random order; for each group the weight-space similarity
is rebuilt with the neighbours' current matchings (only when a neighbour changed since it was last
built), mixed with the fixed activation similarity, ``S = alpha * S_weight + (1 - alpha) * S_act``,
and the group is matched again. After each sweep the score ``L`` (mean over groups of the mean
matched similarity) is recorded; a sweep that does not improve ``L`` counts a miss and the best
matchings so far are restored. The scheme stops after ``patience`` sweeps without improvement or ``max_iter`` sweeps.

Block-coupled groups (Q/K and V/O of an attention layer) are matched together, so they agree on
the block pairing.

Memory: a similarity is built only when its unit must be solved again (a unit whose similarity key
did not change reuses its last matching), and is not kept. Each model's normalised weight features
are cached for narrow groups (model 0's are reused for the whole run under a permutation matcher);
a group whose features would exceed :data:`STREAM_NUMEL` floats per model (the residual stream of
a transformer) is streamed tensor by tensor instead (:func:`~mudsc_graph.merging.similarity.streamed_correlation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..spec.merge_spec import MergeSpec
from .progress import NullReporter, Reporter
from .similarity import (
    feature_numel,
    feature_pieces,
    neighbours,
    normal_rows,
    occurrences,
    stacked_correlation,
    streamed_correlation,
    weight_features,
)

STREAM_NUMEL = 2**24
"""Above this many feature floats per model (64 MiB), a group's weight similarity is streamed."""


@dataclass
class MatchOutcome:
    matchings: dict[int, Any]
    history: list[float] = field(default_factory=list)
    sweeps: int = 0
    weight_sims_built: int = 0


def couplings(spec: MergeSpec, gids: list[int]) -> list[tuple[int, ...]]:
    """The matching units: single groups, and block groups that share a block permutation."""
    wanted, seen, out = set(gids), set(), []
    for gid in gids:
        if gid in seen:
            continue
        unit = tuple(sorted({gid, *(c for c in spec.groups[gid].coupled if c in wanted)}))
        seen.update(unit)
        out.append(unit)
    return out


class DualSpaceSolver:
    """Matches every group of ``gids`` with the dual-space similarity (see the module docstring)."""

    def __init__(
        self,
        spec: MergeSpec,
        states: list[Mapping[str, torch.Tensor]],
        gids: list[int],
        match: Callable[..., list],
        *,
        act: Mapping[int, torch.Tensor] | None,
        alpha: float,
        options: Mapping[str, Any] | None = None,
        reporter: Reporter | None = None,
        within_model: bool = True,
        covariances: bool = False,
    ) -> None:
        self.spec, self.states, self.match, self.act, self.alpha = spec, states, match, act, alpha
        self.options = dict(options or {})
        self.reporter = reporter or NullReporter()
        self.n = len(states)
        self.units = couplings(spec, gids)
        self.occs = {g: occurrences(spec, g) for g in gids}
        self.nbrs = {g: neighbours(spec, g) for g in gids}
        self.within_model = within_model
        self.covariances = covariances  # pass match(..., covariances=[...]) (MatchingStrategy.needs_covariances)
        self.stream = {g: feature_numel(spec, states[0], self.occs[g]) > STREAM_NUMEL for g in gids}
        self._rows: dict[tuple[int, int], tuple[tuple, Any]] = {}
        self.built = 0

    # -- similarities ----------------------------------------------------------------------------
    def _row_key(self, gid: int, i: int, matchings: Mapping[int, Any]) -> tuple:
        """Fingerprint of what model ``i``'s features of ``gid`` depend on: its neighbours' blocks."""
        return tuple(sorted((nb, _signature(matchings.get(nb), i)) for nb in self.nbrs[gid]))

    def _blocks(self, i: int, matchings: Mapping[int, Any]) -> tuple[Callable, Callable]:
        """(merge block, transposed unmerge block) of model ``i`` per group, ``None`` if unmatched."""

        def merge_of(g: int) -> torch.Tensor | None:
            m = matchings.get(g)
            return None if m is None else m.merge_block(i)

        def unmerge_t_of(g: int) -> torch.Tensor | None:
            m = matchings.get(g)
            return None if m is None else m.unmerge_block(i).T

        return merge_of, unmerge_t_of

    def _model_rows(self, gid: int, i: int, matchings: Mapping[int, Any]) -> Any:
        """Model ``i``'s normalised weight features of ``gid``, rebuilt only when a neighbour's
        model-``i`` blocks changed (model 0's never change under a permutation matcher)."""
        key = self._row_key(gid, i, matchings)
        hit = self._rows.get((gid, i))
        if hit is not None and hit[0] == key:
            return hit[1]
        rows = normal_rows(weight_features(self.spec, self.states[i], gid, *self._blocks(i, matchings), self.occs[gid]))
        self._rows[(gid, i)] = (key, rows)
        return rows

    def weight_key(self, gid: int, matchings: Mapping[int, Any]) -> tuple:
        """Equal keys mean equal weight similarities of ``gid``."""
        return tuple(self._row_key(gid, i, matchings) for i in range(self.n))

    def weight_similarity(self, gid: int, matchings: Mapping[int, Any]) -> tuple[tuple, torch.Tensor]:
        """(key, S_weight), built anew (see the module docstring for what is cached)."""
        self.built += 1
        key = self.weight_key(gid, matchings)
        if self.stream[gid]:
            pieces = [
                feature_pieces(self.spec, self.states[i], gid, *self._blocks(i, matchings), self.occs[gid])
                for i in range(self.n)
            ]
            return key, streamed_correlation(pieces, within_model=self.within_model)
        rows = [self._model_rows(gid, i, matchings) for i in range(self.n)]
        return key, stacked_correlation(rows, within_model=self.within_model)

    def alpha_of(self, gid: int) -> float:
        """``alpha``, or 1 (weights only) for a group whose activations could not be read."""
        return self.alpha if self.act is not None and gid in self.act else 1.0

    def key(self, gid: int, matchings: Mapping[int, Any]) -> tuple:
        """Equal keys mean equal :meth:`similarity` of ``gid``."""
        return () if self.alpha_of(gid) <= 0.0 else self.weight_key(gid, matchings)

    def similarity(self, gid: int, matchings: Mapping[int, Any]) -> torch.Tensor:
        """``S = alpha * S_weight + (1 - alpha) * S_act``."""
        alpha = self.alpha_of(gid)
        if alpha <= 0.0:
            return self.act[gid]
        w = self.weight_similarity(gid, matchings)[1]
        if alpha >= 1.0:
            return w
        return w.mul_(alpha).add_(self.act[gid] * (1.0 - alpha))  # w is fresh: scaled in place

    def covariance(self, gid: int) -> torch.Tensor | None:
        """``gid``'s activation covariance (:meth:`Correlations.covariance
        <mudsc_graph.merging.statistics.Correlations.covariance>`), or ``None`` without statistics."""
        of = getattr(self.act, "covariance", None)  # a plain {gid: correlation} has no scales
        return of(gid) if of is not None else None

    def _match_unit(self, unit: tuple[int, ...], sims: list[torch.Tensor]) -> list[Any]:
        blocks = self.spec.groups[unit[0]].blocks
        if self.covariances:  # built per call, not kept (as the similarities)
            return self.match(sims, self.n, blocks, covariances=[self.covariance(g) for g in unit], **self.options)
        return self.match(sims, self.n, blocks, **self.options)

    # -- the scheme --------------------------------------------------------------------------------
    def initial(self, identity: Callable[[int], Any]) -> dict[int, Any]:
        matchings: dict[int, Any] = {}
        for unit in self.units:
            if self.act is not None and all(g in self.act for g in unit):
                for gid, m in zip(unit, self._match_unit(unit, [self.act[g] for g in unit])):
                    matchings[gid] = m
            else:
                for gid in unit:
                    matchings[gid] = identity(gid)
        return matchings

    def run(self, identity: Callable[[int], Any], *, max_iter: int = 100, patience: int = 5, seed: int = 0) -> MatchOutcome:
        matchings = self.initial(identity)
        if all(self.alpha_of(g) <= 0.0 for g in matchings) or not self.units:  # S fixed: one matching is final
            score = _mean([m.score for m in matchings.values()])
            return MatchOutcome(matchings, [score] if matchings else [], 0, 0)
        gen = torch.Generator().manual_seed(seed)
        best, best_score, misses, history = dict(matchings), float("-inf"), 0, []
        last: dict[tuple[int, ...], tuple[tuple, list[Any]]] = {}  # unit -> (similarity key, its matchings)
        self.reporter.start("matching sweeps", total=max_iter)
        sweep = 0
        for sweep in range(1, max_iter + 1):
            scores = []
            for k in torch.randperm(len(self.units), generator=gen).tolist():
                unit = self.units[k]
                key = tuple(self.key(g, matchings) for g in unit)
                hit = last.get(unit)
                if hit is not None and hit[0] == key:  # same similarity: same matching, no need to solve
                    result = hit[1]
                else:
                    result = self._match_unit(unit, [self.similarity(g, matchings) for g in unit])
                    last[unit] = (key, result)
                for gid, new in zip(unit, result):
                    matchings[gid] = new
                    scores.append(new.score)
            score = _mean(scores)
            history.append(score)
            self.reporter.advance(1, score=score)
            if score > best_score + 1e-9:
                best, best_score, misses = dict(matchings), score, 0
            else:
                misses += 1
                matchings.update(best)
                if misses >= patience:
                    break
        self.reporter.end()
        return MatchOutcome(best, history, sweep, self.built)


def _signature(m: Any, i: int) -> Any:
    """A cheap fingerprint of model ``i``'s blocks of a matching (``None``: not matched)."""
    if m is None:
        return None
    cache = m.__dict__.setdefault("_signatures", {})
    if i not in cache:
        block = m.merge_block(i)
        cache[i] = hash(block.detach().cpu().numpy().tobytes()) ^ hash(m.unmerge_block(i).detach().cpu().numpy().tobytes())
    return cache[i]


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
