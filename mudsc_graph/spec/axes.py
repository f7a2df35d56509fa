"""Axis expressions: what the positions of one tensor axis are, in units of merge groups.

An expression is a tree of six frozen node kinds (JSON form in brackets, as saved in a MergeSpec):

- :class:`Units` ``(gid)`` [``["g", gid]``]: exactly the units of group ``gid``, in order;
- :class:`Fixed` ``(n)`` [``["fixed", n]``]: ``n`` positions that never move (kernel taps, ...);
- :class:`Concat` ``(parts)`` [``["sum", [e1, e2, ...]]``]: concatenation (fused qkv rows);
- :class:`Kron` ``(major, minor)`` [``["kron", a, b]``]: row-major product, one side fixed
  (conv -> flatten -> Linear columns are ``Kron(Units(c), Fixed(H*W))``);
- :class:`GroupedIn` ``(space, groups)`` [``["inner", e, groups]``]: a grouped convolution's
  ``in/groups`` weight axis: for a row in block ``j`` of axis 0, the units inside block ``j`` of ``space``
  (also the hidden units of experts stored as one ``(experts, hidden, ...)`` tensor: block ``j`` is expert ``j``'s);
- :class:`Interleave` ``(parts, blocks)`` [``["interleave", [e1, e2, ...], blocks]``]: ``blocks``
  segments, segment ``j`` the concatenation of block ``j`` of every part (head-major fused rows:
  ``view(B, N, heads, 3 * d).chunk(3, -1)`` gives, per head, its Q, K and V rows: the parts are the
  Q/K, Q/K and V/O block groups, which move their blocks together).

Every walker goes through :func:`match` (one step, children as they are) or :func:`fold`
(bottom-up, children already folded). JSON exists only at the MergeSpec boundary (:func:`to_json`,
:func:`from_json`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch

from ..errors import SpecError

R = TypeVar("R")


class _Cases(NamedTuple):
    """One function per node kind (see :func:`match` and :func:`fold`)."""

    units: Callable[..., Any]
    fixed: Callable[..., Any]
    concat: Callable[..., Any]
    kron: Callable[..., Any]
    grouped_in: Callable[..., Any]
    interleave: Callable[..., Any]


def _check_child(e: Any) -> None:
    if not isinstance(e, NODES):
        raise TypeError(f"not an axis expression: {e!r} (convert JSON lists with mudsc_graph.spec.axes.from_json)")


@dataclass(frozen=True)
class Units:
    """The units of group ``gid``, in order."""

    gid: int

    def _match(self, on: _Cases) -> Any:
        return on.units(self.gid)

    _fold = _match


@dataclass(frozen=True)
class Fixed:
    """``n`` positions that never move."""

    n: int

    def _match(self, on: _Cases) -> Any:
        return on.fixed(self.n)

    _fold = _match


@dataclass(frozen=True)
class Concat:
    """The positions of ``parts``, one after the other (a list given is stored as a tuple)."""

    parts: tuple[Expr, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        for p in self.parts:
            _check_child(p)

    def _match(self, on: _Cases) -> Any:
        return on.concat(self.parts)

    def _fold(self, on: _Cases) -> Any:
        return on.concat([p._fold(on) for p in self.parts])


@dataclass(frozen=True)
class Kron:
    """Row-major product: position ``i * size(minor) + j`` is ``(major[i], minor[j])``."""

    major: Expr
    minor: Expr

    def __post_init__(self) -> None:
        _check_child(self.major)
        _check_child(self.minor)

    def _match(self, on: _Cases) -> Any:
        return on.kron(self.major, self.minor)

    def _fold(self, on: _Cases) -> Any:
        return on.kron(self.major._fold(on), self.minor._fold(on))


@dataclass(frozen=True)
class GroupedIn:
    """A grouped conv's ``in/groups`` axis: block ``j`` of ``space`` for the rows of block ``j``."""

    space: Expr
    groups: int

    def __post_init__(self) -> None:
        _check_child(self.space)

    def _match(self, on: _Cases) -> Any:
        return on.grouped_in(self.space, self.groups)

    def _fold(self, on: _Cases) -> Any:
        return on.grouped_in(self.space._fold(on), self.groups)


@dataclass(frozen=True)
class Interleave:
    """``blocks`` segments; segment ``j`` is block ``j`` of each part, one after the other (each part
    has ``blocks`` equal blocks: a block group's units or fixed positions)."""

    parts: tuple[Expr, ...]
    blocks: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        for p in self.parts:
            _check_child(p)

    def _match(self, on: _Cases) -> Any:
        return on.interleave(self.parts, self.blocks)

    def _fold(self, on: _Cases) -> Any:
        return on.interleave([p._fold(on) for p in self.parts], self.blocks)


Expr = Units | Fixed | Concat | Kron | GroupedIn | Interleave
NODES = (Units, Fixed, Concat, Kron, GroupedIn, Interleave)


def is_expr(e: Any) -> bool:
    """Whether ``e`` is a typed expression (not its JSON list)."""
    return isinstance(e, NODES)


def match(
    e: Expr,
    *,
    units: Callable[[int], R],
    fixed: Callable[[int], R],
    concat: Callable[[tuple[Expr, ...]], R],
    kron: Callable[[Expr, Expr], R],
    grouped_in: Callable[[Expr, int], R],
    interleave: Callable[[tuple[Expr, ...], int], R],
) -> R:
    """Call the function for ``e``'s kind with its fields (sub-expressions unevaluated)."""
    _check_child(e)
    return e._match(_Cases(units, fixed, concat, kron, grouped_in, interleave))


def fold(
    e: Expr,
    *,
    units: Callable[[int], R],
    fixed: Callable[[int], R],
    concat: Callable[[list[R]], R],
    kron: Callable[[R, R], R],
    grouped_in: Callable[[R, int], R],
    interleave: Callable[[list[R], int], R],
) -> R:
    """Bottom-up: each function gets its node's fields with sub-expressions already folded."""
    _check_child(e)
    return e._fold(_Cases(units, fixed, concat, kron, grouped_in, interleave))


def relabel(e: Expr, units: Callable[[int], Expr]) -> Expr:
    """``e`` with every ``Units(gid)`` replaced by ``units(gid)``."""
    return fold(e, units=units, fixed=Fixed, concat=Concat, kron=Kron, grouped_in=GroupedIn, interleave=Interleave)


# -- JSON --------------------------------------------------------------------------------------------
def to_json(e: Expr) -> list:
    """The JSON list of ``e`` (``["g", 3]``, ``["sum", [...]]``, ...)."""
    return fold(
        e,
        units=lambda g: ["g", g],
        fixed=lambda n: ["fixed", n],
        concat=lambda parts: ["sum", parts],
        kron=lambda a, b: ["kron", a, b],
        grouped_in=lambda s, g: ["inner", s, g],
        interleave=lambda parts, blocks: ["interleave", parts, blocks],
    )


def _count(x: Any, least: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < least:
        raise ValueError
    return x


_FROM_JSON: dict[str, Callable[..., Expr]] = {
    "g": lambda gid: Units(_count(gid, 0)),
    "fixed": lambda n: Fixed(_count(n, 0)),
    "sum": lambda parts: Concat(tuple(from_json(p) for p in parts)) if isinstance(parts, (list, tuple)) else _bad(),
    "kron": lambda a, b: Kron(from_json(a), from_json(b)),
    "inner": lambda space, groups: GroupedIn(from_json(space), _count(groups, 1)),
    "interleave": lambda parts, blocks: Interleave(tuple(from_json(p) for p in parts), _count(blocks, 1))
    if isinstance(parts, (list, tuple)) else _bad(),
}


def _bad() -> Expr:
    raise ValueError


def from_json(data: Sequence) -> Expr:
    """The expression of a JSON list; raises :class:`~mudsc_graph.errors.SpecError` if it is none."""
    make = _FROM_JSON.get(data[0]) if isinstance(data, (list, tuple)) and data and isinstance(data[0], str) else None
    try:
        if make is None:
            raise ValueError
        return make(*data[1:])
    except (TypeError, ValueError):
        raise SpecError(
            f"not an axis expression: {data!r} (expected ['g', id], ['fixed', n], ['sum', [...]], ['kron', a, b], ['inner', e, groups] "
            f"or ['interleave', [...], blocks])"
        ) from None


def as_expr(e: Expr | Sequence) -> Expr:
    """``e`` itself if typed, else the expression of its JSON list."""
    return e if is_expr(e) else from_json(e)


# -- queries -----------------------------------------------------------------------------------------
def group_ids(e: Expr) -> list[int]:
    """The group ids in ``e``, left to right, repeats kept (fused qkv rows name Q/K twice)."""
    return fold(
        e,
        units=lambda g: [g],
        fixed=lambda n: [],
        concat=lambda parts: [g for p in parts for g in p],
        kron=lambda a, b: a + b,
        grouped_in=lambda s, groups: s,
        interleave=lambda parts, blocks: [g for p in parts for g in p],
    )


def has_group(e: Expr, live: Callable[[int], bool] = lambda g: True) -> bool:
    """Whether a group of ``e`` is ``live`` (any group, by default)."""
    return any(live(g) for g in group_ids(e))


def _no(what: str, e: Expr, error: type[Exception] = ValueError) -> Any:
    raise error(f"axis expression {to_json(e)} has no {what}")


def size(e: Expr, sizes: Mapping[int, int]) -> int:
    """The number of positions of ``e`` (``sizes``: group id -> units); none for a ``GroupedIn``."""
    return fold(
        e,
        units=lambda g: sizes[g],
        fixed=lambda n: n,
        concat=sum,
        kron=lambda a, b: a * b,
        grouped_in=lambda s, g: _no("size", e),
        interleave=lambda parts, blocks: sum(parts),
    )


# -- rewriting ---------------------------------------------------------------------------------------
def _concat(parts: list[Expr]) -> Expr:
    if all(isinstance(p, Fixed) for p in parts):
        return Fixed(sum(p.n for p in parts))
    return Concat(parts)


def _kron(a: Expr, b: Expr) -> Expr:
    return Fixed(a.n * b.n) if isinstance(a, Fixed) and isinstance(b, Fixed) else Kron(a, b)


def _interleave(parts: list[Expr], blocks: int) -> Expr:
    if all(isinstance(p, Fixed) for p in parts):
        return Fixed(sum(p.n for p in parts))
    return Interleave(parts, blocks)


def simplify(e: Expr) -> Expr:
    """``e`` with every concatenation, product or interleaving of fixed parts made one ``Fixed``."""
    return fold(e, units=Units, fixed=Fixed, concat=_concat, kron=_kron, grouped_in=GroupedIn, interleave=_interleave)


def renumber(e: Expr, remap: Mapping[int, int], sizes: Mapping[int, int]) -> Expr:
    """New group ids from ``remap``; a group not in it becomes ``Fixed`` of its size in ``sizes``."""
    return relabel(e, lambda g: Units(remap[g]) if g in remap else Fixed(sizes[g]))


def grouped_axis(exprs: Sequence[Expr]) -> int:
    """The axis of a ``GroupedIn`` expression among ``exprs`` (1 when there is none: a conv's)."""
    return next((a for a, e in enumerate(exprs) if isinstance(e, GroupedIn)), 1)


def ungroup(exprs: Sequence[Expr]) -> tuple[list[Expr], int]:
    """The axes of a tensor with its ``GroupedIn`` axis replaced by the whole input space, and that
    axis's number of groups (0: no such axis): the expressions of the densified weight."""
    out, groups = [], []
    for e in exprs:
        if isinstance(e, GroupedIn):
            out.append(e.space)
            groups.append(e.groups)
        else:
            out.append(e)
    if len(groups) > 1:
        raise SpecError(f"a tensor has {len(groups)} grouped-convolution input axes; at most one is allowed")
    return out, groups[0] if groups else 0


# -- tensors -----------------------------------------------------------------------------------------
def index(e: Expr, perm: Mapping[int, torch.Tensor], sizes: Mapping[int, int]) -> torch.Tensor:
    """The index array of ``e`` under the permutation ``perm`` (group id -> LongTensor; missing:
    identity): position ``k`` of the new axis is position ``index[k]`` of the old one."""

    def units(g: int) -> torch.Tensor:
        p = perm.get(g)
        return p if p is not None else torch.arange(sizes[g])

    def concat(parts: list[torch.Tensor]) -> torch.Tensor:
        out, off = [], 0
        for idx in parts:
            out.append(idx + off)
            off += idx.numel()
        return torch.cat(out)

    def interleave(parts: list[torch.Tensor], blocks: int) -> torch.Tensor:
        widths = [idx.numel() // blocks for idx in parts]
        seg, cols, off = sum(widths), [], 0
        for idx, w in zip(parts, widths):  # new (block j, t) of a part -> old (its old block, t) in the old segment
            idx = idx.view(blocks, w)
            cols.append((idx // w) * seg + off + idx % w)
            off += w
        return torch.cat(cols, dim=1).reshape(-1)

    return fold(
        e,
        units=units,
        fixed=torch.arange,
        concat=concat,
        kron=lambda a, b: (a[:, None] * b.numel() + b[None, :]).reshape(-1),
        grouped_in=lambda s, g: _no("index array", e, SpecError),
        interleave=interleave,
    )


def take(t: torch.Tensor, e: Expr, gid: int, sizes: Mapping[int, int]) -> list[torch.Tensor]:
    """The slices of ``t`` (axis 0 carries ``e``) that are group ``gid``, each ``(units, ...)``.

    A group twice in a ``Concat`` (fused qkv rows: Q and K) gives two slices; through a ``Kron``
    the other factor becomes the slice's second axis.
    """

    def concat(parts: tuple[Expr, ...]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for piece, x in zip(t.split([size(x, sizes) for x in parts], dim=0), parts):
            out += take(piece, x, gid, sizes)
        return out

    def kron(a: Expr, b: Expr) -> list[torch.Tensor]:
        u = t.reshape(size(a, sizes), size(b, sizes), *t.shape[1:])
        return take(u, a, gid, sizes) or take(u.movedim(1, 0), b, gid, sizes)

    def interleave(parts: tuple[Expr, ...], blocks: int) -> list[torch.Tensor]:
        widths = [size(x, sizes) // blocks for x in parts]
        u = t.reshape(blocks, sum(widths), *t.shape[1:])
        out: list[torch.Tensor] = []
        for piece, x, w in zip(u.split(widths, dim=1), parts, widths):
            out += take(piece.reshape(blocks * w, *t.shape[1:]), x, gid, sizes)
        return out

    return match(
        e,
        units=lambda g: [t] if g == gid else [],
        fixed=lambda n: [],
        concat=concat,
        kron=kron,
        grouped_in=lambda s, g: [],
        interleave=interleave,
    )
