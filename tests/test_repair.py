"""REPAIR (merging/repair.py): the repaired model has its parents' interpolated statistics, a
model merged with permuted copies of itself comes back with or without it, per-task repair reads
each parent on its own data, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mudsc_graph import analyze, get_registry
from mudsc_graph.inputs import as_inputs
from mudsc_graph.merging import repair as rp
from mudsc_graph.merging.api import MergeError, merge
from mudsc_graph.merging.calibration import Calibration


def _model(name: str, seed: int, **opts) -> nn.Module:
    torch.manual_seed(seed)
    model = get_registry().architecture(name).build(**opts).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial norms, tokens and statistics, so every parameter matters
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.normal_(0, 0.5, generator=g)
    return model


def _inputs(name: str, n: int, seed: int, opts: dict | None = None) -> torch.Tensor:
    shape = (opts["in_features"],) if name == "mlp" else get_registry().architecture(name).example_inputs(1)[0].shape[1:]
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _permuted(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    spec = analyze(model, (x,))
    return spec.apply_permutation(model, spec.random_permutation(seed))


def _stats_after(result, parents, data, *, repair_data=None):
    """(the repaired model's statistics, their targets) at every repair point."""
    model = result.model
    points = rp.repair_points(model, result.spec, result.matchings, reset_bn=False, n_models=len(parents))
    points = [p for p in points if p.path in rp.measure(parents[0], points, Calibration(data), "parent").stats]
    sizes = {g.id: g.size for g in result.spec.groups}
    sets = repair_data or [data] * len(parents)
    parent_stats = [rp.measure(m, points, Calibration(d), "parent") for m, d in zip(parents, sets)]
    wanted = rp.targets(points, parent_stats, result.matchings, sizes)
    got = rp.measure(model, points, Calibration(data), "merged").stats
    return points, got, wanted


@pytest.mark.parametrize("name, opts, method, mode", [
    ("mlp", {"hidden": (48, 32), "in_features": 20, "bias": True}, "average", "zip"),
    ("mlp", {"hidden": (48, 32), "in_features": 20, "bias": True}, "zipit", "zip"),
    ("mlp", {"hidden": (48, 32), "in_features": 20}, "mudsc", "align"),
    ("vit_tiny", {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 48, "num_heads": 4}, "mudsc", "zip"),
    ("resnet20_gn", {"width": 0.5, "gn_groups": 4}, "mudsc", "align"),
])
def test_one_batch_repair_gives_every_merged_channel_its_target_statistics(name, opts, method, mode):
    """With one calibration batch the on-the-fly correction and the folded one agree, so after
    REPAIR every repair point's std (and mean, where the layer has a bias) equal the
    interpolation of its parents' exactly."""
    models = [_model(name, s, **opts) for s in (1, 2)]
    data = [_inputs(name, 32, 5, opts)]
    plain = merge(models, data=data, method=method, mode=mode, max_iter=3)
    result = merge(models, data=data, method=method, mode=mode, max_iter=3, repair=True)
    points, got, wanted = _stats_after(result, models, data)
    assert points and result.repair_std_ratio is not None and result.repair_std_ratio < 1.0  # merging lost variance
    assert {k: v for k, v in result.matchings.items()}.keys() == plain.matchings.keys()
    for p in points:
        if p.bias is not None:
            torch.testing.assert_close(got[p.path][0], wanted[p.path][0], rtol=1e-4, atol=1e-4, msg=f"mean of {p.path}")
        torch.testing.assert_close(got[p.path][1], wanted[p.path][1], rtol=1e-4, atol=1e-4, msg=f"std of {p.path}")
    # and without REPAIR they were far from it
    _, before, _ = _stats_after(plain, models, data)
    assert max(float((before[p.path][1] / wanted[p.path][1] - 1).abs().max()) for p in points) > 0.05


@pytest.mark.parametrize("name, opts", [
    ("mlp", {"hidden": (48, 32), "in_features": 20}),
    ("vit_tiny", {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 48, "num_heads": 4}),
    ("resnet20_gn", {"width": 0.5, "gn_groups": 4}),
    ("resnet20", {"width": 0.5}),
])
@pytest.mark.parametrize("method, mode", [("mudsc", "zip"), ("mudsc", "align"), ("weight_matching", "align")])
def test_a_model_merged_with_permuted_copies_of_itself_comes_back_repaired(name, opts, method, mode):
    a = _model(name, 0, **opts)
    data = [_inputs(name, 16, k, opts) for k in (1, 2)]
    copies = [a] + [_permuted(a, data[0], seed) for seed in (3, 4)]
    for n in (2, 3):
        # zip's a=1: three identical units stay one cluster (see docs/merging.md, Any number of models)
        result = merge(copies[:n], data=data, method=method, mode=mode, max_iter=10, repair=True, reset_bn=False,
                       matcher_options={"a": 1.0} if mode == "zip" else {})
        assert result.repair_std_ratio == pytest.approx(1.0, abs=1e-4)
        x = data[1] if method != "weight_matching" else _inputs(name, 8, 9, opts)
        with torch.no_grad():
            torch.testing.assert_close(result.model(x), a(x), rtol=1e-4, atol=1e-4)


def test_three_different_models_are_repaired_to_their_interpolation():
    models = [_model("mlp", s, hidden=(40, 24), in_features=12) for s in (1, 2, 3)]
    data = [torch.randn(64, 12)]
    result = merge(models, data=data, method="zipit", repair=True)
    points, got, wanted = _stats_after(result, models, data)
    for p in points:
        torch.testing.assert_close(got[p.path][1], wanted[p.path][1], rtol=1e-4, atol=1e-4)


def test_per_task_repair_reads_each_parent_on_its_own_data():
    models = [_model("mlp", s, hidden=(40, 24), in_features=12, bias=True) for s in (1, 2)]
    g = torch.Generator().manual_seed(3)
    own = [[torch.randn(48, 12, generator=g) + 2.0], [torch.randn(48, 12, generator=g) - 2.0]]
    data = [torch.cat([own[0][0], own[1][0]])]  # the merged model serves both tasks: read on both
    result = merge(models, data=data, method="zipit", repair=True, repair_data=own)
    points, got, wanted = _stats_after(result, models, data, repair_data=own)
    for p in points:
        torch.testing.assert_close(got[p.path][0], wanted[p.path][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[p.path][1], wanted[p.path][1], rtol=1e-4, atol=1e-4)
    shared = merge(models, data=data, method="zipit", repair=True)  # plain REPAIR: parents on all the data
    x = data[0]
    assert not torch.allclose(shared.model(x), result.model(x), atol=1e-3)
    same = merge(models, data=data, method="zipit", repair=True, repair_data=[data, data])
    torch.testing.assert_close(same.model(x), shared.model(x))


def test_repair_with_partial_zip_repairs_the_trunk_only():
    a = _model("mlp", 0, hidden=(40, 32, 24), in_features=12)
    b = _model("mlp", 1, hidden=(40, 32, 24), in_features=12)
    data = [torch.randn(32, 12)]
    plain = merge([a, b], data=data, method="zipit", stop_at="layers.1")
    result = merge([a, b], data=data, method="zipit", stop_at="layers.1", repair=True)
    x = data[0]
    outs, plain_outs = result.model(x), plain.model(x)
    assert len(outs) == 2 and not torch.allclose(outs[0], plain_outs[0])
    trunk = {k for k, v in result.model.state_dict().items() if k.startswith("trunk.layers.2")}
    assert not trunk or all(torch.equal(result.model.state_dict()[k], plain.model.state_dict()[k]) for k in trunk)


def test_repair_refuses_bad_input():
    models = [_model("mlp", s, hidden=(16,), in_features=8) for s in (1, 2)]
    data = [torch.randn(8, 8)]
    with pytest.raises(MergeError, match="calibration data"):
        merge(models, data=None, example_inputs=(torch.randn(2, 8),), method="weight_matching", repair=True)
    with pytest.raises(MergeError, match="one calibration set per model"):
        merge(models, data=data, method="zipit", repair=True, repair_data=[data])
    with pytest.raises(MergeError, match=r"repair_data\[1\] is empty"):
        merge(models, data=data, method="zipit", repair=True, repair_data=[data, []])
    with pytest.raises(MergeError, match="repair must be True or False"):
        merge(models, data=data, method="zipit", repair="yes")
    bad = [torch.full((8, 8), float("inf"))]
    with pytest.raises(MergeError, match="NaN or inf"):
        merge(models, data=data, method="zipit", repair=True, repair_data=[bad, data])
    wrong = [torch.randn(8, 5)]
    with pytest.raises(rp.RepairError, match=r"model 1 failed on calibration batch 0 \(.*8, 5"):
        merge(models, data=data, method="zipit", repair=True, repair_data=[data, wrong])


def test_inputs_are_read_as_the_merge_reads_them():
    """Batches given as (x, y) pairs and as bare tensors repair alike."""
    models = [_model("mlp", s, hidden=(16,), in_features=8) for s in (1, 2)]
    x = torch.randn(16, 8)
    a = merge(models, data=[x], method="zipit", repair=True).model
    b = merge(models, data=[(x, torch.zeros(16, dtype=torch.long))], method="zipit", repair=True).model
    assert as_inputs(x)
    torch.testing.assert_close(a(x), b(x))


def test_with_batchnorm_reset_layers_read_only_by_batchnorms_are_not_repaired(recwarn):
    """ResNet-20's convolutions feed BatchNorms, which the reset renormalises on the same data: REPAIR
    has nothing left to do there (the paper: for BatchNorm networks the reset is REPAIR) and costs no pass."""
    models = [_model("resnet20", s, width=0.5) for s in (1, 2)]
    data = [_inputs("resnet20", 16, 3)]
    plain = merge(models, data=data, method="zipit")
    repaired = merge(models, data=data, method="zipit", repair=True)
    assert repaired.repair_std_ratio is None and any("renormalises" in str(w.message) for w in recwarn)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(repaired.model.state_dict()[key], value), key
