"""Rules for ops that move, split, merge or index axes: reshape, permute, cat, split, getitem."""

from __future__ import annotations

from typing import Any, Sequence

from ..propagate import OpContext, Value
from ..spaces import Dep, Layout, Sum, select
from .base import rebase


def reshape_layouts(ctx: OpContext, x: Value, out_shape: Sequence[int]) -> list[Layout] | None:
    """Output layouts of a row-major reshape of ``x`` to ``out_shape`` (None: not factorable)."""
    sp = ctx.spaces
    in_idx = [i for i, n in enumerate(x.shape) if n != 1]
    out_idx = [i for i, n in enumerate(out_shape) if n != 1]
    cum_in = _cumprod([x.shape[i] for i in in_idx])
    cum_out = _cumprod([out_shape[i] for i in out_idx])
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

    in_ranges, out_ranges = ranges(cum_in), ranges(cum_out)
    # the factor that each input axis maps to, when it maps to exactly one
    single_in = {in_idx[k]: r[0] for k, r in enumerate(in_ranges) if len(r) == 1}
    factors: list[Layout] = [None] * len(sizes)  # type: ignore[list-item]
    for k, r in enumerate(in_ranges):
        L = rebase(ctx, x.layout[in_idx[k]], single_in)
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
    single_out = {r[0]: out_idx[k] for k, r in enumerate(out_ranges) if len(r) == 1}
    out: list[Layout] = [None] * len(out_shape)  # type: ignore[list-item]
    for k, r in enumerate(out_ranges):
        if len(r) == 1:
            out[out_idx[k]] = rebase(ctx, factors[r[0]], single_out)
        else:
            local = {f: f - r[0] for f in r}
            out[out_idx[k]] = sp.merge([rebase(ctx, factors[f], local) for f in r])
    return [L if L is not None else ctx.fixed(1) for L in out]


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
    if getattr(ctx.node.target, "__name__", ctx.node.target) in ("t", "T"):
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
    out: list[Layout] = [ctx.fixed(n) for n in out_shape[:off]]
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
            out.append(ctx.fixed(len(xs)))
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


def _split_outputs(ctx: OpContext, x: Value, d: int, sizes: list[int]) -> list[list[Layout]]:
    sp = ctx.spaces
    s = sp.collapse(x.axis(d))
    nonzero = [n for n in sizes if n]
    if sp.is_fixed(s) or len(nonzero) == 1:
        pieces = iter([s] if len(nonzero) == 1 else [sp.new(n, "") for n in nonzero])
    else:
        fresh = [sp.new(n) for n in nonzero]
        sp.define(s, Sum(tuple(fresh)))
        dfn = sp.definition(s)
        pieces = iter(dfn.parts if isinstance(dfn, Sum) and len(dfn.parts) == len(fresh) else [sp.new(n, "") for n in nonzero])
    keep = {i: i for i in range(x.ndim) if i != d}
    base = [rebase(ctx, L, keep) for L in x.layout]
    outs = []
    for n in sizes:
        lay = list(base)
        lay[d] = next(pieces) if n else ctx.fixed(0)
        outs.append(lay)
    return outs


def unbind(ctx: OpContext) -> None:
    """unbind(dim): each output is one index along ``dim``; units along it are told apart."""
    x = ctx.input(0)
    d = ctx.arg(1, "dim", 0) % x.ndim
    ctx.spaces.fix_layout(x.axis(d), "")
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
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        ctx.unsupported("indexing with tensors or lists")
        return
    if any(isinstance(i, slice) and any(not (v is None or isinstance(v, int)) for v in (i.start, i.stop, i.step)) for i in items):
        ctx.unsupported("slicing with computed bounds")
        return
    n_consume = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (src.ndim - n_consume) + items[e + 1 :]
    items += [slice(None)] * (src.ndim - sum(1 for i in items if i is not None))
    layout = list(src.layout)
    sp = ctx.spaces
    kept: list[tuple[str, int]] = []  # ("axis", input axis) or ("new", 0)
    ax = 0
    selected: dict[int, int] = {}
    for it in items:
        if it is None:
            kept.append(("new", 0))
            continue
        n = src.shape[ax]
        if isinstance(it, int):
            sp.fix_layout(layout[ax], "" if sp.settled(layout[ax]) else f"a single unit is selected at node {ctx.node.name}")
            selected[ax] = it % n
        else:
            start, stop, step = it.indices(n)
            if (start, stop, step) != (0, n, 1):
                if step != 1:
                    ctx.unsupported("strided slicing")
                    return
                sizes = [start, max(stop - start, 0), n - max(stop, start)]
                pieces = _split_outputs(ctx, Value((n,), [layout[ax]]), 0, sizes)
                layout[ax] = pieces[1][0]
            kept.append(("axis", ax))
        ax += 1
    for a, j in selected.items():
        layout = [select(L, a, j) for L in layout]
    to_out = {a: k for k, (kind, a) in enumerate(kept) if kind == "axis"}
    out = [rebase(ctx, layout[a], to_out) if kind == "axis" else ctx.fixed(1) for kind, a in kept]
    ctx.set_output(out)


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
