"""``mudsc plugins``: which plugins are loaded, from where, and what they register."""

import json
from types import ModuleType
from typing import Any

import typer
from rich.table import Table

from .console import out
from .options import JsonOption

#: How many registered names a cell of the table shows (``--json`` lists them all).
NAMES_SHOWN = 6


def _top_level_module(plugin: Any) -> str:
    module = plugin.__name__ if isinstance(plugin, ModuleType) else getattr(plugin, "__module__", None)
    return (module or "").split(".")[0]


def plugin_version(name: str, plugin: Any) -> str:
    """The version of the distribution a plugin comes from, or ``"built-in"``."""
    from importlib.metadata import PackageNotFoundError, entry_points, packages_distributions, version

    from mudsc_graph.plugin.registry import DEFAULT_PLUGINS, ENTRY_POINT_GROUP

    if name in DEFAULT_PLUGINS:
        return "built-in"
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        if ep.name == name and dist is not None:
            return dist.version
    for dist_name in packages_distributions().get(_top_level_module(plugin), ()):
        try:
            return version(dist_name)
        except PackageNotFoundError:  # pragma: no cover - stale metadata
            continue
    return "built-in"


def plugin_rows(registry: Any) -> list[dict[str, Any]]:
    """One dict per loaded plugin: name, version, hooks it implements, names it registers."""
    pm = registry.plugin_manager
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        hooks = sorted(caller.name for caller in (pm.get_hookcallers(plugin) or ()))
        rows.append(
            {
                "name": name,
                "version": plugin_version(name, plugin),
                "hooks": hooks,
                "layer_handlers": sorted(h for h, p in registry.handler_plugins.items() if p == name),
                "architectures": sorted(a for a, p in registry.arch_plugins.items() if p == name),
                "matchers": {m: [_parameter(q) for q in registry.matchers[m].parameters]
                             for m, p in sorted(registry.matcher_plugins.items()) if p == name},
            }
        )
    return rows


def _parameter(p: Any) -> dict[str, Any]:
    return {"name": p.name, "type": p.kind, "default": p.default, "description": p.description,
            **({"minimum": p.minimum} if p.minimum is not None else {}), **({"maximum": p.maximum} if p.maximum is not None else {}),
            **({"choices": list(p.choices)} if p.choices else {})}


def _matchers(matchers: dict[str, list[dict[str, Any]]]) -> str:
    """``zip(a=0.5, b=1)``-style: each matcher with its parameters' defaults."""
    if not matchers:
        return ""
    shown = [m + "(" + ", ".join(f"{q['name']}={q['default']!r}" for q in params) + ")" if params else m for m, params in matchers.items()]
    return f"{len(shown)} matchers: {', '.join(shown)}"


def _names(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown += f", ... (+{len(names) - NAMES_SHOWN})"
    return f"{len(names)} {kind}: {shown}"


def plugins_command(
    as_json: JsonOption = False,
) -> None:
    """List the loaded plugins: where they come from, which hooks they implement and what they register."""
    from mudsc_graph.plugin.registry import get_registry

    rows = plugin_rows(get_registry())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="loaded plugins")
    table.add_column("name", no_wrap=True)
    table.add_column("version")
    table.add_column("hooks", no_wrap=True)
    table.add_column("registers", overflow="fold")
    for r in rows:
        registers = "\n".join(
            s for s in (_names("layer handlers", r["layer_handlers"]), _names("architectures", r["architectures"]), _matchers(r["matchers"])) if s
        )
        table.add_row(r["name"], r["version"], "\n".join(r["hooks"]), registers)
    out().print(table)
