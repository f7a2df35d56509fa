"""The installable example plugin (docs/plugins/mudsc-example-plugin), loaded through its entry point.

CI installs it; elsewhere the test is skipped when it is not installed.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if os.environ.get("CI"):
    import mudsc_example_plugin as example  # CI installs it: a missing plugin must fail, not skip
else:
    example = pytest.importorskip("mudsc_example_plugin")

from typer.testing import CliRunner

from mudsc_cli.app import app
from mudsc_graph import analyze, merge
from mudsc_graph.plugin import registry as R


def test_entry_point_registers_the_handler_and_architecture(monkeypatch):
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    reg = R.Registry.from_plugin_manager(R.make_plugin_manager())
    assert reg.handler_plugins["example.LowRankLinear"] == "example"
    assert reg.arch_plugins["example_lowrank_mlp"] == "example"


def test_the_low_rank_layer_merges_through_the_plugin(monkeypatch):
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reg = R.Registry.from_plugin_manager(R.make_plugin_manager())
    arch = reg.architecture("example_lowrank_mlp")
    torch.manual_seed(0)
    model, x = arch.build().eval(), arch.example_inputs(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = analyze(model, x, registry=reg, strict=True)
    assert spec.permutable_units == 32 + 8 + 32  # hidden, rank, hidden
    assert spec.consumed["3.U"] == [0] and spec.consumed["3.V"] == [0]
    spec.check(model, x)
    # merging the model with a permuted copy of itself gives it back, rank units included
    twin = spec.apply_permutation(model, spec.random_permutation(seed=3))
    data = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    result = merge([model, twin], data=data, method="mudsc", mode="zip", registry=reg, reset_bn=False)
    torch.testing.assert_close(result.model(data[0]), model(data[0]), rtol=1e-4, atol=1e-4)


def test_without_the_plugin_the_layer_is_measured_or_kept_as_it_is():
    """fx cannot trace the layer and says which module to write a handler for; torch.export captures
    it, and no handler understands its op (linalg_multi_dot): the equivariance probe measures it and
    finds the plugin's own groups. Without the probe its units stay fixed, with a warning."""
    from mudsc_graph import TraceError

    reg = R.Registry.from_plugin_manager(R.make_plugin_manager(load_entry_points=False))
    model = example.lowrank_mlp().eval()
    x = (torch.randn(2, 1, 8, 8),)
    with pytest.raises(TraceError, match=r"LowRankLinear\).*register a LayerHandler for LowRankLinear"):
        analyze(model, x, registry=reg, tracer="fx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measured = analyze(model, x, registry=reg)
    handled = analyze(model, x)
    assert [(g.size, g.fixed, sorted(g.members)) for g in measured.groups] == [(g.size, g.fixed, sorted(g.members)) for g in handled.groups]
    assert measured.permutable_units == 72
    measured.check(model, x)
    with pytest.warns(UserWarning, match="unsupported op aten.linalg_multi_dot"):
        spec = analyze(model, x, registry=reg, probe=False)
    assert spec.permutable_units == 0
    spec.check(model, x)


def test_cli_sees_the_plugin(monkeypatch):
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    R.reset_registry()
    try:
        result = CliRunner().invoke(app, ["inspect", "--arch", "example_lowrank_mlp", "--check"])
        assert result.exit_code == 0, result.output
        assert "72 permutable units" in result.output
        listed = CliRunner().invoke(app, ["plugins", "--json"])
        assert "example.LowRankLinear" in listed.output
    finally:
        R.reset_registry()


def _plugin_registry(monkeypatch):
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    return R.Registry.from_plugin_manager(R.make_plugin_manager())


def _lowrank_pair(reg):
    arch = reg.architecture("example_lowrank_mlp")
    torch.manual_seed(0)
    model, x = arch.build().eval(), arch.example_inputs(4)
    spec = analyze(model, x, registry=reg)
    return model, spec.apply_permutation(model, spec.random_permutation(seed=3)), x


def test_a_plugins_matcher_is_a_method_by_name(monkeypatch):
    """The example plugin's `greedy` matcher (registered through its entry point) is selectable as
    merge(method="greedy") and as merge(method="mudsc", mode="greedy"), and merges a permuted copy back."""
    reg = _plugin_registry(monkeypatch)
    assert reg.matcher_plugins["greedy"] == "example" and "greedy" in reg.method_names()
    model, twin, x = _lowrank_pair(reg)
    data = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    for options in (dict(method="greedy"), dict(method="mudsc", mode="greedy", alpha=0.3)):
        result = merge([model, twin], data=data, registry=reg, reset_bn=False, max_iter=2, **options)
        assert result.mode == "greedy"
        torch.testing.assert_close(result.model(*x), model(*x), rtol=1e-4, atol=1e-4)


def test_a_matcher_without_block_support_leaves_block_groups_averaged(monkeypatch):
    """supports_blocks=False is honoured: attention heads are not handed to the matcher; they are
    averaged in place, with a warning, and the plain groups are still matched."""
    reg = _plugin_registry(monkeypatch)
    arch = reg.architecture("vit_tiny")
    torch.manual_seed(0)
    model = arch.build().eval()
    calls = []
    real = reg.matchers["greedy"].match
    object.__setattr__(reg.matchers["greedy"], "match", lambda sims, n, blocks=1, **kw: calls.append(blocks) or real(sims, n, blocks, **kw))
    with pytest.warns(UserWarning, match="cannot match blocks: 8 block groups"):
        result = merge([model, arch.build().eval()], data=[arch.example_inputs(4)], method="greedy", registry=reg, max_iter=1)
    assert calls and set(calls) == {1}
    blocked = {g.id for g in result.spec.free_groups() if g.blocks > 1}
    assert blocked and not blocked & set(result.matchings)


def test_mudsc_merge_takes_the_plugins_method(monkeypatch, tmp_path):
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    R.reset_registry()
    try:
        model, twin, _ = _lowrank_pair(R.get_registry())
        torch.save(model.state_dict(), tmp_path / "a.pt")
        torch.save(twin.state_dict(), tmp_path / "b.pt")
        out = tmp_path / "m.safetensors"
        result = CliRunner().invoke(app, ["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--arch", "example_lowrank_mlp",
                                          "--data", "digits", "--samples", "64", "--method", "greedy", "--out", str(out), "--quiet", "--json"])
        assert result.exit_code == 0, result.output
        assert '"mode": "greedy"' in result.output and out.is_file()
    finally:
        R.reset_registry()


def test_a_plugins_matcher_parameter_from_merge_the_command_line_and_the_listing(monkeypatch, tmp_path):
    """greedy's declared threshold: merge(matcher_options=...) and --matcher-opt pass it (a threshold
    of 1 trusts no pair, so every unit keeps its order: the plain average), mudsc plugins lists it,
    the merged checkpoint records it, and a bad value is one line."""
    import json

    from mudsc_graph.io.checkpoints import load_checkpoint

    reg = _plugin_registry(monkeypatch)
    model, twin, x = _lowrank_pair(reg)
    data = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    matched = merge([model, twin], data=data, registry=reg, reset_bn=False, method="greedy")
    torch.manual_seed(5)
    other = reg.architecture("example_lowrank_mlp").build().eval()  # independent: no pair is similar to 1
    untrusted = merge([model, other], data=data, registry=reg, reset_bn=False, method="greedy", matcher_options={"threshold": 1.0})
    average = merge([model, other], data=data, registry=reg, reset_bn=False, method="average")
    torch.testing.assert_close(matched.model(*x), model(*x), rtol=1e-4, atol=1e-4)
    assert untrusted.matcher_options == {"threshold": 1.0}
    for k, v in average.model.state_dict().items():
        torch.testing.assert_close(untrusted.model.state_dict()[k], v, msg=k)

    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    R.reset_registry()
    try:
        torch.save(model.state_dict(), tmp_path / "a.pt")
        torch.save(twin.state_dict(), tmp_path / "b.pt")
        common = ["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--arch", "example_lowrank_mlp", "--data", "digits",
                  "--samples", "64", "--method", "greedy", "--quiet"]
        out = tmp_path / "m.pt"
        result = CliRunner().invoke(app, [*common, "--matcher-opt", "threshold=0.25", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert load_checkpoint(out)[1]["matcher_options"] == {"threshold": 0.25}
        bad = CliRunner().invoke(app, [*common, "--matcher-opt", "threshold=2", "--out", str(tmp_path / "n.pt")])
        assert bad.exit_code == 1 and "threshold must be a finite number >= -1 and <= 1, got 2.0" in bad.output
        listing = json.loads(CliRunner().invoke(app, ["plugins", "--json"]).output)
        example = next(r for r in listing if r["name"] == "example")
        assert example["matchers"]["greedy"][0] == {"name": "threshold", "type": "float", "default": -1.0, "minimum": -1.0, "maximum": 1.0,
                                                    "description": "pairs less similar than this keep their order"}
    finally:
        R.reset_registry()
