"""Unit spaces: union-find over tensor axes, with structure.

A *space* is an equivalence class of tensor axes that index the same units. Every axis of every
value in the graph, and every parameter axis, is described by a :data:`Layout`:

- an ``int``: the id of a space (the axis indexes exactly that space's units), or
- a :class:`Dep`: the axis's space depends on the index along another axis of the same tensor.

``Dep`` appears after a reshape splits one axis into several. Example: attention heads::

    q = linear(x)                  # (B, T, C)          axis 2: space s
    q = q.view(B, T, H, Dh)        # axis 2: space h;   axis 3: Dep(ref=2, parts=(d_0, ..., d_H-1))
                                   # and s is *defined* as stack(h, [d_0, ..., d_H-1])

A permutation of ``s`` that respects this structure moves whole heads (a permutation of ``h``) and
permutes freely inside each head (one permutation per ``d_j``).

Spaces may carry a *definition* that gives their structure:

- ``stack(r, parts)``: the axis is row-major ``(|r|, |part|)``; block ``j`` is ``parts[j]``
  (reshape, flatten, attention heads, GroupNorm groups, grouped convolutions);
- ``sum(parts)``: the axis is the concatenation of ``parts`` (cat, split, chunk, fused qkv).

Spaces can be *fixed* (identity only), with a reason: they reach a model input or output, or an
op that no handler understands. Fixing a space fixes everything its definition is made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Iterable, Union


@dataclass(frozen=True)
class Dep:
    """An axis whose space depends on the index along axis ``ref`` of the same tensor."""

    ref: int
    parts: tuple["Layout", ...]


Layout = Union[int, Dep]


class SizeMismatch(Exception):
    """Two spaces of different sizes were linked (a handler bug or an unexpected broadcast)."""


@dataclass(frozen=True)
class Stack:
    r: int
    parts: tuple[int, ...]


@dataclass(frozen=True)
class Sum:
    parts: tuple[int, ...]


class SpaceTable:
    """Union-find over spaces with sizes, fixed flags and structural definitions."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}  # root -> reason ("" = structurally fixed, no group reported)
        self.defn: dict[int, Stack | Sum] = {}  # root -> definition
        self.notes: dict[int, str] = {}  # root -> what a structurally fixed space indexes (kernel taps, ...)
        self._hashcons: dict[tuple, int] = {}

    # -- basic union-find ------------------------------------------------------------------
    def new(self, size: int, fixed: str | None = None, note: str | None = None) -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.size.append(int(size))
        if fixed is None and size <= 1:
            fixed = ""  # one unit: nothing to permute
        if fixed is not None:
            self.fixed[sid] = fixed
        if note:
            self.notes[sid] = note
        return sid

    def note(self, x: int, text: str) -> None:
        """Say what a structurally fixed space indexes (shown for the parameter axes it fixes)."""
        self.notes.setdefault(self.find(x), text)

    def why(self, x: int) -> str:
        """Why the space ``x`` (fixed) keeps its order: its reason, its note, or its pieces' (``""``: not recorded)."""
        r = self.find(x)
        if self.fixed.get(r) or r in self.notes:
            return self.fixed.get(r) or self.notes[r]
        d = self.defn.get(r)
        whys = [] if d is None else [self.why(c) for c in _children(d) if self.size[self.find(c)] > 1]
        return "; ".join(dict.fromkeys(w for w in whys if w))

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def is_fixed(self, x: int) -> bool:
        return self.find(x) in self.fixed

    def settled(self, layout: "Layout") -> bool:
        """True when every space of ``layout`` is fixed, directly or through its definition."""
        for x in self.leaves(layout):
            r = self.find(x)
            if r in self.fixed:
                continue
            d = self.defn.get(r)
            if d is None or not all(self.settled(c) for c in _children(d)):
                return False
        return True

    def fix(self, x: int, reason: str = "") -> None:
        r = self.find(x)
        old = self.fixed.get(r)
        if old is None or (not old and reason):
            self.fixed[r] = reason

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise SizeMismatch(f"cannot link spaces of {self.size[ra]} and {self.size[rb]} units")
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        fb = self.fixed.pop(rb, None)
        if fb is not None:
            self.fix(ra, fb)
        nb = self.notes.pop(rb, None)
        if nb is not None:
            self.notes.setdefault(ra, nb)
        da, db = self.defn.get(ra), self.defn.pop(rb, None)
        if db is not None:
            if da is None:
                self.defn[ra] = db
            else:
                self._unify_defs(ra, da, db)
        return ra

    def _unify_defs(self, root: int, a: Stack | Sum, b: Stack | Sum) -> None:
        if isinstance(a, Stack) and isinstance(b, Stack) and self.size[self.find(a.r)] == self.size[self.find(b.r)]:
            self.union(a.r, b.r)
            for p, q in zip(a.parts, b.parts):
                self.union(p, q)
        elif isinstance(a, Sum) and isinstance(b, Sum):
            self._unify_sums(root, a.parts, b.parts)
        elif isinstance(a, Stack) != isinstance(b, Stack):
            # blocks told apart by position (a split of the same axis into pieces): the block axis
            # cannot move, and the stack is the sum of its blocks (q/k/v sliced, or cat of biases,
            # on a fused axis that a reshape also cuts into (3, heads, dim))
            st, sm = (a, b) if isinstance(a, Stack) else (b, a)
            self.fix(st.r, "")
            self.note(st.r, "blocks told apart by position (one axis cut into pieces)")
            self._unify_sums(root, st.parts, sm.parts)
        else:  # two incompatible structures on one space: keep it whole and identity
            self._conflict(root, a, b)

    def _conflict(self, root: int, *defs: Stack | Sum) -> None:
        """Fix ``root`` and the pieces of every structure it was given: a piece of the definition
        that is not kept must not stay free (its users would move units the space does not)."""
        reason = "conflicting structure (different reshapes or splits of one space)"
        self.fix(root, reason)
        for d in defs:
            for c in _children(d):
                self.fix(c, reason)

    def _unify_sums(self, root: int, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        """One axis cut two ways (``[16, 32]`` and ``[16, 16, 16]``): both are cut at every boundary
        of either (a piece that spans several of the other's becomes their sum), then the pieces are
        linked in order. The definition kept is the finer one."""
        bounds = set(accumulate(self.size[self.find(p)] for p in a)) | set(accumulate(self.size[self.find(p)] for p in b))
        fa, fb = self._refine(a, bounds), self._refine(b, bounds)
        if [self.size[self.find(p)] for p in fa] != [self.size[self.find(p)] for p in fb]:
            self._conflict(root, Sum(a), Sum(b))
            return
        for p, q in zip(fa, fb):
            self.union(p, q)
        self.defn[self.find(root)] = Sum(tuple(fa))

    def _refine(self, parts: tuple[int, ...], bounds: set[int]) -> list[int]:
        """``parts`` cut at ``bounds`` (offsets along their concatenation): a part with boundaries
        inside it is defined as the sum of fresh pieces (unified with any cut it already has)."""
        out, start = [], 0
        for p in parts:
            n = self.size[self.find(p)]
            cuts = sorted(c - start for c in bounds if start < c < start + n)
            if cuts:
                pieces = tuple(self.new(e - s) for s, e in zip([0] + cuts, cuts + [n]))
                self.define(p, Sum(pieces))
                out += list(pieces)
            else:
                out.append(p)
            start += n
        return out

    # -- structure -------------------------------------------------------------------------
    def definition(self, x: int) -> Stack | Sum | None:
        return self.defn.get(self.find(x))

    def stack_of(self, r: int, parts: Iterable[int]) -> int:
        """The space ``stack(r, parts)``; the same space every time for the same pieces."""
        parts = tuple(parts)
        if len(parts) == 1 and self.size[self.find(r)] == 1:
            return parts[0]
        if all(self.size[self.find(p)] == 1 for p in parts):
            return r
        key = ("stack", self.find(r), tuple(self.find(p) for p in parts))
        sid = self._hashcons.get(key)
        if sid is None:
            sid = self.new(self.size[self.find(r)] * self.size[self.find(parts[0])])
            self.defn[sid] = Stack(r, parts)
            self._hashcons[key] = sid
        return sid

    def sum_of(self, parts: Iterable[int]) -> int:
        parts = tuple(parts)
        if len(parts) == 1:
            return parts[0]
        key = ("sum", tuple(self.find(p) for p in parts))
        sid = self._hashcons.get(key)
        if sid is None:
            sid = self.new(sum(self.size[self.find(p)] for p in parts))
            self.defn[sid] = Sum(parts)
            self._hashcons[key] = sid
        return sid

    def define(self, x: int, d: Stack | Sum) -> None:
        """Give space ``x`` a structure (unifying with the one it already has)."""
        r = self.find(x)
        old = self.defn.get(r)
        if old is None:
            self.defn[r] = d
        else:
            self._unify_defs(r, old, d)

    def split(self, s: int, sizes: tuple[int, ...]) -> list[Layout]:
        """Layouts of the axes ``sizes`` that a row-major split of space ``s`` produces.

        The layouts' ``Dep.ref`` are indices into ``sizes``.
        """
        if len(sizes) == 1:
            return [s]
        if self.is_fixed(s):
            return [self.new(n, "", self.why(s)) for n in sizes]
        d = self.definition(s)
        inner = 1
        for n in sizes[1:]:
            inner *= n
        if d is None or isinstance(d, Sum):  # a sum (cat of biases, slices) is cut at the block boundaries
            r = self.new(sizes[0])
            parts = tuple(self.new(inner) for _ in range(sizes[0]))
            self.define(s, Stack(r, parts))
            if self.is_fixed(s):
                return [self.new(n, "", self.why(s)) for n in sizes]
            d = Stack(r, parts)
        if isinstance(d, Stack) and self.size[self.find(d.r)] == sizes[0]:
            subs = [self.split(p, sizes[1:]) for p in d.parts]
            out: list[Layout] = [self.find(d.r)]
            for k in range(len(sizes) - 1):
                out.append(Dep(0, tuple(_shift(sub[k], 1) for sub in subs)))
            return [_simplify(x) for x in out]
        self.fix(s, "conflicting structure (reshapes of one space into different blocks)")
        return [self.new(n, "") for n in sizes]

    def flatten(self, layouts: list[Layout]) -> int:
        """The space of one axis made by flattening ``layouts`` row-major (refs index the list)."""
        first = self.collapse(layouts[0])
        if len(layouts) == 1:
            return first
        n = self.size[self.find(first)]
        parts = []
        for j in range(n):
            rest = [_shift(_select(L, 0, j), -1) for L in layouts[1:]]
            parts.append(self.flatten(rest))
        return self.stack_of(first, parts)

    def collapse(self, layout: Layout) -> int:
        """A single space for ``layout``, linking all the parts of a ``Dep``."""
        if isinstance(layout, int):
            return layout
        parts = [self.collapse(p) for p in layout.parts]
        for p in parts[1:]:
            self.union(parts[0], p)
        return parts[0]

    def leaves(self, layout: Layout) -> Iterable[int]:
        if isinstance(layout, int):
            yield layout
        else:
            for p in layout.parts:
                yield from self.leaves(p)

    def layout_size(self, layout: Layout) -> int:
        while isinstance(layout, Dep):
            layout = layout.parts[0]
        return self.size[self.find(layout)]

    def link(self, a: Layout, b: Layout) -> None:
        """Link two corresponding axis layouts, given in the same axis coordinates."""
        if isinstance(a, int) and isinstance(b, int):
            self.union(a, b)
            return
        if isinstance(a, Dep) and isinstance(b, Dep) and a.ref == b.ref and len(a.parts) == len(b.parts):
            for p, q in zip(a.parts, b.parts):
                self.link(p, q)
            return
        self.union(self.collapse(a), self.collapse(b))

    def fix_layout(self, layout: Layout, reason: str) -> None:
        for s in self.leaves(layout):
            self.fix(s, reason)

    # -- closing the structure ---------------------------------------------------------------
    def close(self) -> None:
        """Propagate fixedness into definitions and merge structurally equal spaces, to a fixpoint."""
        changed = True
        while changed:
            changed = False
            for root in list(self.fixed):
                root = self.find(root)
                d = self.defn.get(root)
                if d is None:
                    continue
                reason = self.fixed.get(root, "")
                for child in _children(d):
                    if not self.is_fixed(child):
                        self.fix(child, reason)
                        changed = True
            for root, d in list(self.defn.items()):  # made only of fixed pieces: fixed itself
                if self.find(root) == root and root not in self.fixed and all(self.is_fixed(c) for c in _children(d)):
                    self.fixed[root] = ""
                    changed = True
            seen: dict[tuple, int] = {}
            for root, d in list(self.defn.items()):
                if self.find(root) != root:
                    continue
                key = (
                    ("stack", self.find(d.r), tuple(self.find(p) for p in d.parts))
                    if isinstance(d, Stack)
                    else ("sum", tuple(self.find(p) for p in d.parts))
                )
                other = seen.get(key)
                if other is not None and self.find(other) != root:
                    self.union(other, root)
                    changed = True
                else:
                    seen[key] = root


def _children(d: Stack | Sum) -> tuple[int, ...]:
    return (d.r, *d.parts) if isinstance(d, Stack) else d.parts


def _shift(layout: Layout, k: int) -> Layout:
    if isinstance(layout, int):
        return layout
    return Dep(layout.ref + k, tuple(_shift(p, k) for p in layout.parts))


def _select(layout: Layout, ref: int, j: int) -> Layout:
    """``layout`` at index ``j`` of axis ``ref``."""
    if isinstance(layout, int):
        return layout
    if layout.ref == ref:
        return _select(layout.parts[j], ref, j)
    return Dep(layout.ref, tuple(_select(p, ref, j) for p in layout.parts))


def _simplify(layout: Layout) -> Layout:
    """A ``Dep`` whose parts are all the same plain space is that space."""
    if isinstance(layout, Dep):
        parts = tuple(_simplify(p) for p in layout.parts)
        if all(isinstance(p, int) for p in parts) and len(set(parts)) == 1:
            return parts[0]
        return Dep(layout.ref, parts)
    return layout


def select(layout: Layout, ref: int, j: int) -> Layout:
    return _select(layout, ref, j)


def remap(layout: Layout, mapping: dict[int, int]) -> Layout | None:
    """Re-index the refs of ``layout``; ``None`` if a ref axis is not in ``mapping``."""
    if isinstance(layout, int):
        return layout
    if layout.ref not in mapping:
        return None
    parts = []
    for p in layout.parts:
        q = remap(p, mapping)
        if q is None:
            return None
        parts.append(q)
    return Dep(mapping[layout.ref], tuple(parts))
