"""Built-in matching strategies and merge methods, registered through the same hooks as any plugin.

Strategies (``mudsc_matching_strategies``): ``identity`` (average in each model's order), ``align``
(a permutation per model, Git Re-Basin / MuDSC's permutation mode) and ``zip`` (ZipIt!'s greedy
fusion, MuDSC's zip mode); each handles ``blocks > 1`` (heads, GroupNorm groups) with its
block-structured variant. Methods (``mudsc_merge_methods``): the paper's baselines are MuDSC with a
fixed matcher and alpha.
"""

from __future__ import annotations

from mudsc_graph.plugin.hookspecs import hookimpl
from mudsc_graph.merging.matching import match_align, match_identity, match_zip
from mudsc_graph.plugin.records import MatcherParameter, MatchingStrategy, MergeMethod


@hookimpl
def mudsc_matching_strategies() -> list[MatchingStrategy]:
    return [
        MatchingStrategy("identity", match_identity, description="Keep every model's unit order and average.", thread_safe=True),
        MatchingStrategy("align", match_align,
                         description="One permutation per model by linear assignment against model 0 (weight matching).", uses_within_model=False,
                         thread_safe=True, supports_width=True),
        MatchingStrategy("zip", match_zip,
                         description="ZipIt!: greedily fuse the most similar units, within a model too.",
                         thread_safe=True, supports_width=True, unequal_widths=True, parameters=(
                             MatcherParameter("a", 0.5, "how fast a unit's similarity decays as it absorbs others (ZipIt!'s alpha)", minimum=0.0),
                             MatcherParameter("b", 1.0, "the share of a model's units that may be fused within that model (ZipIt!'s beta)",
                                              minimum=0.0),
                         )),
    ]


@hookimpl
def mudsc_merge_methods() -> list[MergeMethod]:
    return [
        MergeMethod("average", matcher="identity", alpha=0.0, activations="never", description="Plain weight averaging in every model's order."),
        MergeMethod("weight_matching", matcher="align", alpha=1.0, description="Git Re-Basin: permutations from weight similarity alone."),
        MergeMethod("weight_zip", matcher="zip", alpha=1.0, description="ZipIt!'s fusion from weight similarity alone."),
        MergeMethod("activation_matching", matcher="align", alpha=0.0, description="Permutations from activation correlations alone."),
        MergeMethod("zipit", matcher="zip", alpha=0.0, description="ZipIt!: fusion from activation correlations alone."),
        MergeMethod("mudsc", matcher=None, default_mode="zip",
                    description="MuDSC: S = alpha * S_weight + (1 - alpha) * S_act, matched by --mode (align, zip or any registered matcher)."),
    ]
