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

Time: a unit is solved again only when its similarity key is not among the last
:data:`MEMO_PER_UNIT` it was solved on (else that matching is reused), and consecutive units of a
sweep that do not neighbour each other have their assignments solved side by side on ``threads``
threads (for a matcher that says it is ``thread_safe``), which changes no result.

Memory: a similarity is built only when its unit must be solved again, and is not kept. Each model's normalised weight features
of a narrow group are cached once they were built twice on the same neighbours' blocks and never on different ones (so
model 0's are reused for the whole run under a permutation matcher, and features that change are not held: rebuilding
them costs about ``1/units`` of the similarity's product);
a group whose features would exceed :data:`STREAM_NUMEL` floats per model (the residual stream of
a transformer) is streamed tensor by tensor instead (:func:`~mudsc_graph.merging.similarity.streamed_correlation`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from ..plugin.records import MatchingStrategy
from ..spec.merge_spec import MergeSpec
from .progress import NullReporter, Reporter
from .statistics import ActivationStatistics, Correlations
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

MEMO_PER_UNIT = 4
"""Matchings remembered per unit, by similarity key: a sweep that comes back to a state it has
already matched (after a sweep without improvement restores the best) does not solve it again."""


@dataclass
class MatchOutcome:
    matchings: dict[int, Any]
    history: list[float] = field(default_factory=list)
    sweeps: int = 0
    weight_sims_built: int = 0
    weight_macs: float = 0.0  # multiply-adds of the weight similarities' products (cost accounting)


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
        matcher: MatchingStrategy,
        *,
        act: ActivationStatistics | Mapping[int, torch.Tensor] | None,
        alpha: float,
        options: Mapping[str, Any] | None = None,
        reporter: Reporter | None = None,
        threads: int = 1,
        widths: Mapping[int, int] | None = None,
        copies: Mapping[int, list] | None = None,
        own: frozenset[str] = frozenset(),
    ) -> None:
        """``matcher``: the strategy record (its ``match``, whether it reads within-model blocks,
        needs covariances); ``act``: the activation statistics (a plain ``{group id: correlation}`` is
        read as :class:`Correlations` without scales); ``options``: its parameters' values
        (:meth:`MatchingStrategy.options`); ``widths``: ``{group id: merged units}`` of the groups
        merged wider than one model (a width budget; passed to ``match`` as ``merged=``); ``copies``:
        per group of models of different widths, which stacked units are copies (``match(copies=)``);
        ``own``: tensors each model keeps as its own (output layers of other label spaces), left out
        of the weight features."""
        if act is not None and not isinstance(act, ActivationStatistics):
            act = Correlations(act)
        self.act: ActivationStatistics | None = act
        self.spec, self.states, self.match, self.alpha = spec, states, matcher.match, alpha
        self.options = dict(options or {})
        self.reporter = reporter or NullReporter()
        self.n = len(states)
        self.units = couplings(spec, gids)
        self.occs = {g: [o for o in occurrences(spec, g) if o.name not in own] for g in gids}
        self.nbrs = {g: neighbours(spec, g) for g in gids}
        self.within_model = matcher.uses_within_model
        self.covariances = matcher.needs_covariances  # pass match(..., covariances=[...])
        self.stream = {g: feature_numel(spec, states[0], self.occs[g]) > STREAM_NUMEL for g in gids}
        self._rows: dict[tuple[int, int], tuple[tuple, Any]] = {}  # (group, model) -> (row key, rows or None)
        self._changing: set[tuple[int, int]] = set()  # (group, model) built on different neighbours: never cached
        self.built = 0
        self.macs = 0.0  # multiply-adds of the weight similarities built (their cross products)
        self._dims: dict[int, int] = {}  # group -> feature columns per model, of its last build
        self.workers = max(1, threads)  # assignments solved side by side (see _solve)
        self.widths = dict(widths or {})
        self.copies = dict(copies or {})

    # -- similarities ----------------------------------------------------------------------------
    def _row_key(self, gid: int, i: int, matchings: Mapping[int, Any]) -> tuple:
        """Fingerprint of what model ``i``'s features of ``gid`` depend on: its neighbours' blocks."""
        return tuple(sorted((nb, _signature(matchings.get(nb), i)) for nb in self.nbrs[gid]))

    def _blocks(self, i: int, matchings: Mapping[int, Any]) -> tuple[Callable, Callable]:
        """(merge block, transposed unmerge block) of model ``i`` per group, ``None`` if unmatched."""

        def merge_of(g: int) -> Any:
            m = matchings.get(g)
            return None if m is None else m.merge_map(i)

        def unmerge_t_of(g: int) -> Any:
            m = matchings.get(g)
            return None if m is None else m.read_map(i)

        return merge_of, unmerge_t_of

    def _model_rows(self, gid: int, i: int, matchings: Mapping[int, Any]) -> Any:
        """Model ``i``'s normalised weight features of ``gid``; cached once built twice on the same
        neighbours' model-``i`` blocks and never on others (see the module docstring)."""
        key = self._row_key(gid, i, matchings)
        hit = self._rows.get((gid, i))
        if hit is not None and hit[0] == key and hit[1] is not None:
            return hit[1]
        rows = normal_rows(weight_features(self.spec, self.states[i], gid, *self._blocks(i, matchings), self.occs[gid]))
        if (gid, i) in self._changing:
            return rows
        if hit is None or hit[0] == key:  # first build: the key only; the same key again: the rows too
            self._rows[(gid, i)] = (key, None if hit is None else rows)
        else:  # its neighbours' blocks change: holding its rows would cost memory and save little
            del self._rows[(gid, i)]
            self._changing.add((gid, i))
        return rows

    def weight_key(self, gid: int, matchings: Mapping[int, Any]) -> tuple:
        """Equal keys mean equal weight similarities of ``gid``."""
        return tuple(self._row_key(gid, i, matchings) for i in range(self.n))

    def weight_similarity(self, gid: int, matchings: Mapping[int, Any]) -> tuple[tuple, torch.Tensor]:
        """(key, S_weight), built anew (see the module docstring for what is cached)."""
        self.built += 1
        key = self.weight_key(gid, matchings)
        if self.stream[gid]:
            columns: list[int] = []
            pieces = [
                feature_pieces(self.spec, self.states[i], gid, *self._blocks(i, matchings), self.occs[gid])
                for i in range(self.n)
            ]
            pieces[0] = _counted(pieces[0], columns)
            sim = streamed_correlation(pieces, within_model=self.within_model)
            self._dims[gid] = sum(columns)
        else:
            rows = [self._model_rows(gid, i, matchings) for i in range(self.n)]
            self._dims[gid] = rows[0].x.shape[1]
            sim = stacked_correlation(rows, within_model=self.within_model)
        self.macs += self._macs(gid)
        return key, sim

    def _macs(self, gid: int) -> float:
        """Multiply-adds of one weight similarity of ``gid``: its computed ``O x O`` blocks times the
        feature columns (a streamed group's counted as its pieces pass)."""
        blocks = self.n * (self.n + 1) // 2 if self.within_model else self.n - 1
        return float(blocks * self.spec.groups[gid].size ** 2 * self._dims[gid])

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
        act = self.act[gid]
        act = act.mul_(1.0 - alpha) if self.act.fresh(gid) else act * (1.0 - alpha)
        return w.mul_(alpha).add_(act)  # w is fresh: scaled in place

    def covariance(self, gid: int) -> torch.Tensor | None:
        """``gid``'s activation covariance (:meth:`Correlations.covariance
        <mudsc_graph.merging.statistics.Correlations.covariance>`), or ``None`` without statistics."""
        return self.act.covariance(gid) if self.act is not None else None

    def _match_unit(self, unit: tuple[int, ...], sims: list[torch.Tensor]) -> list[Any]:
        blocks = self.spec.groups[unit[0]].blocks
        extra: dict[str, Any] = {}
        if any(g in self.widths or g in self.copies for g in unit):
            extra["merged"] = [self.widths.get(g, self.spec.groups[g].size) for g in unit]
        if any(g in self.copies for g in unit):
            extra["copies"] = [self.copies.get(g) for g in unit]
        if self.covariances:  # built per call, not kept (as the similarities)
            extra["covariances"] = [self.covariance(g) for g in unit]
        return self.match(sims, self.n, blocks, **extra, **self.options)

    # -- the scheme --------------------------------------------------------------------------------
    def _solve(self, jobs: list[tuple[tuple[int, ...], Callable[[], list[torch.Tensor]]]]) -> list[list[Any]]:
        """Solve independent units (their similarities built one after the other, on torch's
        threads), the assignments side by side on a thread pool (scipy's and numpy's loops release
        the GIL): the same results as one by one, in the same order."""
        work = [(unit, build()) for unit, build in jobs]
        if len(work) <= 1 or self.workers <= 1:
            return [self._match_unit(unit, sims) for unit, sims in work]
        with ThreadPoolExecutor(min(len(work), self.workers)) as pool:
            return list(pool.map(lambda job: self._match_unit(*job), work))

    def _batches(self, order: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """``order`` cut into runs of consecutive units that are not neighbours of one another (so
        solving them together gives what solving them in turn gives), at most ``workers`` long."""
        out: list[list[tuple[int, ...]]] = []
        touched: set[int] = set()
        for unit in order:
            near = {nb for g in unit for nb in self.nbrs[g]} | set(unit)
            if out and len(out[-1]) < self.workers and not (near & touched):
                out[-1].append(unit)
                touched |= near
            else:
                out.append([unit])
                touched = set(near)
        return out

    def initial(self, identity: Callable[[int], Any]) -> dict[int, Any]:
        matchings: dict[int, Any] = {}
        with_data = [u for u in self.units if self.act is not None and all(g in self.act for g in u)]
        for start in range(0, len(with_data), max(self.workers, 1)):
            batch = with_data[start:start + max(self.workers, 1)]
            jobs = [(unit, lambda unit=unit: [self.act[g] for g in unit]) for unit in batch]
            for unit, result in zip(batch, self._solve(jobs)):
                matchings.update(zip(unit, result))
        for unit in self.units:
            if unit not in with_data:
                matchings.update((gid, identity(gid)) for gid in unit)
        return matchings

    def _sweep(self, order: list[tuple[int, ...]], matchings: dict[int, Any], memo: dict) -> list[float]:
        """One pass over the units in ``order``, each matched again unless its similarity is one it
        was already matched on (``memo``: the last few per unit); returns the matched scores."""
        scores: list[float] = []
        for batch in self._batches(order):
            keys = {unit: tuple(self.key(g, matchings) for g in unit) for unit in batch}
            todo = [unit for unit in batch if keys[unit] not in memo.setdefault(unit, {})]
            jobs = [(unit, lambda unit=unit: [self.similarity(g, matchings) for g in unit]) for unit in todo]
            for unit, result in zip(todo, self._solve(jobs)):
                seen = memo[unit]
                seen[keys[unit]] = result
                if len(seen) > MEMO_PER_UNIT:
                    seen.pop(next(iter(seen)))
            for unit in batch:
                for gid, new in zip(unit, memo[unit][keys[unit]]):
                    matchings[gid] = new
                    scores.append(new.score)
        return scores

    def run(self, identity: Callable[[int], Any], *, max_iter: int = 100, patience: int = 5, seed: int = 0) -> MatchOutcome:
        matchings = self.initial(identity)
        if all(self.alpha_of(g) <= 0.0 for g in matchings) or not self.units:  # S fixed: one matching is final
            score = _mean([m.score for m in matchings.values()])
            return MatchOutcome(matchings, [score] if matchings else [], 0, 0)
        gen = torch.Generator().manual_seed(seed)
        best, best_score, misses, history = dict(matchings), float("-inf"), 0, []
        memo: dict[tuple[int, ...], dict[tuple, list[Any]]] = {}  # unit -> {similarity key: its matchings}
        self.reporter.start("matching sweeps", total=max_iter)
        sweep = 0
        for sweep in range(1, max_iter + 1):
            order = [self.units[k] for k in torch.randperm(len(self.units), generator=gen).tolist()]
            score = _mean(self._sweep(order, matchings, memo))
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
        return MatchOutcome(best, history, sweep, self.built, self.macs)


def _counted(pieces: Iterator[torch.Tensor], columns: list[int]) -> Iterator[torch.Tensor]:
    """``pieces`` as they are, their columns appended to ``columns`` as they pass."""
    for p in pieces:
        columns.append(p.shape[1])
        yield p


def _signature(m: Any, i: int) -> Any:
    """A cheap fingerprint of model ``i``'s blocks of a matching (``None``: not matched)."""
    return None if m is None else m.signature(i)


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
