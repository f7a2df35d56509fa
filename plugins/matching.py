"""Built-in matching strategies, registered through the same ``mudsc_matching_strategies`` hook as
any plugin: ``identity`` (average in each model's order), ``align`` (a permutation per model, Git
Re-Basin / MuDSC's permutation mode) and ``zip`` (ZipIt!'s greedy fusion, MuDSC's zip mode).
Each handles ``blocks > 1`` (heads, GroupNorm groups) with its block-structured variant.
"""

from __future__ import annotations

from mudsc_graph.hookspecs import hookimpl
from mudsc_graph.matching import match_align, match_identity, match_zip
from mudsc_graph.records import MatchingStrategy


@hookimpl
def mudsc_matching_strategies() -> list[MatchingStrategy]:
    return [
        MatchingStrategy("identity", match_identity, description="Keep every model's unit order and average."),
        MatchingStrategy("align", match_align,
                         description="One permutation per model by linear assignment against model 0 (weight matching).", uses_within_model=False),
        MatchingStrategy("zip", match_zip,
                         description="ZipIt!: greedily fuse the most similar units, within a model too (options a=0.5, b=1)."),
    ]
