"""Activation statistics (mudsc_graph/merging/statistics.py) against independent oracles.

- the streaming accumulator against ``torch.corrcoef`` / ``torch.cov`` (float64) on the
  concatenated features;
- ``group_features`` against manual slicing of each axis-expression kind;
- ``activation_correlations`` on a model and a randomly permuted copy: the cross-model block
  peaks at the permuted partner, the diagonal blocks are each model's own correlation.
"""

from __future__ import annotations

import pytest
import torch

import mudsc_graph
from mudsc_graph.errors import MudscError
from mudsc_graph.spec.axes import from_json, to_json
from mudsc_graph.merging.statistics import CorrelationAccumulator, activation_correlations, group_features, probe_extractor, select_probes
from mudsc_graph.analysis.trace import trace


# -- the accumulator ---------------------------------------------------------------------------------
def _features(units: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Uneven batches of correlated post-ReLU features with means ~1..4, one constant unit (2.5)
    and one always-zero unit (dead)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(units, units, generator=g) / units**0.5
    out = []
    for _ in range(40):
        s = int(torch.randint(1, 300, (), generator=g))
        z = torch.relu(mix @ torch.randn(units, s, generator=g) + 1.0) * 3 + 0.5
        z[3] = 2.5
        z[7] = 0.0
        out.append(z)
    return out


def test_streaming_correlation_matches_corrcoef() -> None:
    chunks = _features()
    x = torch.cat(chunks, dim=1).double()
    acc = CorrelationAccumulator(x.shape[0])
    for c in chunks:
        acc.update(c)
    assert acc.count == x.shape[1]
    corr = acc.correlation()
    assert corr.dtype == torch.float32 and torch.isfinite(corr).all()
    alive = [i for i in range(x.shape[0]) if i not in (3, 7)]
    ref = torch.corrcoef(x[alive])
    assert (corr[alive][:, alive].double() - ref).abs().max() < 1e-5
    assert torch.allclose(acc.covariance().double(), torch.cov(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(acc.mean.double(), x.mean(1), atol=1e-5)
    for dead in (3, 7):
        row = corr[dead].clone()
        assert row[dead] == 1.0 and corr[dead, dead] == 1.0
        row[dead] = 0.0
        assert (row == 0).all() and (corr[:, dead].sum() == 1.0)


def test_large_means_keep_precision() -> None:
    chunks = [c + 100.0 for c in _features(seed=1)]
    x = torch.cat(chunks, dim=1).double()
    acc = CorrelationAccumulator(x.shape[0])
    for c in chunks:
        acc.update(c)
    alive = [i for i in range(x.shape[0]) if i not in (3, 7)]
    assert (acc.correlation()[alive][:, alive].double() - torch.corrcoef(x[alive])).abs().max() < 1e-5


def test_scale_invariance_and_official_eps() -> None:
    """Default: exact Pearson whatever the scale; eps=1e-7: the official clamp, which shrinks
    low-variance units (std ~3e-5 here) towards 0."""
    chunks = _features(seed=2)
    ref = CorrelationAccumulator(24)
    small = CorrelationAccumulator(24)
    for c in chunks:
        ref.update(c)
        small.update(c * 1e-5)
    assert (ref.correlation() - small.correlation()).abs().max() < 1e-5
    shrunk = small.correlation(eps=1e-7)
    off = ~torch.eye(24, dtype=torch.bool)
    assert shrunk[off].abs().max() < 0.05 and torch.isfinite(shrunk).all()
    x = torch.cat(chunks, 1)
    cov = torch.cov(x)
    sd = cov.diagonal().sqrt()
    official = cov / torch.outer(sd, sd).clamp(min=1e-7)
    alive = [i for i in range(24) if i not in (3, 7)]
    assert (ref.correlation(eps=1e-7)[alive][:, alive] - official[alive][:, alive]).abs().max() < 1e-5


def test_state_is_independent_of_samples_and_dtype() -> None:
    a, b = CorrelationAccumulator(10), CorrelationAccumulator(10)
    a.update(torch.randn(10, 5, dtype=torch.float64))
    for _ in range(50):
        b.update(torch.randint(0, 5, (10, 1000)))  # integer features are cast to float32
    assert a.state_numel() == b.state_numel() == 10 + 100
    assert a.m2.shape == b.m2.shape == (10, 10) and b.m2.dtype == torch.float32
    with pytest.raises(ValueError):
        a.update(torch.randn(9, 4))
    with pytest.raises(ValueError):
        CorrelationAccumulator(3).correlation()


# -- group_features ----------------------------------------------------------------------------------
def test_group_features_plain_axis() -> None:
    v = torch.randn(2, 5, 3, 4)
    f = group_features(v, 1, from_json(["g", 0]), 0, {0: 5})
    assert torch.equal(f, v.permute(1, 0, 2, 3).reshape(5, -1))
    with pytest.raises(ValueError, match="does not occur"):
        group_features(v, 1, from_json(["g", 0]), 1, {0: 5, 1: 5})
    with pytest.raises(ValueError, match="spans"):
        group_features(v, 1, from_json(["g", 0]), 0, {0: 4})


def test_group_features_kron() -> None:
    v = torch.randn(3, 4 * 6)  # conv (4 channels) -> flatten (6 positions) -> Linear input
    f = group_features(v, 1, from_json(["kron", ["g", 2], ["fixed", 6]]), 2, {2: 4})
    manual = torch.stack([v[:, c * 6 : (c + 1) * 6].reshape(-1) for c in range(4)])
    assert f.shape == (4, 18)
    assert torch.equal(f.sort(dim=1).values, manual.sort(dim=1).values)  # same samples per unit
    f = group_features(v, 1, from_json(["kron", ["fixed", 6], ["g", 2]]), 2, {2: 4})
    manual = torch.stack([v[:, c::4].reshape(-1) for c in range(4)])
    assert torch.equal(f.sort(dim=1).values, manual.sort(dim=1).values)


def test_group_features_sum_with_repeats() -> None:
    v = torch.randn(2, 7, 3 * 8)  # fused qkv rows: sum(QK, QK, V)
    e = from_json(["sum", [["g", 1], ["g", 1], ["g", 4]]])
    sizes = {1: 8, 4: 8}
    qk = group_features(v, 2, e, 1, sizes)
    q, k, val = v[..., :8], v[..., 8:16], v[..., 16:]
    assert torch.equal(qk, torch.cat([q.reshape(-1, 8).T, k.reshape(-1, 8).T], dim=1))
    assert torch.equal(group_features(v, 2, e, 4, sizes), val.reshape(-1, 8).T)
    # nested: a fixed part, then a kron
    w = torch.randn(5, 3 + 4 * 2)
    f = group_features(w, 1, from_json(["sum", [["fixed", 3], ["kron", ["g", 0], ["fixed", 2]]]]), 0, {0: 4})
    manual = torch.stack([w[:, 3 + 2 * c : 5 + 2 * c].reshape(-1) for c in range(4)])
    assert torch.equal(f.sort(dim=1).values, manual.sort(dim=1).values)


# -- models --------------------------------------------------------------------------------------------
def _pair(name: str):
    reg = mudsc_graph.get_registry()
    arch = reg.architecture(name)
    torch.manual_seed(0)
    model = arch.build().eval()
    x = arch.example_inputs(2)
    analysis = mudsc_graph.analyze_full(model, x)
    spec = analysis.spec
    perm = spec.random_permutation(1)
    permuted = spec.apply_permutation(model, perm).eval()
    gm2 = trace(permuted, x, leaf_types=reg.leaf_module_types())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, *x[0].shape[1:], generator=gen) for n in (5, 8, 3)]
    return analysis, gm2, spec, perm, batches


@pytest.fixture(scope="module")
def resnet():
    return _pair("resnet20")


@pytest.fixture(scope="module")
def vit():
    return _pair("timm_vit_tiny")


def _check_permuted(corr: dict, spec, perm: dict, gm_single, batches, probe: str) -> None:
    own = activation_correlations([gm_single], spec, batches, probe=probe)
    assert set(corr) == set(own) == {g.id for g in spec.groups if not g.fixed and g.probes}
    for gid, c in corr.items():
        u = spec.groups[gid].size
        assert c.shape == (2 * u, 2 * u) and c.dtype == torch.float32 and torch.isfinite(c).all()
        assert torch.allclose(c[:u, :u], own[gid], atol=1e-5)
        p = perm[gid]
        assert torch.allclose(c[u:, u:], own[gid][p][:, p], atol=1e-4)  # new unit i = old unit p[i]
        cross = c[u:, :u]
        own_block = own[gid][p][:, p]
        dead = (own_block == 1.0).sum(1) > 1  # dead (always-zero) units equal each other
        alive = ~dead
        assert alive.float().mean() > 0.9
        # dead units correlate 1 with the dead units of the other model and 0 with live ones
        assert torch.all(cross[dead][:, p[alive]] == 0) and torch.all(cross[dead][:, p[dead]] == 1)
        assert torch.equal(cross.argmax(1)[alive], p[alive]), f"group {gid}"
        assert torch.allclose(cross[alive, p[alive]], torch.ones(int(alive.sum())), atol=1e-4)


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def advance(self, n: int = 1, **info) -> None:
        self.n += n


def test_resnet_permuted_partner_last_and_all(resnet) -> None:
    analysis, gm2, spec, perm, batches = resnet
    gm1 = analysis.graph_module
    rep = _Counter()
    last = activation_correlations([gm1, gm2], spec, batches, reporter=rep)
    assert rep.n == len(batches)
    _check_permuted(last, spec, perm, gm1, batches, "last")
    # "all": tuple batches (x, label) with the default inputs_from_batch
    every = activation_correlations([gm1, gm2], spec, [(b, 0) for b in batches], probe="all")
    _check_permuted(every, spec, perm, gm1, batches, "all")
    assert not gm1.training and not gm2.training  # modes untouched
    residual = max((g for g in spec.free_groups()), key=lambda g: len(g.probes))
    assert not torch.allclose(last[residual.id], every[residual.id])  # they read different probes
    # each access builds a new matrix (the solver may scale it in place); a plain tensor is handed out as is
    g = residual.id
    assert last.fresh(g) and last[g] is not last[g] and torch.equal(last[g].mul_(0.5), last[g] * 0.5)
    from mudsc_graph.merging.statistics import Correlations

    plain = Correlations({g: last[g]})
    assert not plain.fresh(g) and plain[g] is plain[g]


def test_resnet_oracle_single_probe(resnet) -> None:
    """The correlation of one group equals torch.corrcoef of its probe's value over all batches."""
    analysis, gm2, spec, perm, batches = resnet
    g = spec.groups[2]
    (p,) = select_probes(g, "last")
    ext = probe_extractor(analysis.graph_module, [p.node])
    with torch.no_grad():
        v = torch.cat([ext(b)[p.node] for b in batches])
    ref = torch.corrcoef(v.transpose(0, 1).reshape(g.size, -1).double())
    got = activation_correlations([analysis.graph_module], spec, [{"x": b} for b in batches])[g.id]
    alive = ~ref.isnan().any(1)
    assert (got[alive][:, alive].double() - ref[alive][:, alive]).abs().max() < 1e-5


def test_probe_extractor_shares_params_and_stops_early(resnet) -> None:
    analysis, *_ = resnet
    gm = analysis.graph_module
    order = [n.name for n in gm.graph.nodes]
    wanted = ["relu_1", "layer1_0_conv1"]
    ext = probe_extractor(gm, wanted)
    names = [n.name for n in ext.graph.nodes]
    assert "layer2_0_conv1" not in names and "relu_1" in names and "x" in names
    assert max(order.index(n) for n in names if n != "output") == order.index("relu_1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ext(x)
        assert set(out) == set(wanted)
        w = gm.get_submodule("conv1").weight
        old = w.clone()
        w.mul_(2.0)  # shared parameter: the extractor sees the change
        out2 = ext(x)
        w.copy_(old)
    assert not torch.allclose(out["relu_1"], out2["relu_1"])
    with pytest.raises(ValueError, match="not in the graph"):
        probe_extractor(gm, ["no_such_node"])


def test_errors(resnet) -> None:
    analysis, gm2, spec, _, batches = resnet
    with pytest.raises(ValueError, match="no calibration batches") as info:
        activation_correlations([analysis.graph_module], spec, [])
    assert isinstance(info.value, MudscError)
    bad = batches[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite features .*group \d+ at node '\w+'"):
        activation_correlations([analysis.graph_module, gm2], spec, [bad])
    with pytest.raises(ValueError, match="probe must be"):
        activation_correlations([analysis.graph_module], spec, batches, probe="middle")


def test_timm_vit_fused_qkv(vit) -> None:
    analysis, gm2, spec, perm, batches = vit
    qk = [g for g in spec.free_groups() if any(to_json(p.expr)[0] == "sum" for p in g.probes) and not any(p.consumer for p in g.probes)]
    assert qk, "expected a Q/K group read from the fused qkv output"
    corr = activation_correlations([analysis.graph_module, gm2], spec, batches, probe="last")
    _check_permuted(corr, spec, perm, analysis.graph_module, batches, "last")
    # oracle for Q/K: the Q rows and K rows of the qkv output, concatenated as samples
    g = qk[0]
    (p,) = select_probes(g, "last")
    ext = probe_extractor(analysis.graph_module, [p.node])
    with torch.no_grad():
        v = torch.cat([ext(b)[p.node] for b in batches]).reshape(-1, 3 * g.size)
    ref = torch.corrcoef(torch.cat([v[:, : g.size], v[:, g.size : 2 * g.size]]).T.double())
    assert (corr[g.id][: g.size, : g.size].double() - ref).abs().max() < 1e-5
    every = activation_correlations([analysis.graph_module, gm2], spec, batches, probe="all")
    assert set(every) == set(corr)


@pytest.mark.parametrize("n_models, within_model", [(2, True), (3, True), (2, False), (3, False)])
def test_stacked_moments_by_strips_equal_the_full_correlation(n_models, within_model) -> None:
    """Diagonal blocks wider than ``tile`` are stored as upper row strips and mirrored by dense():
    the result is the full Pearson correlation of the stacked features (dead units, a large mean
    and several batches included); without within-model blocks those read 0."""
    from mudsc_graph.merging.statistics import StackedMoments

    units, g = 11, torch.Generator().manual_seed(0)
    batches = [torch.randn(n_models * units, k, generator=g) for k in (7, 1, 12)]
    for b in batches:
        b[3] = 2.5  # a dead unit of model 0, equal to ...
        b[units + 3] = 2.5  # ... model 1's
        b[5] += 1e3
    acc = StackedMoments(n_models, units, within_model=within_model, tile=4)
    ref = CorrelationAccumulator(n_models * units)
    for b in batches:
        assert bool(acc.update(b.clone(), in_place=True))
        ref.update(b)
    got, want = acc.finish().dense(), ref.correlation()
    if not within_model:
        for i in range(n_models):
            for j in range(n_models):
                if i != j and 0 not in (i, j) or i == j:
                    want[i * units:(i + 1) * units, j * units:(j + 1) * units] = 0.0
        want.fill_diagonal_(1.0)
        want[3, units + 3] = want[units + 3, 3] = 1.0  # equal constants stay 1 wherever they are
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    torch.testing.assert_close(acc.sigma, ref.std(), atol=1e-4, rtol=1e-5)
