"""The iterative dual-space matching scheme of MuDSC.

Every group starts from its activation-only matching (or the identity when there is no data).
Then sweeps visit the groups in a seeded random order; for each group the weight-space similarity
is rebuilt with the neighbours' current matchings (only when a neighbour changed since it was last
built), mixed with the fixed activation similarity, ``S = alpha * S_weight + (1 - alpha) * S_act``,
and the group is matched again. After each sweep the score ``L`` (mean over groups of the mean
matched similarity) is recorded; a sweep that does not improve ``L`` counts a miss and the best
matchings so far are restored. The scheme stops after ``tol`` misses or ``max_iter`` sweeps.

Block-coupled groups (Q/K and V/O of an attention layer) are matched together, so they agree on
the block pairing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .groups import MergeSpec
from .report import NullReporter, Reporter
from .similarity import neighbours, occurrences, row_correlation, weight_features


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
    ) -> None:
        self.spec, self.states, self.match, self.act, self.alpha = spec, states, match, act, alpha
        self.options = dict(options or {})
        self.reporter = reporter or NullReporter()
        self.n = len(states)
        self.units = couplings(spec, gids)
        self.occs = {g: occurrences(spec, g) for g in gids}
        self.nbrs = {g: neighbours(spec, g) for g in gids}
        self.version: dict[int, int] = {g: 0 for g in gids}
        self._cache: dict[int, tuple[tuple, torch.Tensor]] = {}
        self.built = 0

    # -- similarities ----------------------------------------------------------------------------
    def weight_similarity(self, gid: int, matchings: Mapping[int, Any]) -> torch.Tensor:
        key = tuple(sorted((nb, self.version.get(nb, -1)) for nb in self.nbrs[gid]))
        hit = self._cache.get(gid)
        if hit is not None and hit[0] == key:
            return hit[1]
        feats = []
        for i, state in enumerate(self.states):
            def merge_of(g, i=i):
                m = matchings.get(g)
                return None if m is None else m.merge_block(i)

            def unmerge_t_of(g, i=i):
                m = matchings.get(g)
                return None if m is None else m.unmerge_block(i).T

            feats.append(weight_features(self.spec, state, gid, merge_of, unmerge_t_of, self.occs[gid]))
        sim = row_correlation(torch.cat(feats, dim=0))
        self._cache[gid] = (key, sim)
        self.built += 1
        return sim

    def similarity(self, gid: int, matchings: Mapping[int, Any]) -> torch.Tensor:
        if self.alpha <= 0.0:
            return self.act[gid]
        w = self.weight_similarity(gid, matchings)
        if self.act is None or self.alpha >= 1.0:
            return w
        return self.alpha * w + (1.0 - self.alpha) * self.act[gid]

    def _match_unit(self, unit: tuple[int, ...], sims: list[torch.Tensor]) -> list[Any]:
        blocks = self.spec.groups[unit[0]].blocks
        return self.match(sims, self.n, blocks, **self.options)

    # -- the scheme --------------------------------------------------------------------------------
    def initial(self, identity: Callable[[int], Any]) -> dict[int, Any]:
        matchings: dict[int, Any] = {}
        for unit in self.units:
            if self.act is not None:
                for gid, m in zip(unit, self._match_unit(unit, [self.act[g] for g in unit])):
                    matchings[gid] = m
            else:
                for gid in unit:
                    matchings[gid] = identity(gid)
        return matchings

    def run(self, identity: Callable[[int], Any], *, max_iter: int = 100, tol: int = 5, seed: int = 0) -> MatchOutcome:
        matchings = self.initial(identity)
        if self.alpha <= 0.0 or not self.units:  # activations only: S is fixed, one matching is final
            score = _mean([m.score for m in matchings.values()])
            return MatchOutcome(matchings, [score] if matchings else [], 0, 0)
        gen = torch.Generator().manual_seed(seed)
        best, best_score, misses, history = dict(matchings), float("-inf"), 0, []
        self.reporter.start("matching sweeps", total=max_iter)
        sweep = 0
        for sweep in range(1, max_iter + 1):
            scores = []
            for k in torch.randperm(len(self.units), generator=gen).tolist():
                unit = self.units[k]
                sims = [self.similarity(g, matchings) for g in unit]
                for gid, new in zip(unit, self._match_unit(unit, sims)):
                    if not _same(new, matchings[gid]):
                        self.version[gid] += 1
                    matchings[gid] = new
                    scores.append(new.score)
            score = _mean(scores)
            history.append(score)
            self.reporter.advance(1, score=score)
            if score > best_score + 1e-9:
                best, best_score, misses = dict(matchings), score, 0
            else:
                misses += 1
                for gid, m in best.items():
                    if matchings[gid] is not m:
                        matchings[gid] = m
                        self.version[gid] += 1
                if misses >= tol:
                    break
        self.reporter.end()
        return MatchOutcome(best, history, sweep, self.built)


def _same(a: Any, b: Any) -> bool:
    return a.unmerge.shape == b.unmerge.shape and torch.equal(a.unmerge, b.unmerge) and torch.equal(a.merge, b.merge)


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
