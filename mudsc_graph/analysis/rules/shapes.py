"""Rules for ops that move, split, merge or index axes: reshape, permute, cat, split, getitem."""

from __future__ import annotations

from typing import Any, Sequence

from ..propagate import OpContext, Value, op_name
from ..spaces import Dep, Layout, Sum, select
from .base import rebase


def reshape_layouts(ctx: OpContext, x: Value, out_shape: Sequence[int]) -> list[Layout] | None:
    """Output layouts of a row-major reshape of ``x`` to ``out_shape`` (None: not factorable).

    Both shapes are cut into their common factors (``(6, 4) -> (2, 12)``: factors 2, 3, 4); each
    input axis is split into its factors, and each output axis is its factors flattened."""
    in_idx = [i for i, n in enumerate(x.shape) if n != 1]
    out_idx = [i for i, n in enumerate(out_shape) if n != 1]
    cut = _common_factors([x.shape[i] for i in in_idx], [out_shape[i] for i in out_idx])
    if cut is None:
        return None
    sizes, in_ranges, out_ranges = cut
    factors = _input_factors(ctx.spaces, x, in_idx, sizes, in_ranges)
    axis_of_factor = {f: k for k, r in enumerate(out_ranges) for f in r}

    def to_output(ref: int, parts: tuple) -> Layout:
        """A dependence on factor ``ref`` as one on its output axis (for a merged axis, the part
        of every merged index is the part of its ``ref`` digit)."""
        k = axis_of_factor[ref]
        r = out_ranges[k]
        stride = _prod(sizes[g] for g in r if g > ref)
        total = _prod(sizes[g] for g in r)
        return Dep(out_idx[k], parts if len(r) == 1 else tuple(parts[(m // stride) % sizes[ref]] for m in range(total)))

    out: list[Layout] = [None] * len(out_shape)  # type: ignore[list-item]
    for k, r in enumerate(out_ranges):
        if len(r) == 1:
            out[out_idx[k]] = _reindex(ctx.spaces, factors[r[0]], to_output)
        else:
            local = {f: f - r[0] for f in r}
            out[out_idx[k]] = ctx.spaces.flatten([rebase(ctx, factors[f], local) for f in r])
    return [L if L is not None else ctx.new_fixed(1) for L in out]


def _common_factors(ins: list[int], outs: list[int]) -> tuple[list[int], list[range], list[range]] | None:
    """The common factors of two shapes of one size, and which factors each axis spans (None when
    an axis boundary of one falls inside an axis of the other without dividing it)."""
    cum_in, cum_out = _cumprod(ins), _cumprod(outs)
    bounds = sorted(set(cum_in) | set(cum_out))
    prev = 1
    for b in bounds:
        if b % prev:
            return None
        prev = b
    sizes = [b // a for a, b in zip([1] + bounds[:-1], bounds)]
    factor_of_bound = {b: i for i, b in enumerate(bounds)}

    def ranges(cum: list[int]) -> list[range]:
        out, start = [], 0
        for c in cum:
            end = factor_of_bound[c] + 1
            out.append(range(start, end))
            start = end
        return out

    return sizes, ranges(cum_in), ranges(cum_out)


def _input_factors(sp: Any, x: Value, in_idx: list[int], sizes: list[int], in_ranges: list[range]) -> list[Layout]:
    """The layout of every common factor, splitting each input axis into the factors it spans."""
    range_of_input = {in_idx[k]: r for k, r in enumerate(in_ranges)}
    factors: list[Layout] = [None] * len(sizes)  # type: ignore[list-item]

    def from_input(ref: int, parts: tuple) -> Layout | None:
        """A dependence on input axis ``ref`` as one on its factors: the factor itself, or, for an
        axis split into several, the one factor whose index alone picks the part (the heads of a
        ``(batch * heads)`` axis, as torch's multi-head attention makes them)."""
        r = range_of_input.get(ref)
        if r is None:
            return None
        if len(r) == 1:
            return Dep(r[0], parts)
        return _periodic(sp, parts, [sizes[f] for f in r], list(r))

    for k, r in enumerate(in_ranges):
        L = _reindex(sp, x.layout[in_idx[k]], from_input)
        if len(r) == 1:
            factors[r[0]] = L
            continue
        sub_sizes = tuple(sizes[f] for f in r)
        if isinstance(L, Dep):
            subs = [[_offset(s, r[0]) for s in sp.split(sp.collapse(p), sub_sizes)] for p in L.parts]
            for j, f in enumerate(r):
                factors[f] = Dep(L.ref, tuple(sub[j] for sub in subs))
        else:
            for f, s in zip(r, sp.split(L, sub_sizes)):
                factors[f] = _offset(s, r[0])
    return factors


def _reindex(sp: Any, layout: Layout, move: Any) -> Layout:
    """``layout`` with every ``Dep`` re-expressed by ``move(ref, parts)``; ``None`` from ``move``
    collapses that level (its parts become one space)."""
    if isinstance(layout, int):
        return layout
    parts = tuple(_reindex(sp, p, move) for p in layout.parts)
    moved = move(layout.ref, parts)
    return moved if moved is not None else sp.collapse(Dep(layout.ref, parts))


def _periodic(sp: Any, parts: tuple, sizes: list[int], refs: list[int]) -> Dep | None:
    """``parts`` indexed row-major by digits of ``sizes``: a Dep on the one digit that decides them."""
    for pos in reversed(range(len(sizes))):
        n, stride = sizes[pos], _prod(sizes[pos + 1:])
        if all(_same(sp, parts[m], parts[((m // stride) % n) * stride]) for m in range(len(parts))):
            return Dep(refs[pos], tuple(parts[j * stride] for j in range(n)))
    return None


def _same(sp: Any, a: Layout, b: Layout) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return sp.find(a) == sp.find(b)
    if isinstance(a, Dep) and isinstance(b, Dep):
        return a.ref == b.ref and len(a.parts) == len(b.parts) and all(_same(sp, p, q) for p, q in zip(a.parts, b.parts))
    return False


def _prod(xs: Any) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _offset(layout: Layout, k: int) -> Layout:
    if isinstance(layout, int):
        return layout
    return Dep(layout.ref + k, tuple(_offset(p, k) for p in layout.parts))


def _cumprod(sizes: list[int]) -> list[int]:
    out, acc = [], 1
    for n in sizes:
        acc *= n
        out.append(acc)
    return out


def reshape(ctx: OpContext) -> None:
    """view / reshape / flatten / unflatten / squeeze / unsqueeze: any row-major reshape."""
    x = ctx.input(0)
    if not isinstance(x, Value) or not isinstance(ctx.out_shape, tuple):
        ctx.unsupported("reshape of a non-tensor")
        return
    out = reshape_layouts(ctx, x, ctx.out_shape)
    if out is None:
        ctx.unsupported(f"a reshape {x.shape} -> {ctx.out_shape} that does not factor into splits and merges")
        return
    ctx.set_output(out)


def permute_axes(ctx: OpContext, x: Value, order: Sequence[int]) -> None:
    order = [int(o) % x.ndim for o in order]
    inverse = {src: dst for dst, src in enumerate(order)}
    ctx.set_output([rebase(ctx, x.layout[src], inverse) for src in order])


def permute(ctx: OpContext) -> None:
    x = ctx.input(0)
    dims = ctx.node.args[1:] if ctx.node.op == "call_method" else (ctx.arg(1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if dims == (None,) or dims is None:
        dims = ctx.node.kwargs.get("dims")
    permute_axes(ctx, x, list(dims))


def transpose(ctx: OpContext) -> None:
    x = ctx.input(0)
    if x.ndim < 2:
        ctx.set_output(ctx.like(x))
        return
    a = ctx.arg(1, "dim0", 0)
    b = ctx.arg(2, "dim1", 1)
    if op_name(ctx.node.target) in ("t", "T"):
        a, b = 0, 1
    order = list(range(x.ndim))
    a, b = a % x.ndim, b % x.ndim
    order[a], order[b] = order[b], order[a]
    permute_axes(ctx, x, order)


def movedim(ctx: OpContext) -> None:
    x = ctx.input(0)
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [s % x.ndim for s in src]
    dst = [d % x.ndim for d in dst]
    order: list[int | None] = [None] * x.ndim
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(x.ndim) if i not in src)
    permute_axes(ctx, x, [o if o is not None else next(rest) for o in order])


def expand(ctx: OpContext) -> None:
    """expand / expand_as / broadcast_to: an axis grown from size 1 holds copies (a free space)."""
    x = ctx.input(0)
    out_shape = ctx.out_shape
    off = len(out_shape) - x.ndim
    mapping = {i: i + off for i in range(x.ndim)}
    out: list[Layout] = [ctx.new(n) for n in out_shape[:off]]
    for i in range(x.ndim):
        if x.shape[i] == out_shape[i + off]:
            out.append(rebase(ctx, x.layout[i], mapping))
        else:
            out.append(ctx.new(out_shape[i + off]))
    ctx.set_output(out)


def repeat(ctx: OpContext) -> None:
    """x.repeat(...): an axis tiled k times is the sum of k copies of its space."""
    x = ctx.input(0)
    out_shape = ctx.out_shape
    off = len(out_shape) - x.ndim
    out: list[Layout] = [ctx.new_fixed(n) for n in out_shape[:off]]
    for i in range(x.ndim):
        n, m = x.shape[i], out_shape[i + off]
        if n == m:
            out.append(rebase(ctx, x.layout[i], {j: j + off for j in range(x.ndim)}))
        elif n == 1:
            out.append(ctx.new(m))
        else:
            s = ctx.spaces.collapse(x.axis(i))
            out.append(ctx.spaces.sum_of([s] * (m // n)))
    ctx.set_output(out)


def cat(ctx: OpContext) -> None:
    """cat: the axis is a direct sum of the inputs' spaces; the other axes are shared."""
    xs = [v for v in ctx.input(0, "tensors") if isinstance(v, Value)]
    d = ctx.arg(1, "dim", 0) % xs[0].ndim
    keep = {i: i for i in range(xs[0].ndim) if i != d}
    others = [[rebase(ctx, v.layout[i], keep) for i in range(v.ndim)] for v in xs if v.shape[d] > 0]
    for ls in others[1:]:
        for i in keep:
            ctx.link(others[0][i], ls[i])
    out = list(others[0])
    out[d] = ctx.spaces.sum_of([ctx.spaces.collapse(v.axis(d)) for v in xs if v.shape[d] > 0])
    ctx.set_output(out)


def stack(ctx: OpContext) -> None:
    """stack: a new axis selects the input; every input keeps its own spaces (a Dep on it)."""
    xs = [v for v in ctx.input(0, "tensors") if isinstance(v, Value)]
    n = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % n
    to_out = {i: (i if i < d else i + 1) for i in range(xs[0].ndim)}
    out: list[Layout] = []
    for j in range(n):
        if j == d:
            out.append(ctx.new_fixed(len(xs)))
            continue
        i = j if j < d else j - 1
        parts = tuple(rebase(ctx, v.layout[i], to_out) for v in xs)
        out.append(_dep_or_plain(d, parts))
    ctx.set_output(out)


def _dep_or_plain(ref: int, parts: tuple[Layout, ...]) -> Layout:
    if all(isinstance(p, int) for p in parts) and len(set(parts)) == 1:
        return parts[0]
    return Dep(ref, parts)


def split(ctx: OpContext) -> None:
    """split / chunk / tensor_split / split_with_sizes: the axis becomes a sum of the pieces."""
    x = ctx.input(0)
    shapes = ctx.out_shape
    d = ctx.arg(2, "dim", 0) % x.ndim
    sizes = [s[d] for s in shapes]
    ctx.set_output(_split_outputs(ctx, x, d, sizes))


def _cut(ctx: OpContext, L: Layout, sizes: list[int]) -> list[Layout]:
    """The layouts of the consecutive pieces of ``sizes`` (all non-zero) of an axis of layout ``L``.
    An axis whose units depend on another axis (head-major ``view(B, N, H, 3 * d)``) is cut block by
    block, so the pieces keep that dependence (one ``q``/``k``/``v`` per head)."""
    sp = ctx.spaces
    if len(sizes) == 1:
        return [L]
    if isinstance(L, Dep) and all(isinstance(p, int) and not sp.is_fixed(p) for p in L.parts):
        cuts = [_cut(ctx, p, sizes) for p in L.parts]
        if all(all(isinstance(c, int) for c in cut) for cut in cuts):
            return [Dep(L.ref, tuple(cut[k] for cut in cuts)) for k in range(len(sizes))]
    s = sp.collapse(L)
    if not sp.is_fixed(s):
        fresh = [sp.new(n) for n in sizes]
        sp.define(s, Sum(tuple(fresh)))  # unified with any other cut of the axis (spaces._unify_sums)
        if not sp.is_fixed(s):
            return fresh
    return [sp.new(n, "", sp.why(s)) for n in sizes]


def _split_outputs(ctx: OpContext, x: Value, d: int, sizes: list[int]) -> list[list[Layout]]:
    nonzero = [n for n in sizes if n]
    pieces = iter(_cut(ctx, x.axis(d), nonzero))
    keep = {i: i for i in range(x.ndim) if i != d}
    base = [rebase(ctx, L, keep) for L in x.layout]
    outs = []
    for n in sizes:
        lay = list(base)
        lay[d] = next(pieces) if n else ctx.new_fixed(0)
        outs.append(lay)
    return outs


def unbind(ctx: OpContext) -> None:
    """unbind(dim): each output is one index along ``dim``; units along it are told apart."""
    x = ctx.input(0)
    d = ctx.arg(1, "dim", 0) % x.ndim
    ctx.fix(x.axis(d), reason="", note="told apart by index (unbind)")
    to_out = {i: (i if i < d else i - 1) for i in range(x.ndim) if i != d}
    outs = []
    for j in range(x.shape[d]):
        outs.append([rebase(ctx, select(x.layout[i], d, j), to_out) for i in range(x.ndim) if i != d])
    ctx.set_output(outs)


def getitem(ctx: OpContext) -> None:
    """Indexing: a tuple element, or tensor indexing with ints, slices, None and Ellipsis."""
    src = ctx.input(0)
    idx = ctx.arg(1)
    if isinstance(src, list):
        ctx.set_output(_as_layouts(src[idx]) if isinstance(idx, int) else [_as_layouts(v) for v in src[idx]])
        return
    if not isinstance(src, Value):
        ctx.set_output(None if not isinstance(ctx.out_shape, tuple) else ctx.fresh_output())
        return
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(ctx.value(i), Value) for i in items):  # x[index_tensor], x[:, idx]: advanced indexing
        if Ellipsis in items:
            e = items.index(Ellipsis)
            items = items[:e] + [slice(None)] * (src.ndim - len(items) + 1) + items[e + 1 :]
        if len(items) > src.ndim or any(not (isinstance(ctx.value(i), Value) or i == slice(None)) for i in items):
            ctx.unsupported("indexing that mixes tensors with ints, new axes or partial slices")
            return
        advanced_index(ctx, src, [ctx.value(i) if isinstance(ctx.value(i), Value) else None for i in items])
        return
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        ctx.unsupported("indexing with lists")
        return
    n_consume = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (src.ndim - n_consume) + items[e + 1 :]
    items += [slice(None)] * (src.ndim - sum(1 for i in items if i is not None))
    index_axes(ctx, src, items)


def index_axes(ctx: OpContext, src: Value, items: list[Any]) -> None:
    """Basic indexing of ``src``, one item per axis (``None`` adds an axis): the core of
    ``x[...]``, ``aten.slice``, ``aten.select`` and ``narrow``.

    A slice splits its axis into (before, kept, after) pieces (a sum); an int selects one unit,
    which fixes that axis's space. Bounds that the graph computes (``x[:, :H]`` with ``H`` from a
    shape) are read off the output shape: a slice that keeps the whole axis is the identity, any
    other fixes that axis only; a strided slice that takes every k-th position (``x[..., 1::2]``) keeps
    units of k positions each, any other strided slice fixes its axis (Swin's patch merging: positions
    matter); the other axes pass through untouched.
    """
    layout = list(src.layout)
    sp = ctx.spaces
    kept: list[tuple[str, int]] = []  # ("axis", input axis) or ("new", 0)
    ax = 0
    selected: dict[int, int] = {}
    computed: dict[int, int] = {}  # input axis -> output axis, for slices with computed bounds
    for it in items:
        if it is None:
            kept.append(("new", 0))
            continue
        n = src.shape[ax]
        if isinstance(it, int):
            sp.fix_layout(layout[ax], "" if sp.settled(layout[ax]) else f"a single unit is selected at node {ctx.node.name}")
            selected[ax] = it % n
        elif any(not (v is None or isinstance(v, int)) for v in (it.start, it.stop, it.step)):
            computed[ax] = len(kept)
            kept.append(("axis", ax))
        else:
            start, stop, step = it.indices(n)
            if step > 1 and n % step == 0 and start < step and stop > n - step + start:  # x[..., 1::2]: a view (n/k, k), one column
                layout[ax] = _every_kth(sp, layout[ax], n, step, f"one position in every {step} is selected at node {ctx.node.name}")
                kept.append(("axis", ax))
                ax += 1
                continue
            if step != 1 and (start, stop, step) != (0, n, 1):
                computed[ax] = len(kept)  # a strided part of the axis: positions matter
                kept.append(("axis", ax))
                ax += 1
                continue
            if (start, stop, step) != (0, n, 1):
                sizes = [start, max(stop - start, 0), n - max(stop, start)]
                kept_piece = int(start > 0)  # where the kept piece is among the non-empty ones
                layout[ax] = _cut(ctx, layout[ax], [m for m in sizes if m])[kept_piece] if sizes[1] else ctx.new_fixed(0)
            kept.append(("axis", ax))
        ax += 1
    for a, k in computed.items():
        if ctx.out_shape[k] != src.shape[a]:  # part of the axis, at positions only the data (or a stride) picks
            sp.fix_layout(layout[a], "" if sp.settled(layout[a]) else f"slicing with computed bounds at node {ctx.node.name}")
    for a, j in selected.items():
        layout = [select(L, a, j) for L in layout]
    to_out = {a: k for k, (kind, a) in enumerate(kept) if kind == "axis" and (a not in computed or ctx.out_shape[k] == src.shape[a])}
    out = [
        ctx.new_fixed(1) if kind == "new" else rebase(ctx, layout[a], to_out) if a in to_out.keys() else ctx.new_fixed(ctx.out_shape[k])
        for k, (kind, a) in enumerate(kept)
    ]
    ctx.set_output(out)


def _every_kth(sp: Any, L: Layout, n: int, k: int, why: str) -> Layout:
    """The layout of ``x[k*j + start]`` (j < n/k) along an axis of ``n`` laid out as ``L``: the axis
    viewed as (n/k units, k positions each), one position chosen, which fixes the positions (the
    interleaved gate and up rows of a fused ``[g0, u0, g1, u1, ...]`` projection: units of two rows)."""
    if isinstance(L, Dep):
        return Dep(L.ref, tuple(_every_kth(sp, p, n, k, why) for p in L.parts))
    outer, inner = sp.split(L, (n // k, k))
    sp.fix_layout(inner, "" if sp.settled(inner) else why)
    return outer


def aten_slice(ctx: OpContext) -> None:
    """``aten.slice(x, dim, start, end, step)`` and ``narrow(x, dim, start, length)``."""
    x = ctx.input(0)
    d = ctx.arg(1, "dim", 0) % x.ndim
    start = ctx.arg(2, "start")
    if op_name(ctx.node.target) == "narrow":
        length = ctx.arg(3, "length")
        item = slice(start, start + length) if isinstance(start, int) and isinstance(length, int) else slice(start, length, None)
    else:
        item = slice(start, ctx.arg(3, "end"), ctx.arg(4, "step", 1))
    if isinstance(item.stop, int) and item.stop > x.shape[d]:
        item = slice(item.start, x.shape[d], item.step)
    index_axes(ctx, x, [slice(None)] * d + [item] + [slice(None)] * (x.ndim - d - 1))


def aten_index(ctx: OpContext) -> None:
    """Advanced indexing ``x[idx0, idx1, ...]`` (``aten.index.Tensor``, ``x[tensor]``): the indexed
    axes of ``x`` are read by position (fixed); the index tensors broadcast to the new axes, which
    sit where the indexed axes were when those are adjacent, else first; other axes pass through.
    Swin's relative position bias (``table[index]``) keeps the table's head axis this way."""
    x = ctx.input(0)
    raw = ctx.arg(1, "indices")
    if not isinstance(x, Value) or not isinstance(raw, (list, tuple)):
        ctx.unsupported("indexing with a non-tensor")
        return
    idx = [ctx.value(a) if a is not None else None for a in raw]
    if any(a is not None and not isinstance(v, Value) for a, v in zip(raw, idx)):
        ctx.unsupported("indexing with lists of non-tensors")
        return
    advanced_index(ctx, x, idx)


def advanced_index(ctx: OpContext, x: Value, idx: list[Value | None]) -> None:
    """``x[idx...]`` with index tensors (``None``: the whole axis); see :func:`aten_index`."""
    where = [i for i, v in enumerate(idx) if v is not None]
    if not where:
        ctx.set_output(ctx.like(x))
        return
    for i in where:
        ctx.fix_units(x.axis(i), "indexing a unit axis")
    rest = [i for i in range(x.ndim) if i not in where]
    nb = len(ctx.out_shape) - len(rest)
    adjacent = where == list(range(where[0], where[-1] + 1))
    first = where[0] if adjacent else 0
    bshape = tuple(ctx.out_shape[first : first + nb])
    new = ctx.broadcast([idx[i] for i in where], bshape)
    before = [i for i in rest if adjacent and i < first]
    after = [i for i in rest if i not in before]
    to_out = {i: k for k, i in enumerate(before)} | {i: len(before) + nb + k for k, i in enumerate(after)}
    ctx.set_output([rebase(ctx, x.layout[i], to_out) for i in before] + new + [rebase(ctx, x.layout[i], to_out) for i in after])


def aten_select(ctx: OpContext) -> None:
    """``aten.select(x, dim, index)``: ``x[..., index, ...]``."""
    x = ctx.input(0)
    d = ctx.arg(1, "dim", 0) % x.ndim
    j = ctx.arg(2, "index")
    if not isinstance(j, int):
        ctx.unsupported("select with a computed index")
        return
    index_axes(ctx, x, [slice(None)] * d + [j] + [slice(None)] * (x.ndim - d - 1))


def roll(ctx: OpContext) -> None:
    """``torch.roll(x, shifts, dims)``: the rolled axes depend on the order of their positions (fixed);
    the others pass through (Swin's cyclic shift rolls the spatial axes, not the channels)."""
    x = ctx.input(0)
    dims = ctx.arg(2, "dims")
    dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    if not dims:  # a roll of the flattened tensor mixes every axis
        ctx.unsupported("roll without dims")
        return
    out = ctx.like(x)
    for d in dims:
        d %= x.ndim
        ctx.fix_units(x.axis(d), "rolling a unit axis")
        out[d] = ctx.new_fixed(x.shape[d])
    keep = {i: i for i in range(x.ndim) if i not in [d % x.ndim for d in dims]}
    ctx.set_output([rebase(ctx, L, keep) if i in keep else L for i, L in enumerate(out)])


def _as_layouts(v: Any) -> Any:
    if isinstance(v, Value):
        return list(v.layout)
    if isinstance(v, list):
        return [_as_layouts(x) for x in v]
    return None


def tensor_attribute(ctx: OpContext) -> None:
    """``getattr(x, name)``: ``x.T`` / ``x.mT`` move axes, ``x.data`` passes, ``x.shape`` is metadata."""
    x, name = ctx.input(0), ctx.arg(1)
    if not isinstance(ctx.out_shape, tuple) or not isinstance(x, Value):
        ctx.set_output(None if not isinstance(ctx.out_shape, tuple) else ctx.fresh_output())
        return
    if name == "T":
        permute_axes(ctx, x, list(reversed(range(x.ndim))))
    elif name == "mT" and x.ndim >= 2:
        permute_axes(ctx, x, list(range(x.ndim - 2)) + [x.ndim - 1, x.ndim - 2])
    elif name in ("data", "real") and tuple(ctx.out_shape) == x.shape:
        ctx.set_output(ctx.like(x))
    else:
        ctx.unsupported(f"tensor attribute {name!r}")
