"""Helpers shared by the rules: re-indexing layouts, reading parameters."""

from __future__ import annotations

from typing import Any

from ..propagate import OpContext, Value
from ..spaces import Dep, Layout


def rebase(ctx: OpContext, layout: Layout, mapping: dict[int, int]) -> Layout:
    """Re-index ``layout``'s refs by ``mapping``; a ref outside it collapses that level."""
    if isinstance(layout, int):
        return layout
    if layout.ref not in mapping:
        return ctx.spaces.collapse(layout)
    return Dep(mapping[layout.ref], tuple(rebase(ctx, p, mapping) for p in layout.parts))


def _dims(arg: Any, ndim: int) -> list[int] | None:
    if arg is None:
        return None
    if isinstance(arg, int):
        return [arg % ndim]
    return sorted(int(a) % ndim for a in arg)


def param_value(ctx: OpContext, name: str) -> Value | None:
    if not ctx.has_param(name):
        return None
    t = getattr(ctx.module, name)
    return Value(tuple(t.shape), [ctx.param(name, i) for i in range(t.dim())])


def _plain(ctx: OpContext, L: Layout) -> Layout:
    return ctx.spaces.collapse(L)
