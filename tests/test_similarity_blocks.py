"""Streamed weight similarity (tensor by tensor) equals the concatenated computation."""

from __future__ import annotations

import pytest
import torch

from construct_models import CASES_BY_NAME
from mudsc_graph import get_registry
from mudsc_graph.merging.solver import DualSpaceSolver
from mudsc_graph.merging.api import merge
from mudsc_graph.merging.similarity import normal_rows, stacked_correlation, streamed_correlation

ATOL = 2e-5


def _features(n_models: int, rows: int = 7, widths: tuple[int, ...] = (5, 1, 12, 3), seed: int = 0) -> list[list[torch.Tensor]]:
    """Per model, aligned pieces; rows 0-2 are constant (rows 0 and 1 equal across models, row 2
    a model-specific value), row 3 has a large mean, so dead rows and centring are exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(n_models):
        pieces = []
        for w in widths:
            p = torch.randn(rows, w, generator=g)
            p[0], p[1], p[2] = 0.5, 0.5, 1.0 + m
            p[3] = 100.0 + p[3]
            pieces.append(p)
        out.append(pieces)
    return out


@pytest.mark.parametrize("n_models, cross_only", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_streamed_equals_concatenated(n_models, cross_only):
    feats = _features(n_models)
    cat = [torch.cat(p, dim=1) for p in feats]
    old = stacked_correlation([normal_rows(x) for x in cat], within_model=not cross_only)
    new = streamed_correlation([iter(p) for p in feats], within_model=not cross_only)
    torch.testing.assert_close(new, old, atol=ATOL, rtol=0)
    if not cross_only:  # the live rows are Pearson correlations
        live = torch.ones(old.shape[0], dtype=torch.bool)
        live[[k * 7 + r for k in range(n_models) for r in range(3)]] = False
        ref = torch.corrcoef(torch.cat(cat).double()).float()
        torch.testing.assert_close(new[live][:, live], ref[live][:, live], atol=ATOL, rtol=0)
    dead_equal = new[0, 1] if n_models == 1 else new[0, 7 + 1]
    assert dead_equal == 1.0 and new[0, 4] == 0.0  # equal constants 1, constant vs live 0


def test_streamed_ignores_empty_pieces_and_rejects_none():
    feats = _features(2)
    empty = [[torch.zeros(7, 0), *p] for p in feats]
    torch.testing.assert_close(
        streamed_correlation([iter(p) for p in empty]), streamed_correlation([iter(p) for p in feats]), atol=0, rtol=0
    )
    with pytest.raises(ValueError):
        streamed_correlation([iter([torch.zeros(7, 0)])])


def _unused(within_model: bool):
    """A matcher record for a solver that only builds similarities (nothing is matched)."""
    from mudsc_graph import MatchingStrategy

    return MatchingStrategy("unused", lambda *a, **k: None, uses_within_model=within_model)


def _solver_similarities(models, data, mode, cross_only):
    """Every group's weight similarity at a merge's matchings, cached rows vs streamed."""
    res = merge(models, data=data, method="mudsc", mode=mode, alpha=0.5, max_iter=2, reset_bn=False)
    states = [m.state_dict() for m in models]
    solver = DualSpaceSolver(res.spec, states, sorted(res.matchings), _unused(within_model=not cross_only), act=None, alpha=1.0)
    for gid in sorted(res.matchings):
        solver.stream[gid] = False
        key, old = solver.weight_similarity(gid, res.matchings)
        solver.stream[gid] = True
        key2, new = solver.weight_similarity(gid, res.matchings)
        yield gid, old, new, key == key2


def _vit_tiny(n_models: int):
    """``n_models`` ViT-Ti of seeds 0, 1, ... and one 4-image batch."""
    arch = get_registry().architecture("vit_tiny")
    models = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        models.append(arch.build().eval())
    return models, torch.randn(4, *arch.example_inputs(1)[0].shape[1:], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode, cross_only", [("zip", False), ("align", True)])
def test_solver_paths_agree_on_vit_tiny_three_models(mode, cross_only):
    models, x = _vit_tiny(3)
    for gid, old, new, same_key in _solver_similarities(models, [x], mode, cross_only):
        assert same_key
        torch.testing.assert_close(new, old, atol=ATOL, rtol=0, msg=f"group {gid}")


def test_solver_paths_agree_on_grouped_conv():
    case = CASES_BY_NAME["grouped_conv"]
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(case.make_model().eval())
    for gid, old, new, _ in _solver_similarities(models, [case.make_inputs()], "zip", False):
        torch.testing.assert_close(new, old, atol=ATOL, rtol=0, msg=f"group {gid}")


def test_solver_keeps_weight_features_only_while_their_neighbours_stand_still():
    """A group's per-model features are cached once built twice on the same neighbours' blocks, and
    never again once built on different ones; the similarities are the uncached ones throughout."""
    from mudsc_graph.merging.matching import identity_matching

    models, x = _vit_tiny(2)
    res = merge(models, data=[x], method="mudsc", mode="align", alpha=0.5, max_iter=2, reset_bn=False)
    states = [m.state_dict() for m in models]
    gids = sorted(res.matchings)

    def solver():
        s = DualSpaceSolver(res.spec, states, gids, _unused(within_model=False), act=None, alpha=1.0)
        s.stream = dict.fromkeys(gids, False)
        return s

    gid = next(g for g in gids if (solver().nbrs[g] - {g}) & set(gids))
    other = dict(res.matchings)
    for nb in (solver().nbrs[gid] - {gid}) & set(gids):  # every neighbour back to the identity: model 1's blocks change, model 0's do not
        other[nb] = identity_matching(res.spec.groups[nb].size, 2)
    s = solver()
    for step, matchings in enumerate([res.matchings, res.matchings, other, res.matchings]):
        got = s.weight_similarity(gid, matchings)[1]
        assert torch.equal(got, solver().weight_similarity(gid, matchings)[1]), f"step {step}"
        held = {i for i in range(2) if s._rows.get((gid, i), (None, None))[1] is not None}
        assert held == [set(), {0, 1}, {0}, {0}][step], f"step {step}: rows held for models {held}"


@pytest.mark.parametrize("n_models, mode, blocks", [(2, "zip", 3), (3, "zip", 6), (2, "align", 1), (3, "align", 2)])
def test_weight_similarity_work_is_counted_by_hand(n_models, mode, blocks):
    """One hidden group of 6 units whose features are 4 input weights, a bias and 3 output weights:
    every weight similarity costs (its computed 6x6 blocks) x 8 multiply-adds, built once (it has no
    neighbours whose matching could change it); zip computes every block, align the cross ones."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)) for _ in range(n_models)]
    x = [torch.randn(8, 4)]
    res = merge(models, data=x, method="mudsc", mode=mode, reset_bn=False)
    assert res.sweeps > 1 and res.weight_macs == blocks * 6 * 6 * 8
    assert merge(models, data=x, method="zipit", reset_bn=False).weight_macs == 0


def test_streamed_weight_similarities_count_the_same_work(monkeypatch):
    """A group whose features stream counts its columns as the pieces pass: the same multiply-adds
    as when its rows are built whole (no extra pass over its tensors to count them)."""
    from mudsc_graph.merging import solver as S

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)) for _ in range(2)]
    x = [torch.randn(8, 4)]
    whole = merge(models, data=x, method="mudsc", mode="zip", reset_bn=False).weight_macs
    monkeypatch.setattr(S, "STREAM_NUMEL", 0)
    assert merge(models, data=x, method="mudsc", mode="zip", reset_bn=False).weight_macs == whole == 3 * 6 * 6 * 8
