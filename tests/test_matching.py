"""Matching strategies against oracles: brute force for the assignments, a literal port of ZipIt!'s
loop for zip, permuted copies whose permutation must come back, and the registry records."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch

from mudsc_graph import get_registry
from mudsc_graph.merging.matching import Matching, _zip_kernel, identity_matching, match_align, match_identity, match_zip, zipit

torch.set_num_threads(1)
NEG = float("-inf")


def rand_sim(o: int, n_models: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_models * o, n_models * o, generator=g)
    return ((x + x.T) / 2).float()


def features_sim(o: int, n_models: int, seed: int = 0, blocks: int = 1):
    """Model 0's features and n_models - 1 permuted copies (block-structured when blocks > 1):
    returns the stacked features, the similarity and each model's permutation: the copy's unit
    ``perm[r]`` is model-0 unit r (``copy[perm] = f0``), as :meth:`Matching.permutations` says."""
    g = torch.Generator().manual_seed(seed)
    f0 = torch.randn(o, 64, generator=g, dtype=torch.float64)
    d = o // blocks
    perms = [torch.arange(o)]
    for _ in range(1, n_models):
        outer = torch.randperm(blocks, generator=g)
        perms.append(torch.cat([outer[j] * d + torch.randperm(d, generator=g) for j in range(blocks)]))
    feats = torch.cat([f0[torch.argsort(p)] for p in perms])
    return feats, torch.corrcoef(feats).float(), perms


def objective(sim: torch.Tensor, m: Matching) -> float:
    """Total matched cross similarity sum_{i>=1} sum_r S[model 0 unit r, model i unit perm_i[r]]."""
    perms = m.permutations()
    assert perms is not None
    o = m.units
    return sum(float(sim[torch.arange(o), i * o + perms[i]].double().sum()) for i in range(1, m.n_models))


def check_structure(m: Matching, n_models: int, o: int) -> None:
    assert m.merge.shape == (o, n_models * o) and m.unmerge.shape == (n_models * o, o)
    assert m.merge.dtype == torch.float32 and m.unmerge.dtype == torch.float32
    assert torch.allclose(m.merge.sum(1), torch.ones(o))  # each merged unit is an average
    assert ((m.unmerge == 0) | (m.unmerge == 1)).all() and (m.unmerge.sum(1) == 1).all()  # one-hot rows
    assert (m.unmerge.sum(0) >= 1).all()  # no empty merged unit
    assert torch.allclose(m.merge, (m.unmerge / m.unmerge.sum(0)).T)
    assert torch.allclose(m.merge @ m.unmerge, torch.eye(o))  # unmerge then merge is the identity
    assert (m.merge_block(1 % n_models).shape, m.unmerge_block(0).shape) == ((o, o), (o, o))
    assert (m.units, m.merged_units, m.n_models) == (o, o, n_models)


def clusters(m: Matching) -> set[frozenset[int]]:
    return {frozenset(m.unmerge[:, c].nonzero().flatten().tolist()) for c in range(m.merged_units)}


# ---------------------------------------------------------------------------------------------- identity


def test_identity_matching_averages_in_order():
    m = identity_matching(5, 3)
    check_structure(m, 3, 5)
    for i in range(3):
        assert torch.equal(m.merge_block(i), torch.eye(5) / 3) and torch.equal(m.unmerge_block(i), torch.eye(5))
    assert [p.tolist() for p in m.permutations()] == [list(range(5))] * 3


def test_identity_strategy_score_is_mean_cross_diagonal():
    s = rand_sim(6, 3, seed=1)
    (m,) = match_identity([s], 3)
    expected = np.mean([float(s[r, i * 6 + r]) for i in (1, 2) for r in range(6)])
    assert m.score == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------- align


@pytest.mark.parametrize("o", [1, 2, 3, 5, 7])
def test_align_equals_brute_force(o):
    s = rand_sim(o, seed=o)
    (m,) = match_align([s], 2)
    check_structure(m, 2, o)
    cross = s[:o, o:].double().numpy()
    perms = np.array(list(itertools.permutations(range(o))))
    best = cross[np.arange(o), perms].sum(1).max()
    assert objective(s, m) == pytest.approx(best, abs=1e-5)
    assert m.score == pytest.approx(best / o, abs=1e-6)


def test_align_three_models_equals_brute_force():
    o = 4
    s = rand_sim(o, 3, seed=3)
    (m,) = match_align([s], 3)
    check_structure(m, 3, o)
    perms = list(itertools.permutations(range(o)))
    best = max(
        sum(float(s[r, o + p1[r]]) + float(s[r, 2 * o + p2[r]]) for r in range(o)) for p1 in perms for p2 in perms
    )
    assert objective(s, m) == pytest.approx(best, abs=1e-5)
    assert m.score == pytest.approx(best / (2 * o), abs=1e-6)


@pytest.mark.parametrize("n_models", [2, 3])
def test_align_recovers_permuted_copies_exactly(n_models):
    feats, s, perms = features_sim(12, n_models, seed=n_models)
    (m,) = match_align([s], n_models)
    assert [p.tolist() for p in m.permutations()] == [p.tolist() for p in perms]
    merged = m.merge.double() @ feats
    assert torch.allclose(merged, feats[:12], atol=1e-12)
    if n_models == 2:  # 1/2 + 1/2 is exact: the model comes back bit for bit
        assert torch.equal(merged, feats[:12])
    for i in range(n_models):
        assert torch.allclose(m.unmerge_block(i).double() @ merged, feats[i * 12:(i + 1) * 12])
    assert m.score == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------- group align


def block_perms(blocks: int, d: int):
    """Every block-structured permutation: block j -> outer[j], units inside by inner[j]."""
    for outer in itertools.permutations(range(blocks)):
        for inner in itertools.product(list(itertools.permutations(range(d))), repeat=blocks):
            yield outer, np.concatenate([outer[j] * d + np.array(inner[j]) for j in range(blocks)])


def best_block_score(cross: np.ndarray, x: int, y: int, d: int) -> float:
    sub = cross[x * d:(x + 1) * d, y * d:(y + 1) * d]
    return max(sub[np.arange(d), list(p)].mean() for p in itertools.permutations(range(d)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_align_equals_brute_force(seed):
    blocks, d = 3, 2
    o = blocks * d
    s = rand_sim(o, seed=seed)
    (m,) = match_align([s], 2, blocks=blocks)
    check_structure(m, 2, o)
    cross = s[:o, o:].double().numpy()
    best = max(cross[np.arange(o), perm].sum() for _, perm in block_perms(blocks, d))
    assert objective(s, m) == pytest.approx(best, abs=1e-5)
    perm = m.permutations()[1].numpy()  # block-structured: each model-0 block maps into one block
    assert all(len(set(perm[j * d:(j + 1) * d] // d)) == 1 for j in range(blocks))


def test_group_align_three_models_equals_brute_force():
    blocks, d = 2, 2
    o = blocks * d
    s = rand_sim(o, 3, seed=5)
    (m,) = match_align([s], 3, blocks=blocks)
    per_model = [max(s[:o, i * o:(i + 1) * o].double().numpy()[np.arange(o), p].sum() for _, p in block_perms(blocks, d))
                 for i in (1, 2)]
    assert objective(s, m) == pytest.approx(sum(per_model), abs=1e-5)


def planted_coupled_sims():
    """Two coupled similarities (G = 2; d = 2 and d = 3): alone, the first pairs blocks straight
    and the second crossed; their summed block scores prefer crossed."""
    g = torch.Generator().manual_seed(0)

    def sim(d: int, straight: float, crossed: float) -> torch.Tensor:
        o = 2 * d
        cross = 0.05 * torch.rand(o, o, generator=g)
        cross[:d, :d] += straight
        cross[d:, d:] += straight
        cross[:d, d:] += crossed
        cross[d:, :d] += crossed
        within = rand_sim(o, 1, seed=d)
        return torch.cat([torch.cat([within, cross], 1), torch.cat([cross.T, within], 1)])

    return sim(2, 0.5, 0.3), sim(3, 0.0, 0.9)


def block_pairing(m: Matching, blocks: int) -> list[int]:
    d = m.units // blocks
    return (m.permutations()[1][::d] // d).tolist()


def test_coupled_group_align_shares_the_best_summed_block_pairing():
    s1, s2 = planted_coupled_sims()
    alone = [block_pairing(match_align([s], 2, blocks=2)[0], 2) for s in (s1, s2)]
    assert alone[0] != alone[1]  # the planted disagreement
    m1, m2 = match_align([s1, s2], 2, blocks=2)
    assert block_pairing(m1, 2) == block_pairing(m2, 2)

    def summed(outer):
        total = 0.0
        for s in (s1, s2):
            o = s.shape[0] // 2
            cross = s[:o, o:].double().numpy()
            total += sum(best_block_score(cross, j, outer[j], o // 2) for j in range(2))
        return total

    best = max(itertools.permutations(range(2)), key=summed)
    assert block_pairing(m1, 2) == list(best)
    for s, m in ((s1, m1), (s2, m2)):  # inner assignments stay optimal per similarity
        o, d = m.units, m.units // 2
        cross = s[:o, o:].double().numpy()
        assert objective(s, m) == pytest.approx(sum(best_block_score(cross, j, best[j], d) * d for j in range(2)), abs=1e-5)


def test_group_align_recovers_block_permuted_copy():
    feats, s, perms = features_sim(12, 2, seed=7, blocks=4)
    (m,) = match_align([s], 2, blocks=4)
    assert torch.equal(m.permutations()[1], perms[1])
    assert torch.equal(m.merge.double() @ feats, feats[:12])


# ---------------------------------------------------------------------------------------------- zip


def reference_zip(sim: torch.Tensor, n_models: int, a: float, b: float) -> set[frozenset[int]]:
    """ZipIt!'s loop, literally (flattened argmax, column then row update, remove the column),
    with the budget of a model blocked from the start when it is 0 and, when every pair is
    blocked, the most similar representatives fused."""
    s = sim.clone()
    n = s.shape[0]
    o = n // n_models
    s.fill_diagonal_(NEG)
    members = [[u] for u in range(n)]
    origin = torch.arange(n) // o
    to_remove = n - o
    budget = [math.floor((to_remove // n_models) * b)] * n_models

    def block(m):
        sel = origin == m
        s[sel[:, None] & sel[None, :]] = NEG

    for m in range(n_models):
        if budget[m] <= 0:
            block(m)
    while len(members) > o:
        best = int(s.reshape(-1).argmax())
        r, c = best // s.shape[1], best % s.shape[1]
        if s.max() == NEG:  # every pair blocked (N >= 3): fuse the most similar representatives
            reps = [min(x) for x in members]
            r, c = max(((x, y) for x in range(len(reps)) for y in range(len(reps)) if x != y),
                       key=lambda xy: float(sim[reps[xy[0]], reps[xy[1]]]))
        r, c = min(r, c), max(r, c)
        same = int(origin[r]) == int(origin[c])
        members[r] += members.pop(c)
        s[:, r] = torch.minimum(s[:, r], s[:, c]) * a
        s[r, :] = torch.minimum(s[r, :], s[c, :]) * a
        keep = torch.arange(s.shape[0]) != c
        s = s[keep][:, keep]
        origin = origin[keep]
        if same:
            budget[int(origin[r])] -= 1
            if budget[int(origin[r])] == 0:
                block(int(origin[r]))
    return {frozenset(x) for x in members}


@pytest.mark.parametrize("n_models,o,a,b,seed", [
    (2, 8, 0.5, 1.0, 0), (2, 16, 0.5, 1.0, 1), (2, 16, 1.0, 0.0, 2), (2, 12, 0.7, 0.5, 3),
    (3, 6, 0.5, 1.0, 4), (3, 8, 0.5, 0.0, 5), (4, 5, 0.5, 1.0, 6), (4, 6, 0.5, 0.0, 7), (3, 10, 0.5, 0.3, 8),
])
def test_zip_equals_literal_zipit_loop(n_models, o, a, b, seed):
    s = rand_sim(o, n_models, seed=seed)
    (m,) = match_zip([s], n_models, a=a, b=b)
    check_structure(m, n_models, o)
    assert clusters(m) == reference_zip(s, n_models, a, b)


def test_zip_symmetrises_tile_by_tile_to_the_same_bits():
    g = torch.Generator().manual_seed(0)
    for n, tile, dtype in ((50, 7, torch.float32), (600, 256, torch.float32), (300, 256, torch.float64), (5, 256, torch.float32)):
        s = torch.randn(n, n, generator=g, dtype=dtype) * 1e3
        assert torch.equal(zipit._symmetrised(s, tile), (s + s.T).mul_(0.5)), (n, tile, dtype)


def _greedy_inputs(sim: torch.Tensor, n_models: int, b: float):
    n = sim.shape[0]
    o, to_remove = n // n_models, n - n // n_models
    work = ((sim + sim.T) * 0.5).numpy().copy()
    np.fill_diagonal(work, NEG)
    budget = [math.floor((to_remove // n_models) * b)] * n_models
    for m in range(n_models):
        if budget[m] <= 0:
            work[m * o:(m + 1) * o, m * o:(m + 1) * o] = NEG
    return work, sim.numpy(), o, to_remove, budget


@pytest.mark.skipif(not _zip_kernel.available() and not os.environ.get("CI"),
                    reason="numba (the fast extra) is not installed")
def test_compiled_zip_loop_takes_the_numpy_loops_steps():
    """The compiled loop (numba) and the numpy loop fuse the same pairs in the same order, on
    random similarities, on integer ones full of ties, in float64, for every kind of a and b,
    including N >= 3 budgets that block every pair (the fallback), however many fused clusters'
    columns wait to be written (``pending``: 1 writes every column at once)."""
    assert _zip_kernel.available(), "CI installs the fast extra"
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        n_models = 2 + trial % 3
        o = 1 + int(torch.randint(0, 30, (1,), generator=g))
        n = n_models * o
        if trial % 3 == 0:
            sim = torch.randn(n, n, generator=g)
        elif trial % 3 == 1:
            sim = torch.randint(-2, 3, (n, n), generator=g).float()
        else:
            sim = torch.randn(n, n, generator=g, dtype=torch.float64)
        a = (0.0, 0.5, 1.0, 0.3)[trial % 4]
        b = (1.0, 0.0, 0.5, 0.25)[(trial // 4) % 4]
        work, src, o, to_remove, budget = _greedy_inputs(sim, n_models, b)
        expected = zipit._greedy_numpy(work.copy(), src, o, to_remove, a, list(budget))
        for pending in (1, 3, _zip_kernel.PENDING):
            got = _zip_kernel.run(work.copy(), src, o, to_remove, a, list(budget), pending=pending)
            assert np.array_equal(got[0], expected[0]) and got[1:] == expected[1:], (trial, n_models, o, a, b, pending)


def planted_zip_sim(duplicate: bool):
    """2 models x 4 units: model-1 unit perm[r] is model-0 unit r (0.9); with ``duplicate``, model-0
    units 0, 1 are near copies (0.99) and so are their partners in model 1 (0.95)."""
    g = torch.Generator().manual_seed(0)
    s = 0.05 * torch.rand(8, 8, generator=g)
    s = (s + s.T) / 2
    perm = [2, 0, 3, 1]
    for r in range(4):
        s[r, 4 + perm[r]] = s[4 + perm[r], r] = 0.9
    if duplicate:
        s[0, 1] = s[1, 0] = 0.99
        s[4 + perm[0], 4 + perm[1]] = s[4 + perm[1], 4 + perm[0]] = 0.95
    return s, perm


def test_zip_recovers_planted_matching():
    s, perm = planted_zip_sim(duplicate=False)
    (m,) = match_zip([s], 2)
    check_structure(m, 2, 4)
    assert m.permutations()[1].tolist() == perm
    expected_unmerge = torch.zeros(8, 4)
    for r in range(4):
        expected_unmerge[r, r] = expected_unmerge[4 + perm[r], r] = 1
    assert torch.equal(m.unmerge, expected_unmerge) and torch.equal(m.merge, expected_unmerge.T / 2)
    assert m.score == pytest.approx(0.9)


@pytest.mark.parametrize("b", [1.0, 0.5])
def test_zip_merges_within_model_duplicates_when_budget_allows(b):
    s, perm = planted_zip_sim(duplicate=True)
    (m,) = match_zip([s], 2, b=b)
    assert clusters(m) == {frozenset({0, 1}), frozenset({4 + perm[0], 4 + perm[1]}),
                           frozenset({2, 4 + perm[2]}), frozenset({3, 4 + perm[3]})}
    assert m.permutations() is None
    assert m.score == pytest.approx((0.99 + 0.95 + 0.9 + 0.9) / 4)


def test_zip_without_budget_never_fuses_within_a_model():
    s, perm = planted_zip_sim(duplicate=True)
    (m,) = match_zip([s], 2, b=0.0)
    assert m.permutations()[1].tolist() == perm


@pytest.mark.parametrize("n_models", [2, 3])
def test_zip_recovers_permuted_copies(n_models):
    feats, s, perms = features_sim(32, n_models, seed=10 + n_models)
    (m,) = match_zip([s], n_models)
    assert [p.tolist() for p in m.permutations()] == [p.tolist() for p in perms]
    assert torch.allclose(m.merge.double() @ feats, feats[:32], atol=1e-12)


def test_group_zip_keeps_blocks_contiguous():
    blocks, d, n_models = 3, 4, 3
    o = blocks * d
    s = rand_sim(o, n_models, seed=8)
    (m,) = match_zip([s], n_models, blocks=blocks)
    check_structure(m, n_models, o)
    for j in range(blocks):
        cols = m.unmerge[:, j * d:(j + 1) * d]
        rows = cols.sum(1).nonzero().flatten()
        assert rows.numel() == n_models * d  # block set j: exactly one whole block of every model
        for i in range(n_models):
            mine = rows[(rows >= i * o) & (rows < (i + 1) * o)] - i * o
            assert mine.numel() == d and len(set((mine // d).tolist())) == 1
            if i == 0:
                assert (mine // d).tolist() == [j] * d


def test_group_zip_pairs_blocks_like_group_align_and_recovers_copies():
    feats, s, perms = features_sim(12, 2, seed=9, blocks=4)
    (za,) = match_zip([s], 2, blocks=4)
    (al,) = match_align([s], 2, blocks=4)
    assert torch.equal(za.permutations()[1], perms[1]) and torch.equal(al.permutations()[1], perms[1])
    s1, s2 = planted_coupled_sims()
    z1, z2 = match_zip([s1, s2], 2, blocks=2)
    a1, _ = match_align([s1, s2], 2, blocks=2)
    for z in (z1, z2):  # the shared block pairing: merged block 0 holds model 1's block of align's pairing
        d = z.units // 2
        rows = z.unmerge[z.units:, :d].sum(1).nonzero().flatten()
        assert (rows // d).unique().tolist() == block_pairing(a1, 2)[:1]


# ---------------------------------------------------------------------------------------------- records, inputs


def test_strategies_register():
    reg = get_registry()
    s = rand_sim(4, seed=11)
    for name in ("identity", "align", "zip"):
        rec = reg.matcher(name)
        assert rec.name == name and rec.supports_blocks and rec.description
        (m,) = rec.match([s], 2)
        check_structure(m, 2, 4)
        (mb,) = rec.match([s], 2, blocks=2)
        check_structure(mb, 2, 4)


def test_float64_input_and_single_model():
    s = rand_sim(5, seed=12).double()
    for fn in (match_identity, match_align, match_zip):
        (m,) = fn([s], 2)
        check_structure(m, 2, 5)
        (one,) = fn([s[:5, :5]], 1)
        assert torch.equal(one.merge, torch.eye(5)) and torch.equal(one.unmerge, torch.eye(5))


@pytest.mark.parametrize("sims,n_models,blocks,options,message", [
    ([torch.zeros(4, 5)], 2, 1, {}, "square"),
    ([torch.zeros(5, 5)], 2, 1, {}, "multiple of n_models"),
    ([torch.zeros(6, 6)], 2, 2, {}, "blocks"),
    ([torch.full((4, 4), float("nan"))], 2, 1, {}, "NaN"),
    ([], 2, 1, {}, "no similarity"),
    ([torch.zeros(4, 4)], 0, 1, {}, "n_models"),
    ([torch.zeros(4, 4)], 2, 1, {"alpha": 0.5}, "unknown options alpha"),
])
def test_invalid_inputs_are_refused(sims, n_models, blocks, options, message):
    for fn in (match_identity, match_align, match_zip):
        with pytest.raises(ValueError, match=message):
            fn(sims, n_models, blocks, **options)


def test_zip_rejects_negative_options():
    with pytest.raises(ValueError, match="a and b"):
        match_zip([rand_sim(2)], 2, a=-1.0)


def test_hook_mudsc_matching_strategies():
    """A plugin adds a matcher through the hook; reusing a built-in name is refused."""
    import types

    from mudsc_graph import MatchingStrategy, PluginError, hookimpl, registry_with

    def keep_order(sims, n_models, blocks=1, **options):
        return [identity_matching(s.shape[0] // n_models, n_models) for s in sims]

    plugin = types.SimpleNamespace(mudsc_matching_strategies=hookimpl(lambda: [MatchingStrategy("keep_order", keep_order)]))
    reg = registry_with(plugin)
    assert {"identity", "align", "zip", "keep_order"} <= set(reg.matchers)
    (m,) = reg.matcher("keep_order").match([rand_sim(3)], 2)
    assert torch.equal(m.unmerge, identity_matching(3, 2).unmerge)
    clash = types.SimpleNamespace(mudsc_matching_strategies=hookimpl(lambda: [MatchingStrategy("zip", keep_order)]))
    with pytest.raises(PluginError, match="'zip' is registered by both"):
        registry_with(clash)


def test_hook_mudsc_merge_methods():
    """A plugin adds a merge method through the hook: a name for a matcher with a fixed alpha; the
    built-in names cannot be taken again and broken records fail where they are written."""
    import types

    from torch import nn

    from mudsc_graph import MergeMethod, PluginError, hookimpl, merge, registry_with

    def mudsc_merge_methods():
        return [MergeMethod("weights_only_zip", matcher="zip", alpha=1.0, description="weight zip under another name")]

    reg = registry_with(types.SimpleNamespace(mudsc_merge_methods=hookimpl(mudsc_merge_methods)))
    assert reg.method_plugins["weights_only_zip"] != reg.method_plugins["zipit"] and "weights_only_zip" in reg.method_names()
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval() for _ in range(2)]
    ours = merge(models, data=None, method="weights_only_zip", example_inputs=(torch.randn(2, 4),), registry=reg, max_iter=2)
    theirs = merge(models, data=None, method="weight_zip", example_inputs=(torch.randn(2, 4),), max_iter=2)
    assert ours.mode == "zip" and ours.alpha == 1.0
    for a, b in zip(ours.model.state_dict().values(), theirs.model.state_dict().values()):
        assert torch.equal(a, b)
    clash = types.SimpleNamespace(mudsc_merge_methods=hookimpl(lambda: [MergeMethod("zipit", matcher="zip")]))
    with pytest.raises(PluginError, match="'zipit' is registered by both"):
        registry_with(clash)
    with pytest.raises(PluginError, match="alpha must be None or a number"):
        MergeMethod("bad", matcher="zip", alpha=2.0)
    with pytest.raises(PluginError, match="default_mode"):
        MergeMethod("bad", matcher=None)


def test_maps_apply_as_their_dense_matrices_along_any_axis():
    """Every model's merge and read map of an align (permutation: one gather) and of a zip matching
    (a scatter-add) multiplies a tensor along any axis exactly as its dense matrix does."""
    from mudsc_graph.merging.matching import matching_from_labels

    o = 6
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(o, generator=g)
    align = matching_from_labels(torch.cat([torch.arange(o), perm]), 2, o, 0.0)
    zipped = matching_from_labels(torch.tensor([0, 0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 0]), 2, o, 0.0)  # model 0 fuses 0 and 1
    t = torch.randn(4, o, 3, generator=g)
    for m, permutes in ((align, True), (zipped, False)):
        for i in range(2):
            for a in (m.merge_map(i), m.read_map(i)):
                assert (a.inverse is not None) == (permutes or i == 1)  # zip's model 1 block is a permutation here
                dense = a.dense()
                same = torch.equal if a.inverse is not None else lambda x, y: torch.allclose(x, y, rtol=1e-6, atol=1e-7)
                assert same(a.apply(t, 1), torch.einsum("rc,ack->ark", dense, t))
                assert same(a.apply(t.transpose(0, 1).contiguous(), 0), torch.einsum("rc,cak->rak", dense, t.transpose(0, 1)))
