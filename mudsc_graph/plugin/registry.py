"""The plugin manager and the one :class:`Registry` that calls its hooks.

The manager is built by :func:`get_registry` on first use, never at import. Plugins come from
:data:`DEFAULT_PLUGINS` (the built-ins, registered through the same hooks as everybody else) and
from the ``mudsc`` entry-point group. Environment variables:

- ``MUDSC_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins (built-ins still load);
- ``MUDSC_PLUGINS=a,b``: load only the entry-point plugins with these names;
- ``MUDSC_TRACE_PLUGINS=1``: print each plugin's hook calls and what they register to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Iterable

import pluggy
import torch

from ..errors import PluginError, did_you_mean
from . import hookspecs
from .records import Architecture, Dataset, LayerHandler, MatchingStrategy, MergeMethod

ENTRY_POINT_GROUP = "mudsc"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "mudsc_plugins.layers",
    "mudsc_plugins.architectures",
    "mudsc_plugins.matching",
    "mudsc_plugins.datasets",
)


def make_plugin_manager(*, load_entry_points: bool | None = None, extra: Iterable[Any] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-ins, entry-point plugins and ``extra`` registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points is None:
        load_entry_points = not os.environ.get("MUDSC_DISABLE_PLUGIN_AUTOLOAD")
    if load_entry_points:
        allow = {n.strip() for n in os.environ.get("MUDSC_PLUGINS", "").split(",") if n.strip()}
        found = set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.add(ep.name)
            if allow and ep.name not in allow:
                continue
            if pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # a broken third-party plugin (even one that exits) must not break mudsc
                why = f"it called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else str(exc)
                warnings.warn(f"mudsc plugin {ep.name!r} ({ep.value}) failed to load and is skipped: {why}", stacklevel=2)
                continue
            pm.register(plugin, name=ep.name)
        unknown = sorted(allow - found)
        if unknown:
            warnings.warn(f"MUDSC_PLUGINS names {', '.join(unknown)}, which no installed package provides "
                          f"(installed: {', '.join(sorted(found)) or 'none'})", stacklevel=2)
    for i, plugin in enumerate(extra):
        pm.register(plugin, name=getattr(plugin, "__name__", None) or f"extra-{i}")
    pm.check_pending()
    return pm


@dataclass
class Registry:
    """Everything the plugins registered, flattened and checked for conflicts.

    ``handler_for(opcode, target)`` finds the layer handler of an fx node target: module classes
    are matched by exact class first, then along the class's MRO.
    """

    plugin_manager: pluggy.PluginManager
    handlers: dict[tuple[str, Any], LayerHandler] = field(default_factory=dict)
    handler_plugins: dict[str, str] = field(default_factory=dict)
    architectures: dict[str, Architecture] = field(default_factory=dict)
    arch_aliases: dict[str, str] = field(default_factory=dict)
    arch_plugins: dict[str, str] = field(default_factory=dict)
    matchers: dict[str, MatchingStrategy] = field(default_factory=dict)
    matcher_plugins: dict[str, str] = field(default_factory=dict)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    dataset_plugins: dict[str, str] = field(default_factory=dict)
    methods: dict[str, MergeMethod] = field(default_factory=dict)
    method_plugins: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> "Registry":
        reg = cls(pm)
        for plugin, records in _collect(pm, "mudsc_layer_handlers", LayerHandler):
            for h in records:
                reg._add_handler(h, plugin)
        for plugin, records in _collect(pm, "mudsc_architectures", Architecture):
            for a in records:
                reg._add_architecture(a, plugin)
        for plugin, records in _collect(pm, "mudsc_matching_strategies", MatchingStrategy):
            for m in records:
                _add_unique("matching strategy", reg.matchers, reg.matcher_plugins, m, plugin)
        for plugin, records in _collect(pm, "mudsc_datasets", Dataset):
            for d in records:
                _add_unique("dataset", reg.datasets, reg.dataset_plugins, d, plugin)
        for plugin, records in _collect(pm, "mudsc_merge_methods", MergeMethod):
            for m in records:
                _add_unique("merge method", reg.methods, reg.method_plugins, m, plugin)
        return reg

    def _add_handler(self, h: LayerHandler, plugin: str) -> None:
        if h.name in self.handler_plugins and self.handler_plugins[h.name] != plugin:
            raise PluginError(f"layer handler {h.name!r} is registered by both {self.handler_plugins[h.name]!r} and {plugin!r}: rename one")
        self.handler_plugins[h.name] = plugin
        for t in h.targets:
            key = (h.opcode, t)
            old = self.handlers.get(key)
            if old is None or h.priority > old.priority:
                self.handlers[key] = h
            elif h.priority == old.priority and old.name != h.name:
                raise PluginError(
                    f"{h.opcode} target {_target_name(t)} has two handlers of equal priority: {old.name!r} from plugin "
                    f"{self.handler_plugins[old.name]!r} and {h.name!r} from plugin {plugin!r}; raise one's priority or unregister one"
                )

    def _add_architecture(self, a: Architecture, plugin: str) -> None:
        for n in (a.name, *a.aliases):
            key = _norm(n)
            if key in self.arch_aliases:
                other = self.arch_aliases[key]
                raise PluginError(
                    f"architecture name {n!r} is registered by both {self.arch_plugins[other]!r} ({other}) and {plugin!r} ({a.name}); rename one"
                )
            self.arch_aliases[key] = a.name
        self.architectures[a.name] = a
        self.arch_plugins[a.name] = plugin

    def handler_for(self, opcode: str, target: Any) -> LayerHandler | None:
        """The handler of an fx node target, or ``None``.

        Module classes: the class itself, then its bases, but a base's handler only while the
        class still runs that base's ``forward`` (a subclass that overrides ``forward``, such as
        timm's ``LayerNorm2d(nn.LayerNorm)``, is traced through instead). ATen operators
        (``torch.ops.aten.linear.default``): the overload, then its packet (``aten.linear``), then
        the first of its tags with a handler (``torch.Tag.pointwise``).
        """
        if opcode == "call_module" and isinstance(target, type):
            for cls in target.__mro__:
                h = self.handlers.get((opcode, cls))
                if h is not None:
                    return h if runs_forward_of(target, cls) else None
            return None
        try:
            h = self.handlers.get((opcode, target))
        except TypeError:  # unhashable target
            return None
        if h is None and isinstance(target, torch._ops.OpOverload):
            h = self.handlers.get((opcode, target.overloadpacket))
            for tag in target.tags if h is None else ():
                h = self.handlers.get((opcode, tag))
                if h is not None:
                    break
        return h

    def leaf_module_types(self) -> tuple[type, ...]:
        return tuple(t for (op, t) in self.handlers if op == "call_module")

    def is_leaf(self, module: Any) -> bool:
        """Whether a module has a ``call_module`` handler (then fx traces it as one leaf node)."""
        return self.handler_for("call_module", type(module)) is not None

    def matcher(self, name: str) -> MatchingStrategy:
        m = self.matchers.get(name)
        if m is None:
            raise PluginError(f"unknown matching strategy {name!r}; registered: {', '.join(sorted(self.matchers))}")
        return m

    def method_names(self) -> list[str]:
        """Every name ``merge(method=...)`` accepts: the methods, then matchers no method names."""
        named = {m.matcher for m in self.methods.values()}
        return list(self.methods) + [n for n in self.matchers if n not in named and n not in self.methods]

    def merge_method(self, name: Any) -> MergeMethod:
        """The method called ``name``; a matching strategy's name is a method of its own (dual
        space, the ``alpha`` argument). An unknown name is a :class:`PluginError` listing them."""
        m = self.methods.get(name) if isinstance(name, str) else None
        if m is not None:
            return m
        if isinstance(name, str) and name in self.matchers:
            return MergeMethod(name, matcher=name, description=self.matchers[name].description)
        names = self.method_names()
        hint = did_you_mean(name, names, n=2) if isinstance(name, str) else ""
        raise PluginError(f"unknown method {name!r}{hint} (choose one of {', '.join(names)})")

    def dataset(self, name: str) -> Dataset:
        d = self.datasets.get(name)
        if d is None:
            hint = did_you_mean(name, self.datasets, cutoff=0.5)
            raise PluginError(f"unknown dataset {name!r}{hint} (registered: {', '.join(sorted(self.datasets))})")
        return d

    def architecture(self, name: str) -> Architecture:
        """Look up an architecture by name or alias (case, '-' and '_' insensitive)."""
        key = self.arch_aliases.get(_norm(name))
        if key is None:
            hint = did_you_mean(_norm(name), self.arch_aliases, cutoff=0.5, shown=self.arch_aliases.__getitem__)
            raise PluginError(f"unknown architecture {name!r}{hint} (see `mudsc inspect --list`)")
        return self.architectures[key]


def runs_forward_of(cls: type, base: type) -> bool:
    """Whether instances of ``cls`` run ``base.forward`` (``cls`` does not override it)."""
    return getattr(cls, "forward", None) is getattr(base, "forward", None)


def _add_unique(kind: str, table: dict, owners: dict, record: Any, plugin: str) -> None:
    if record.name in table:
        raise PluginError(f"{kind} {record.name!r} is registered by both {owners[record.name]!r} and {plugin!r}; rename one")
    table[record.name] = record
    owners[record.name] = plugin


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def _target_name(t: Any) -> str:
    if isinstance(t, str):
        return repr(t)
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch.Tag)):
        return str(t)
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', repr(t))}"


def _collect(pm: pluggy.PluginManager, hook: str, record_type: type) -> list[tuple[str, list]]:
    """Every plugin's records for ``hook``, with the plugin's name.

    The hook is called through pluggy (``pm.hook.NAME()``), so pluggy's wrappers, tracing and call
    monitoring see it. Its results come in pluggy's call order (the implementations in reverse
    registration order, ``None`` results dropped); when a plugin returned ``None`` or a wrapper
    changed the list, each implementation is called on its own (still through pluggy) to know
    whose records are whose.
    """
    caller = getattr(pm.hook, hook)
    called = [impl for impl in reversed(caller.get_hookimpls()) if not (impl.hookwrapper or impl.wrapper)]
    try:
        results = caller()
    except Exception:  # some plugin's hook raised: call each on its own to skip only that one
        results = None
    if results is None or len(results) != len(called):
        results = [_call_one(pm, hook, impl) for impl in called]
    trace = bool(os.environ.get("MUDSC_TRACE_PLUGINS"))
    out = []
    for impl, result in zip(called, results):
        records = list(result or ())
        if trace:
            print(f"[mudsc plugins] {impl.plugin_name}.{hook}() -> {len(records)} records: "
                  f"{', '.join(getattr(r, 'name', '?') for r in records)}", file=sys.stderr)
        for r in records:
            if not isinstance(r, record_type):
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook}() must return {record_type.__name__} records, got {type(r).__name__}")
        out.append((impl.plugin_name, records))
    out.reverse()  # registration order: built-ins first, as before
    return out


def _call_one(pm: pluggy.PluginManager, hook: str, impl: Any) -> Any:
    """One plugin's result of ``hook`` (through pluggy); a hook that raises is skipped with a warning."""
    others = [p for p in pm.get_plugins() if p is not impl.plugin]
    try:
        result = pm.subset_hook_caller(hook, others)()
    except Exception as exc:
        warnings.warn(f"mudsc plugin {impl.plugin_name!r}: {hook}() raised {type(exc).__name__}: {str(exc)[:200]}; "
                      "what it registers there is skipped", stacklevel=3)
        return None
    return result[0] if result else None


_DEFAULT: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry.from_plugin_manager(make_plugin_manager())
    return _DEFAULT


def reset_registry() -> None:
    """Forget the cached registry (after installing or registering plugins at run time)."""
    global _DEFAULT
    _DEFAULT = None


def registry_with(*plugins: Any) -> Registry:
    """A registry with the default plugins plus ``plugins`` (modules or objects with hookimpls)."""
    return Registry.from_plugin_manager(make_plugin_manager(extra=plugins))


__all__ = ["Registry", "get_registry", "reset_registry", "registry_with", "make_plugin_manager"]
