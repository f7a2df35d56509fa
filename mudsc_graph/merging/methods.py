"""Which method a merge runs: the registered :class:`~mudsc_graph.MergeMethod` record, its
:class:`~mudsc_graph.MatchingStrategy`, the mode it reports and the alpha it uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PluginError
from ..plugin.records import MatchingStrategy, MergeMethod
from ..plugin.registry import Registry
from .options import MergeError, MergeOptions


@dataclass(frozen=True)
class ResolvedMethod:
    """What one merge runs: the method record, its matching strategy, the mode it reports and alpha."""

    method: MergeMethod
    matcher: MatchingStrategy
    mode: str
    alpha: float
    matcher_options: dict[str, Any] = field(default_factory=dict, hash=False)
    """Every declared parameter of the matcher: the user's values, checked, and the defaults."""

    @property
    def needs_activations(self) -> bool:
        return self.method.needs_activations(self.alpha)


def resolve_method(registry: Registry, options: MergeOptions) -> ResolvedMethod:
    """The method, matcher, mode and alpha of a merge; one clear :class:`MergeError` for a bad one."""
    try:
        record = registry.merge_method(options.method)
    except PluginError as exc:
        raise MergeError(str(exc)) from None
    if record.alpha is None and not 0.0 <= options.alpha <= 1.0:
        raise MergeError(f"alpha must lie in [0, 1], got {options.alpha}")
    name = record.matcher_for(options.mode)
    if name not in registry.matchers:
        choices = ", ".join(n for n in registry.matchers if n != "identity")
        raise MergeError(f"unknown mode {options.mode!r} for method {record.name!r}; choose one of {choices}")
    label = name if record.matcher is None else {"identity": "average"}.get(name, name)
    matcher = registry.matcher(name)
    given = {**options.legacy_zip_options(), **options.matcher_options} if matcher.name == "zip" else options.matcher_options
    try:
        values = matcher.options(given)
    except ValueError as exc:
        raise MergeError(f"{exc} (method {record.name!r})") from None
    return ResolvedMethod(record, matcher, label, record.alpha_for(options.alpha), values)
