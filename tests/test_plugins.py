"""Plugins: custom layer handlers through the hook, conflicts, validation, entry points."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn as nn

from mudsc_graph import LayerHandler, PluginError, analyze, hookimpl, registry_with
from mudsc_graph.plugin import registry as registry_mod
from mudsc_graph.errors import UnsupportedOpError


class ScaledLinear(nn.Module):
    """A custom layer written with tensordot, which no built-in handler understands."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.scale = nn.Parameter(torch.rand(o) + 0.5)

    def forward(self, x):
        return torch.tensordot(x, self.weight, dims=([1], [1])) * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ScaledLinear(6, 16)
        self.b = ScaledLinear(16, 12)
        self.c = nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _scaled_linear(ctx):
    x = ctx.input(0)
    ctx.contract(x.axis(-1), ctx.param("weight", 1))
    ctx.link(ctx.param("scale", 0), ctx.param("weight", 0))
    out = ctx.like(x)
    out[-1] = ctx.param("weight", 0)
    ctx.set_output(out)


class ScaledLinearPlugin:
    @hookimpl
    def mudsc_layer_handlers(self):
        return [LayerHandler("test.ScaledLinear", "call_module", (ScaledLinear,), _scaled_linear)]


def _inputs():
    return (torch.randn(5, 6, generator=torch.Generator().manual_seed(0)),)


def test_without_a_handler_the_custom_op_is_measured_or_kept_fixed_with_a_warning():
    """No handler for tensordot: the equivariance probe measures it and finds the handler's groups
    (weight rows and scale with the next layer's columns; the columns read, as a handler records);
    without the probe the op is kept fixed with a warning, and strict mode refuses it."""
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = analyze(model, _inputs(), strict=True)
    handled = analyze(model, _inputs(), registry=registry_with(ScaledLinearPlugin()))
    assert [(g.size, g.fixed, sorted(g.members)) for g in spec.groups] == [(g.size, g.fixed, sorted(g.members)) for g in handled.groups]
    assert spec.consumed == {"a.weight": [1], "b.weight": [1], "c.weight": [1]}
    spec.check(model, _inputs())
    with pytest.warns(UserWarning, match="tensordot"):
        spec = analyze(model, _inputs(), probe=False)
    assert spec.permutable_units < 28
    spec.check(model, _inputs())
    with pytest.raises(UnsupportedOpError, match="tensordot"):
        analyze(model, _inputs(), strict=True, probe=False)


def test_a_registered_handler_merges_through_the_custom_module():
    torch.manual_seed(0)
    model = Net()
    reg = registry_with(ScaledLinearPlugin())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = analyze(model, _inputs(), registry=reg, strict=True)
    assert spec.permutable_units == 16 + 12
    hidden = [g for g in spec.free_groups() if g.size == 16][0]
    assert {("a.weight", 0), ("a.scale", 0), ("b.weight", 1)} <= set(hidden.members)
    assert spec.consumed["b.weight"] == [1] and "a.scale" not in spec.consumed
    for seed in range(3):
        spec.check(model, _inputs(), seed=seed)
    # a permuted copy really differs in its weights, and computes the same function
    perm = spec.random_permutation(seed=1)
    twin = spec.apply_permutation(model, perm)
    assert not torch.equal(twin.a.weight, model.a.weight)
    x = _inputs()
    torch.testing.assert_close(twin(*x), model(*x), rtol=1e-5, atol=1e-5)


def test_two_plugins_for_one_target_is_an_error_naming_both():
    class Other:
        @hookimpl
        def mudsc_layer_handlers(self):
            return [LayerHandler("other.ScaledLinear", "call_module", (ScaledLinear,), _scaled_linear)]

    with pytest.raises(PluginError) as err:
        registry_with(ScaledLinearPlugin(), Other())
    msg = str(err.value)
    assert "test.ScaledLinear" in msg and "other.ScaledLinear" in msg and "\n" not in msg


def test_higher_priority_overrides_a_builtin():
    calls = []

    def linear_spy(ctx):
        calls.append(ctx.node.name)
        from mudsc_graph.analysis import rules

        rules.nn_linear(ctx)

    class Override:
        @hookimpl
        def mudsc_layer_handlers(self):
            return [LayerHandler("spy.Linear", "call_module", (nn.Linear,), linear_spy, priority=10)]

    reg = registry_with(Override())
    analyze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(3, 4),), registry=reg)
    assert calls == ["_0", "_2"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="bad name!", opcode="call_module", targets=(nn.Linear,)), "invalid"),
        (dict(name="x", opcode="call_thing", targets=(nn.Linear,)), "opcode"),
        (dict(name="x", opcode="call_method", targets=(nn.Linear,)), "method names"),
        (dict(name="x", opcode="call_module", targets=("view",)), "module classes"),
        (dict(name="x", opcode="call_module", targets=()), "non-empty"),
    ],
)
def test_handler_records_validate_themselves(kwargs, match):
    with pytest.raises(PluginError, match=match):
        LayerHandler(propagate=_scaled_linear, **kwargs)


def test_a_hook_returning_the_wrong_record_type_is_named():
    class Wrong:
        @hookimpl
        def mudsc_layer_handlers(self):
            return ["not a record"]

    with pytest.raises(PluginError, match="LayerHandler"):
        registry_with(Wrong())


def test_a_misspelt_hook_fails_loudly():
    class Misspelt:
        @hookimpl
        def mudsc_layer_handler(self):  # missing "s"
            return []

    with pytest.raises(Exception, match="mudsc_layer_handler"):
        registry_with(Misspelt())


class _FakeEntryPoint:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"fake:{name}", obj, error

    def load(self):
        if self._error:
            raise self._error
        return self._obj


def test_entry_point_plugins_load_and_broken_ones_only_warn(monkeypatch):
    plugin = types.SimpleNamespace(mudsc_layer_handlers=ScaledLinearPlugin().mudsc_layer_handlers)
    eps = [_FakeEntryPoint("good", plugin), _FakeEntryPoint("broken", error=ImportError("no module named nope"))]
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: eps if group == "mudsc" else [])
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    with pytest.warns(UserWarning, match="broken"):
        pm = registry_mod.make_plugin_manager()
    assert pm.has_plugin("good") and not pm.has_plugin("broken")
    reg = registry_mod.Registry.from_plugin_manager(pm)
    assert reg.handler_for("call_module", ScaledLinear).name == "test.ScaledLinear"

    monkeypatch.setenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert not registry_mod.make_plugin_manager().has_plugin("good")
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("MUDSC_PLUGINS", "other")
    assert not registry_mod.make_plugin_manager().has_plugin("good")


def test_trace_variable_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("MUDSC_TRACE_PLUGINS", "1")
    monkeypatch.setenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry_mod.Registry.from_plugin_manager(registry_mod.make_plugin_manager())
    err = capsys.readouterr().err
    assert "mudsc_layer_handlers" in err and "mudsc_plugins.layers" in err


def test_builtins_register_through_the_hooks():
    pm = registry_mod.make_plugin_manager(load_entry_points=False)
    names = {impl.plugin_name for impl in pm.hook.mudsc_layer_handlers.get_hookimpls()}
    assert "mudsc_plugins.layers" in names
    names = {impl.plugin_name for impl in pm.hook.mudsc_architectures.get_hookimpls()}
    assert "mudsc_plugins.architectures" in names


def test_hook_mudsc_layer_handlers():
    reg = registry_with(ScaledLinearPlugin())
    h = reg.handler_for("call_module", ScaledLinear)
    assert h.name == "test.ScaledLinear" and reg.handler_plugins[h.name] == "extra-0"
    assert ("call_module", ScaledLinear) in reg.handlers and ScaledLinear in reg.leaf_module_types()


def test_hook_mudsc_architectures():
    from mudsc_graph import Architecture

    class Archs:
        @hookimpl
        def mudsc_architectures(self):
            return [Architecture("tiny_mlp", factory=lambda hidden=8: nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2)),
                                 example_inputs=lambda b: (torch.randn(b, 4),), aliases=("tiny-mlp2",))]

    reg = registry_with(Archs())
    arch = reg.architecture("TINY_MLP2")
    model = arch.build(hidden=6)
    spec = analyze(model, arch.example_inputs(3))
    assert spec.permutable_units == 6
    with pytest.raises(PluginError, match="did you mean tiny_mlp"):
        reg.architecture("tiny_mpl")


def test_hooks_are_called_through_pluggy_so_wrappers_see_them():
    """A plugin's hook wrapper sees the registry's call, and a plugin that returns None (no records)
    does not shift whose records are whose."""
    import pluggy

    from mudsc_graph import Architecture

    seen = []

    class Wrapper:
        @pluggy.HookimplMarker("mudsc")(wrapper=True)
        def mudsc_architectures(self):
            seen.append("before")
            result = yield
            seen.append(len(result))
            return result

    class Nothing:
        @hookimpl
        def mudsc_architectures(self):
            return None

    class One:
        @hookimpl
        def mudsc_architectures(self):
            return [Architecture("one_more", factory=lambda: torch.nn.Linear(2, 2), example_inputs=lambda b: (torch.randn(b, 2),))]

    reg = registry_with(Wrapper(), One(), Nothing())
    assert seen and seen[0] == "before"
    assert reg.architecture("one_more").name == "one_more"
    assert reg.arch_plugins["one_more"] == "extra-1"  # One, the second extra plugin


def test_a_merge_refuses_groups_its_self_check_rejects():
    """A plugin's Linear handler that links nothing (every output its own fresh, free space): the
    merge stops before merging and says the self-check failed, instead of returning a wrong model."""
    from mudsc_graph import merge
    from mudsc_graph.merging.options import MergeError

    def links_nothing(ctx):
        out = ctx.like(ctx.input(0))
        out[-1] = ctx.param("weight", 0)
        ctx.set_output(out)

    class Broken:
        @hookimpl
        def mudsc_layer_handlers(self):
            return [LayerHandler("broken.Linear", "call_module", (nn.Linear,), links_nothing, priority=10)]

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
    data = [torch.randn(6, 4)]
    with pytest.raises(MergeError, match="failed their self-check"):
        merge(models, data=data, registry=registry_with(Broken()), method="zipit")
    assert merge(models, data=data, method="zipit").spec.permutable_units == 8


def test_plugins_that_exit_raise_or_are_missing_only_warn(monkeypatch):
    """A plugin calling sys.exit at import made every command exit silently; one whose hook raises
    gave a traceback in `mudsc plugins`; MUDSC_PLUGINS naming no installed plugin said nothing."""

    class Raises:
        @hookimpl
        def mudsc_layer_handlers(self):
            raise RuntimeError("boom")

    eps = [_FakeEntryPoint("exits", error=SystemExit(3)), _FakeEntryPoint("raises", Raises()), _FakeEntryPoint("good", ScaledLinearPlugin())]
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: eps if group == "mudsc" else [])
    monkeypatch.delenv("MUDSC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("MUDSC_PLUGINS", raising=False)
    with pytest.warns(UserWarning, match=r"'exits'.*sys.exit\(3\)"):
        pm = registry_mod.make_plugin_manager()
    with pytest.warns(UserWarning, match=r"'raises': mudsc_layer_handlers\(\) raised RuntimeError: boom"):
        reg = registry_mod.Registry.from_plugin_manager(pm)
    assert reg.handler_for("call_module", ScaledLinear).name == "test.ScaledLinear"  # the others still count
    monkeypatch.setenv("MUDSC_PLUGINS", "good,nosuchplugin")
    with pytest.warns(UserWarning, match="MUDSC_PLUGINS names nosuchplugin, which no installed package provides"):
        assert registry_mod.make_plugin_manager().has_plugin("good")
