"""The CCA plugin package (docs/plugins/mudsc-cca-plugin), loaded through its entry point, and the
plugin point it needs: covariances for matchers that ask (``MatchingStrategy.needs_covariances``).

CI installs the package; elsewhere its tests are skipped when it is not installed.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
from collections.abc import Mapping

import torch
from torch import nn

if os.environ.get("CI"):
    import mudsc_cca as cca  # CI installs it: a missing plugin must fail, not skip
else:
    try:
        import mudsc_cca as cca
    except ImportError:
        cca = None

from mudsc_graph import analyze, merge, prepare
from mudsc_graph.merging.statistics import CorrelationAccumulator, Correlations
from mudsc_graph.merging.weights import row_normalised
from mudsc_graph.plugin import registry as R
from mudsc_graph.plugin.records import MatchingStrategy

ROOT = Path(__file__).resolve().parents[1]
needs_cca = pytest.mark.skipif(cca is None, reason="mudsc-cca-plugin is not installed (pip install --no-deps -e docs/plugins/mudsc-cca-plugin)")
pytestmark = pytest.mark.usefixtures("one_thread")


def _registry(monkeypatch):
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    return R.Registry.from_plugin_manager(R.make_plugin_manager())


def _stacked(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correlation, covariance) of the models' features (each ``O x samples``), stacked in order."""
    acc = CorrelationAccumulator(sum(x.shape[0] for x in xs))
    acc.update(torch.cat(xs))
    return acc.correlation(), acc.covariance()


# -- the plugin point (no plugin needed) -----------------------------------------------------------------
def test_the_statistics_keep_each_units_standard_deviation():
    torch.manual_seed(0)
    x = torch.randn(6, 300) * torch.linspace(0.1, 3.0, 6)[:, None] + 2.0
    x[2] = 0.5  # a dead unit
    acc = CorrelationAccumulator(6)
    for part in x.split(70, dim=1):
        acc.update(part)
    torch.testing.assert_close(acc.std(), x.double().std(dim=1).float(), rtol=1e-4, atol=1e-6)
    corr = acc.correlation()
    act = Correlations({7: corr}, stds={7: acc.std()})
    assert isinstance(act, Mapping) and list(act) == [7] and act[7] is corr  # still the plain correlations to everyone else
    cov = act.covariance(7)
    live = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(cov[live][:, live], torch.cov(x.double())[live][:, live].float(), rtol=1e-4, atol=1e-5)
    assert bool((cov[2] == 0).all()) and act.covariance(8) is None


def test_the_solver_passes_covariances_only_to_matchers_that_ask(monkeypatch):
    """A strategy with needs_covariances=True gets covariances=[...] (correlation x stds, one per
    similarity, in order); the built-ins never see the keyword."""
    from mudsc_graph import registry_with, hookimpl
    from mudsc_graph.merging.matching import match_align

    seen = []

    def recording(sims, n_models, blocks=1, *, covariances=None, **options):
        seen.append((sims, covariances))
        return match_align(sims, n_models, blocks, **options)

    class Plugin:
        @hookimpl
        def mudsc_matching_strategies(self):
            return [MatchingStrategy("recording", recording, needs_covariances=True, supports_blocks=False)]

    assert MatchingStrategy("x", recording).needs_covariances is False
    reg = registry_with(Plugin())
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval() for _ in range(2))
    data = [torch.randn(32, 5) for _ in range(3)]
    prepared = prepare([a, b], data=data, registry=reg)
    prepared.merge(method="recording", alpha=0.0)
    act = prepared.activations()
    assert isinstance(act, Correlations) and set(act.stds) == set(act)
    assert len(seen) == 1
    (sims, covs), = seen
    assert len(sims) == len(covs) == 1 and covs[0].shape == sims[0].shape == (14, 14)
    gid = next(iter(act))
    torch.testing.assert_close(covs[0], act[gid] * torch.outer(act.stds[gid], act.stds[gid]))
    with_data = torch.cat([torch.relu(a[0](x)).T for x in data], 1), torch.cat([torch.relu(b[0](x)).T for x in data], 1)
    torch.testing.assert_close(covs[0], torch.cov(torch.cat(with_data)), rtol=1e-3, atol=1e-5)


def test_a_signed_merge_block_maps_other_axes_without_averaging():
    """weights.row_normalised: an assignment's rows are normalised within the model (unchanged);
    a signed, dense block (CCA's T_i / N) becomes the model's own map T_i."""
    P = torch.eye(3)[[2, 0, 1]]
    assert torch.equal(row_normalised(P / 2, 2), P)
    zipped = torch.tensor([[0.25, 0.25, 0.0], [0.0, 0.0, 0.5]])
    assert torch.equal(row_normalised(zipped, 2), row_normalised(zipped))
    T = torch.tensor([[1.0, -0.5], [0.2, 0.9]])
    assert torch.equal(row_normalised(T / 3, 3), T / 3 * 3)


# -- the plugin ------------------------------------------------------------------------------------------
@needs_cca
def test_the_entry_point_registers_the_matcher_and_the_method(monkeypatch):
    reg = _registry(monkeypatch)
    assert reg.matcher_plugins["cca"] == "cca" and reg.method_plugins["cca"] == "cca"
    strategy, method = reg.matchers["cca"], reg.methods["cca"]
    assert strategy.needs_covariances and not strategy.supports_blocks
    assert (method.matcher, method.alpha, method.activations) == ("cca", 0.0, "always")
    R.reset_registry()
    try:
        assert "cca" in R.get_registry().method_names()  # found without any manual registration
    finally:
        R.reset_registry()


@needs_cca
def test_match_recovers_a_known_linear_map():
    """Oracle: model 1 = A @ model 0 exactly, so the least-squares map of model 1's features onto
    model 0's is A^-1; without a ridge CCA's T is that map and the unmerge block is A."""
    torch.manual_seed(0)
    o = 6
    x0 = torch.randn(o, 4000) * torch.linspace(0.5, 2.0, o)[:, None] + 1.0
    A = torch.randn(o, o) + 2 * torch.eye(o)
    x1 = A @ x0
    oracle = torch.linalg.lstsq(x1.double().T, x0.double().T).solution.T  # argmin_T ||T x1 - x0||
    torch.testing.assert_close(oracle, torch.linalg.inv(A.double()), rtol=1e-6, atol=1e-6)
    corr, cov = _stacked(x0, x1)
    m, = cca.match_cca([corr], 2, covariances=[cov], gamma=0.0)
    torch.testing.assert_close(m.merge_block(1).double() * 2, oracle, rtol=0, atol=2e-3)
    torch.testing.assert_close(m.unmerge_block(1).double(), A.double(), rtol=0, atol=2e-3)
    torch.testing.assert_close(m.merge_block(0), torch.eye(o) / 2)
    torch.testing.assert_close(m.unmerge_block(0), torch.eye(o))
    assert m.score == pytest.approx(1.0, abs=1e-4) and m.permutations() is None
    # with a ridge: T is still (P0^T)^-1 Pi^T of the canonical directions, and T^-1 its inverse
    m, = cca.match_cca([corr], 2, covariances=[cov], gamma=0.3)
    p0, pi, s = cca.canonical_directions(cov[:o, :o], cov[o:, o:], cov[:o, o:], 0.3)
    T = torch.linalg.solve(p0.T, pi.T)
    torch.testing.assert_close(m.merge_block(1).double() * 2, T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.unmerge_block(1).double() @ T, torch.eye(o, dtype=torch.float64), rtol=0, atol=1e-4)
    assert m.score == pytest.approx(float(s.mean()), abs=1e-6) and 0 < m.score < 1


@needs_cca
@pytest.mark.parametrize("n_models", [2, 3])
def test_a_permuted_copy_gives_the_identity_merge(n_models):
    """For copies of model 0 with permuted units T_i is the permutation (any gamma), so merge and
    unmerge are exactly those of align; ties and dead units included."""
    torch.manual_seed(1)
    o = 10
    x0 = torch.randn(o, 500) * torch.linspace(0.2, 3.0, o)[:, None]
    x0[3] = 0.0  # a dead unit
    x0[7] = x0[5]  # two identical units
    perms = [torch.randperm(o) for _ in range(n_models - 1)]
    corr, cov = _stacked(x0, *(x0[p] for p in perms))
    m, = cca.match_cca([corr], n_models, covariances=[cov])
    for i, p in enumerate(perms, start=1):
        P = torch.eye(o)[p]  # x_i = P x_0
        T = m.merge_block(i) * n_models
        if i == 1:
            assert (T - P.T).abs().max() > 0  # float error, but dense: no assignment
        keep = [u for u in range(o) if u not in (5, 7)]  # identical units may be mixed among themselves
        torch.testing.assert_close(T[keep], P.T[keep], rtol=0, atol=1e-4)
        torch.testing.assert_close(T[[5, 7]].sum(0), P.T[[5, 7]].sum(0), rtol=0, atol=1e-4)
        torch.testing.assert_close(m.unmerge_block(i) @ T, torch.eye(o), rtol=0, atol=1e-4)
    merged = m.merge @ torch.cat([x0, *(x0[p] for p in perms)])
    torch.testing.assert_close(merged, x0, rtol=0, atol=1e-4)


@needs_cca
def test_match_validates_its_arguments():
    corr, cov = _stacked(torch.randn(4, 50), torch.randn(4, 50))
    with pytest.raises(ValueError, match="unknown options zeta"):
        cca.match_cca([corr], 2, covariances=[cov], zeta=1)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        cca.match_cca([corr], 2, gamma=-1.0)
    with pytest.raises(ValueError, match="cannot match blocks"):
        cca.match_cca([corr], 2, blocks=2)
    with pytest.raises(ValueError, match="2 covariances for 1 similarities"):
        cca.match_cca([corr], 2, covariances=[cov, cov])
    m, = cca.match_cca([corr], 2)  # no covariances (weights only): S read as a correlation
    assert torch.isfinite(m.merge).all() and torch.isfinite(m.unmerge).all()


class _NormMLP(nn.Module):
    """An MLP with LayerNorm and BatchNorm on its hidden units (biases everywhere)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2, self.bn, self.head = nn.Linear(12, 24), nn.LayerNorm(24), nn.Linear(24, 16), nn.BatchNorm1d(16), nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc2(torch.relu(self.ln(self.fc1(x)))))))


def _non_constant(model: nn.Module) -> nn.Module:
    """Give the tensors that start constant (norm scales 1, shifts 0, BatchNorm statistics) random values."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _models(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        return _non_constant(_NormMLP()), (12,)
    from mudsc_plugins.zoo import build

    return _non_constant(build("resnet20", width=1)), (3, 32, 32)


@needs_cca
@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("kind", ["mlp", "resnet20"])
def test_a_model_merged_with_permuted_copies_of_itself_comes_back(kind, n_models):
    model, shape = _models(kind)
    x = (torch.randn(4, *shape),)
    spec = analyze(model, x)
    twins = [spec.apply_permutation(model, spec.random_permutation(seed=s)) for s in range(1, n_models)]
    probe = torch.randn(16, *shape)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), twins[0].state_dict().values()))  # other weights, same function
    data = [torch.randn(64, *shape) for _ in range(3)]
    result = merge([model, *twins], data=data, method="cca", reset_bn=False)
    assert result.mode == "cca" and result.alpha == 0.0 and result.sweeps == 0
    assert result.matchings and all(m.permutations() is None for m in result.matchings.values())  # dense maps
    with torch.no_grad():
        want, got = model(probe), result.model(probe)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@needs_cca
def test_mudsc_with_the_cca_mode_iterates_the_dual_space_similarity():
    model, shape = _models("mlp")
    other = _non_constant(_NormMLP())
    data = [torch.randn(64, *shape) for _ in range(3)]
    result = merge([model, other], data=data, method="mudsc", mode="cca", alpha=0.3, max_iter=3)
    assert result.mode == "cca" and result.alpha == 0.3 and result.sweeps >= 1 and len(result.history) == result.sweeps
    probe = torch.randn(8, *shape)
    assert torch.isfinite(result.model(probe)).all()


@needs_cca
def test_block_groups_are_averaged_with_the_documented_warning(monkeypatch):
    reg = _registry(monkeypatch)
    arch = reg.architecture("vit_tiny")
    torch.manual_seed(0)
    a, b = arch.build().eval(), arch.build().eval()
    with pytest.warns(UserWarning, match=r"matcher 'cca' cannot match blocks: \d+ block groups .* averaged in place"):
        result = merge([a, b], data=[arch.example_inputs(8)], method="cca", registry=reg)
    blocked = {g.id for g in result.spec.free_groups() if g.blocks > 1}
    assert blocked and not blocked & set(result.matchings)
    assert result.matchings and torch.isfinite(result.model(*arch.example_inputs(2))).all()


@needs_cca
def test_mudsc_merge_takes_the_cca_method(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from mudsc_cli.app import app
    from mudsc_plugins.zoo import build

    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    R.reset_registry()
    try:
        torch.manual_seed(0)
        for name in ("a", "b"):
            torch.save(build("mlp", hidden=(24, 16), bias=True).state_dict(), tmp_path / f"{name}.pt")
        out = tmp_path / "m.pt"
        result = CliRunner().invoke(app, ["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--arch", "mlp",
                                          "--arch-opt", "hidden=(24, 16)", "--arch-opt", "bias=True", "--data", "digits",
                                          "--samples", "100", "--method", "cca", "--out", str(out), "--quiet", "--json"])
        assert result.exit_code == 0, result.output
        assert '"mode": "cca"' in result.output and out.is_file()
        merged = torch.load(out, weights_only=True)
        merged = merged.get("state_dict", merged) if isinstance(merged, dict) else merged
        assert "layers.0.weight" in merged and merged["layers.0.weight"].shape == (24, 784)
    finally:
        R.reset_registry()


@needs_cca
def test_the_readme_example_runs():
    text = (ROOT / "docs" / "plugins" / "mudsc-cca-plugin" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for block in blocks:
            exec(compile(block, "mudsc-cca-plugin/README.md", "exec"), {})


@needs_cca
def test_repair_leaves_soft_matchings_alone():
    """A CCA merged unit mixes its parents' units, so its statistics are no interpolation of theirs:
    REPAIR leaves those channels as they are and says so (it once flipped and crushed them)."""
    model, shape = _models("mlp")
    other = _non_constant(_NormMLP())
    data = [torch.randn(64, *shape) for _ in range(2)]
    plain = merge([model, other], data=data, method="cca", reset_bn=False)
    with pytest.warns(UserWarning, match="soft"):
        repaired = merge([model, other], data=data, method="cca", reset_bn=False, repair=True)
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(repaired.model.state_dict()[key], value, msg=key)


@needs_cca
def test_the_ridge_is_a_declared_parameter():
    """gamma (was fixed per registered strategy) is given per merge, checked, and recorded."""
    from mudsc_graph.merging.options import MergeError

    model, shape = _models("mlp")
    other = _non_constant(_NormMLP())
    data = [torch.randn(64, *shape) for _ in range(2)]
    default = merge([model, other], data=data, method="cca", reset_bn=False)
    ridged = merge([model, other], data=data, method="cca", reset_bn=False, matcher_options={"gamma": 3.0})
    assert default.matcher_options == {"gamma": 0.3} and ridged.matcher_options == {"gamma": 3.0}
    assert any(not torch.equal(ridged.model.state_dict()[k], v) for k, v in default.model.state_dict().items())
    with pytest.raises(MergeError, match="gamma must be a finite number >= 0, got -1.0"):
        merge([model, other], data=data, method="cca", reset_bn=False, matcher_options={"gamma": -1.0})
