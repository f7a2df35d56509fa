"""Reusable propagation rules: the building blocks of layer handlers.

Each rule takes an :class:`~mudsc_graph.propagate.OpContext` and sets the node's output. The
built-in handlers in ``mudsc_plugins.layers`` are thin registrations of these rules, and plugin
authors can reuse them (``rules.elementwise`` for a custom activation, ``rules.reshape`` for a
custom view op, ...). Rules fall back to ``ctx.unsupported`` on anything they do not understand, so
the result is less merged, never wrong.
"""

from __future__ import annotations

from typing import Any, Sequence

from .propagate import OpContext, Value
from .spaces import Dep, Layout, Sum, remap, select


# -- small helpers --------------------------------------------------------------------------------
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


def no_tensor_output(ctx: OpContext) -> None:
    """Ops that return shapes, sizes or other metadata: nothing to link."""
    ctx.set_output(None if not isinstance(ctx.out_shape, tuple) else ctx.fresh_output())


# -- elementwise ----------------------------------------------------------------------------------
def elementwise(ctx: OpContext) -> None:
    """Every tensor input is broadcast to the output and indexes the same units per axis."""
    if not isinstance(ctx.out_shape, tuple):
        ctx.set_output(None)
        return
    ctx.set_output(ctx.broadcast(ctx.tensor_inputs()))


def unary(ctx: OpContext) -> None:
    """Output axes are the first input's (contiguous, clone, to, dropout, softmax(dim) ...)."""
    x = ctx.input(0)
    if not isinstance(x, Value) or not isinstance(ctx.out_shape, tuple) or tuple(ctx.out_shape) != x.shape:
        elementwise(ctx)
        return
    ctx.set_output(ctx.like(x))


# -- layers with weights --------------------------------------------------------------------------
def linear_layer(ctx: OpContext, x: Value, w: Value, b: Value | None) -> None:
    """``y = x @ w.T + b``: x's last axis = w's columns; y's last axis = w's rows = b."""
    ctx.link(x.axis(-1), w.axis(1))
    if b is not None:
        ctx.link(b.axis(0), w.axis(0))
    ctx.set_output([rebase(ctx, L, {i: i for i in range(x.ndim - 1)}) for L in x.layout[:-1]] + [w.axis(0)])


def param_value(ctx: OpContext, name: str) -> Value | None:
    if not ctx.has_param(name):
        return None
    t = getattr(ctx.module, name)
    return Value(tuple(t.shape), [ctx.param(name, i) for i in range(t.dim())])


def nn_linear(ctx: OpContext) -> None:
    linear_layer(ctx, ctx.input(0), param_value(ctx, "weight"), param_value(ctx, "bias"))


def f_linear(ctx: OpContext) -> None:
    w, b = ctx.input(1, "weight"), ctx.input(2, "bias")
    if not isinstance(w, Value):
        ctx.unsupported("F.linear with a weight that is not a parameter")
        return
    linear_layer(ctx, ctx.input(0), w, b if isinstance(b, Value) else None)


def conv_layer(ctx: OpContext, x: Value, w: Value, b: Value | None, groups: int, transposed: bool = False) -> None:
    """Convolution: channel axis ``-k-1`` of x is read, a new channel space is produced.

    ``groups > 1`` gives both channel spaces ``groups`` blocks that share one block
    permutation; the weight's second axis indexes the inside of the block its row belongs to.
    """
    k = w.ndim - 2
    c = x.ndim - k - 1
    for i in range(2, w.ndim):
        ctx.spaces.fix(w.axis(i), "")  # kernel taps
    out_ax, in_ax = (1, 0) if transposed else (0, 1)
    if groups == 1:
        ctx.link(x.axis(c), w.axis(in_ax))
        out_space: Layout = w.axis(out_ax)
    else:
        if transposed:
            ctx.unsupported("grouped transposed convolution")
            return
        r_in, _ = ctx.blocks(x.axis(c), groups)
        r_out, _ = ctx.blocks(w.axis(0), groups)
        ctx.link(r_in, r_out)
        ctx.param_inner("weight", 1, x.axis(c), groups)
        out_space = w.axis(0)
    if b is not None:
        ctx.link(b.axis(0), out_space)
    out = [rebase(ctx, L, {i: i for i in range(c)}) for L in x.layout[:c]]
    out.append(out_space)
    out += [ctx.fixed(n) for n in ctx.out_shape[c + 1 :]]
    ctx.set_output(out)


def nn_conv(ctx: OpContext) -> None:
    m = ctx.module
    transposed = bool(getattr(m, "transposed", False))
    conv_layer(ctx, ctx.input(0), param_value(ctx, "weight"), param_value(ctx, "bias"), m.groups, transposed)


def channel_norm(ctx: OpContext) -> None:
    """BatchNorm / InstanceNorm: per-channel affine and statistics on axis 1 (or the only axis)."""
    x = ctx.input(0)
    c = 1 if x.ndim > 1 else 0
    for name in ("weight", "bias", "running_mean", "running_var"):
        p = param_value(ctx, name)
        if p is not None:
            ctx.link(x.axis(c), p.axis(0))
    ctx.set_output(ctx.like(x))


def layer_norm(ctx: OpContext, x: Value, k: int, w: Value | None, b: Value | None) -> None:
    """LayerNorm over the last ``k`` axes: statistics are permutation invariant, affine per unit."""
    for p in (w, b):
        if p is not None:
            for i in range(k):
                ctx.link(x.axis(x.ndim - k + i), p.axis(i))
    ctx.set_output(ctx.like(x))


def nn_layer_norm(ctx: OpContext) -> None:
    k = len(ctx.module.normalized_shape)
    layer_norm(ctx, ctx.input(0), k, param_value(ctx, "weight"), param_value(ctx, "bias"))


def f_layer_norm(ctx: OpContext) -> None:
    shape = ctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    w, b = ctx.input(2, "weight"), ctx.input(3, "bias")
    layer_norm(ctx, ctx.input(0), k, w if isinstance(w, Value) else None, b if isinstance(b, Value) else None)


def group_norm(ctx: OpContext, x: Value, groups: int, w: Value | None, b: Value | None) -> None:
    """GroupNorm: the channel space gets ``groups`` blocks (statistics are per block)."""
    ctx.blocks(x.axis(1), groups)
    for p in (w, b):
        if p is not None:
            ctx.link(x.axis(1), p.axis(0))
    ctx.set_output(ctx.like(x))


def nn_group_norm(ctx: OpContext) -> None:
    group_norm(ctx, ctx.input(0), ctx.module.num_groups, param_value(ctx, "weight"), param_value(ctx, "bias"))


def f_group_norm(ctx: OpContext) -> None:
    w, b = ctx.input(2, "weight"), ctx.input(3, "bias")
    group_norm(ctx, ctx.input(0), ctx.arg(1, "num_groups"), w if isinstance(w, Value) else None, b if isinstance(b, Value) else None)


def embedding(ctx: OpContext, ids: Value, w: Value) -> None:
    """Rows of ``w`` are looked up by the input ids (fixed); its columns are the output units."""
    ctx.spaces.fix(w.axis(0), "")
    ctx.set_output(ctx.like(ids) + [w.axis(1)])


def nn_embedding(ctx: OpContext) -> None:
    embedding(ctx, ctx.input(0), param_value(ctx, "weight"))


def f_embedding(ctx: OpContext) -> None:
    embedding(ctx, ctx.input(0), ctx.input(1, "weight"))


def prelu(ctx: OpContext) -> None:
    x, w = ctx.input(0), param_value(ctx, "weight")
    if w is not None and w.shape[0] > 1:
        ctx.link(x.axis(1 if x.ndim > 1 else 0), w.axis(0))
    ctx.set_output(ctx.like(x))


# -- spatial ops ----------------------------------------------------------------------------------
def spatial(ctx: OpContext, k: int | None = None) -> None:
    """Pooling, upsampling: the last ``k`` (spatial) axes change, the others pass through."""
    x = ctx.input(0)
    out = list(ctx.out_shape)
    if k is None:
        k = _spatial_dims(ctx)
    keep = x.ndim - k
    layout = [rebase(ctx, L, {i: i for i in range(keep)}) for L in x.layout[:keep]]
    ctx.set_output(layout + [ctx.fixed(n) for n in out[keep:]])


def _spatial_dims(ctx: OpContext) -> int:
    name = type(ctx.module).__name__ if ctx.module is not None else getattr(ctx.node.target, "__name__", "")
    for d in ("1d", "2d", "3d"):
        if name.endswith(d):
            return int(d[0])
    x = ctx.input(0)
    return max(x.ndim - 2, 1)


def pad(ctx: OpContext) -> None:
    x = ctx.input(0)
    widths = list(ctx.arg(1, "pad"))
    out = ctx.like(x)
    for j in range(len(widths) // 2):
        ax = x.ndim - 1 - j
        if widths[2 * j] or widths[2 * j + 1]:
            ctx.spaces.fix_layout(x.axis(ax), "" if ctx.spaces.settled(x.axis(ax)) else ctx._reason() + " (padding a unit axis)")
            out[ax] = ctx.fixed(ctx.out_shape[ax])
    ctx.set_output(out)


# -- shape ops --------------------------------------------------------------------------------------
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


# -- reductions -------------------------------------------------------------------------------------
def reduce(ctx: OpContext, returns_indices: bool = False) -> None:
    """mean / sum / amax / norm / var ... over ``dim``: reduced axes vanish (or become size 1)."""
    x = ctx.input(0)
    dims = _dims(ctx.arg(1, "dim"), x.ndim) if x.ndim else []
    if dims is None:
        dims = list(range(x.ndim))
    if returns_indices:
        for d in dims:
            ctx.spaces.fix_layout(x.axis(d), "" if ctx.spaces.settled(x.axis(d)) else f"an arg-max over units at node {ctx.node.name}")
    out_shape = ctx.out_shape if isinstance(ctx.out_shape, tuple) else ctx.out_shape[0]
    keepdim = len(out_shape) == x.ndim
    mapping, k = {}, 0
    for i in range(x.ndim):
        if i not in dims or keepdim:
            mapping[i] = k
            k += 1
    out = []
    for i in range(x.ndim):
        if i in dims:
            if keepdim:
                out.append(ctx.fixed(1))
        else:
            out.append(rebase(ctx, x.layout[i], {a: b for a, b in mapping.items() if a not in dims}))
    if isinstance(ctx.out_shape, list):  # (values, indices)
        ctx.set_output([out, list(out)])
    else:
        ctx.set_output(out)


# -- contractions -----------------------------------------------------------------------------------
def matmul(ctx: OpContext) -> None:
    """``a @ b``: a's last axis and b's second to last are contracted (one space); batch axes broadcast."""
    a, b = ctx.input(0), ctx.input(1)
    if not isinstance(a, Value) or not isinstance(b, Value):
        ctx.unsupported("matmul with a non-tensor")
        return
    out_shape = ctx.out_shape
    a2 = a if a.ndim > 1 else Value((1,) + a.shape, [ctx.fixed(1)] + [_plain(ctx, a.axis(0))])
    b2 = b if b.ndim > 1 else Value(b.shape + (1,), [_plain(ctx, b.axis(0)), ctx.fixed(1)])
    nb = max(a2.ndim, b2.ndim) - 2
    ma = {i: i + nb - (a2.ndim - 2) for i in range(a2.ndim - 2)}
    mb = {i: i + nb - (b2.ndim - 2) for i in range(b2.ndim - 2)}
    ctx.link(rebase(ctx, a2.axis(-1), ma), rebase(ctx, b2.axis(-2), mb))
    batch = ctx.broadcast(
        [
            Value(a2.shape[:-2], [rebase(ctx, L, {i: i for i in range(a2.ndim - 2)}) for L in a2.layout[:-2]]),
            Value(b2.shape[:-2], [rebase(ctx, L, {i: i for i in range(b2.ndim - 2)}) for L in b2.layout[:-2]]),
        ],
        tuple(max(p, q) for p, q in zip((1,) * (nb - (a2.ndim - 2)) + a2.shape[:-2], (1,) * (nb - (b2.ndim - 2)) + b2.shape[:-2])),
    )
    out = batch + [rebase(ctx, a2.axis(-2), ma), rebase(ctx, b2.axis(-1), mb)]
    if a.ndim == 1:
        out.pop(-2)
    if b.ndim == 1:
        out.pop(-1)
    if len(out) != len(out_shape):
        ctx.unsupported("matmul with unexpected output rank")
        return
    ctx.set_output(out)


def _plain(ctx: OpContext, L: Layout) -> Layout:
    return ctx.spaces.collapse(L)


def sdpa(ctx: OpContext) -> None:
    """scaled_dot_product_attention(q, k, v): q/k contracted on the last axis, k/v share tokens."""
    q, k, v = ctx.input(0, "query"), ctx.input(1, "key"), ctx.input(2, "value")
    if ctx.node.kwargs.get("enable_gqa") or not (q.ndim == k.ndim == v.ndim) or q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        ctx.unsupported("attention with broadcast or grouped-query heads")
        return
    n = q.ndim
    batch = {i: i for i in range(n - 2)}
    for i in range(n - 2):
        ctx.link(rebase(ctx, q.axis(i), batch), rebase(ctx, k.axis(i), batch))
        ctx.link(rebase(ctx, q.axis(i), batch), rebase(ctx, v.axis(i), batch))
    ctx.link(rebase(ctx, q.axis(-1), batch), rebase(ctx, k.axis(-1), batch))
    ctx.link(rebase(ctx, k.axis(-2), batch), rebase(ctx, v.axis(-2), batch))
    mask = ctx.input(3, "attn_mask")
    if isinstance(mask, Value):
        ctx.fix(*mask.layout, reason="")
    ctx.set_output(
        [rebase(ctx, L, batch) for L in q.layout[:-1]] + [rebase(ctx, v.axis(-1), batch)]
    )


def multihead_attention(ctx: OpContext) -> None:
    """nn.MultiheadAttention as a leaf: packed q/k/v rows are sum(QK, QK, V), each with H head blocks."""
    m = ctx.module
    if m.bias_k is not None or m.add_zero_attn:
        ctx.unsupported("add_bias_kv / add_zero_attn")
        return
    q, k, v = ctx.input(0, "query"), ctx.input(1, "key"), ctx.input(2, "value")
    sp = ctx.spaces
    H, E = m.num_heads, m.embed_dim
    Dh = E // H
    h = sp.new(H)
    qk = sp.stack_of(h, [sp.new(Dh) for _ in range(H)])
    vo = sp.stack_of(h, [sp.new(Dh) for _ in range(H)])
    if m._qkv_same_embed_dim:
        sp.define(ctx.param("in_proj_weight", 0), Sum((qk, qk, vo)))
        for x in (q, k, v):
            ctx.link(x.axis(-1), ctx.param("in_proj_weight", 1))
    else:
        for name, x, rows in (("q_proj_weight", q, qk), ("k_proj_weight", k, qk), ("v_proj_weight", v, vo)):
            ctx.link(ctx.param(name, 0), rows)
            ctx.link(x.axis(-1), ctx.param(name, 1))
    if m.in_proj_bias is not None:
        ctx.link(ctx.param("in_proj_bias", 0), sp.sum_of((qk, qk, vo)))
    ctx.link(ctx.param("out_proj.weight", 1), vo)
    out_units = ctx.param("out_proj.weight", 0)
    if m.out_proj.bias is not None:
        ctx.link(ctx.param("out_proj.bias", 0), out_units)
    # token and batch axes: query's pass to the output; key and value share theirs
    for i in range(q.ndim - 1):
        if m.batch_first and i == 0 or not m.batch_first and i == 1:
            ctx.link(_plain(ctx, q.axis(i)), _plain(ctx, k.axis(i)))
            ctx.link(_plain(ctx, q.axis(i)), _plain(ctx, v.axis(i)))
        else:
            ctx.link(_plain(ctx, k.axis(i)), _plain(ctx, v.axis(i)))
    out = [_plain(ctx, L) for L in q.layout[:-1]] + [out_units]
    weights_shape = ctx.out_shape[1] if isinstance(ctx.out_shape, list) else None
    ctx.set_output([out, [ctx.fixed(n) for n in weights_shape] if weights_shape else None])


def einsum(ctx: OpContext) -> None:
    """einsum: axes with the same subscript letter index the same units; "..." aligns right."""
    eq = ctx.arg(0, "equation")
    ops = [v for v in ctx.node.args[1:]]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    values = [ctx.value(o) for o in ops]
    if not isinstance(eq, str) or not all(isinstance(v, Value) for v in values):
        ctx.unsupported("einsum with non-tensor operands")
        return
    eq = eq.replace(" ", "")
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    specs = lhs.split(",")
    n_ell = max((v.ndim - len(s.replace("...", "")) for s, v in zip(specs, values) if "..." in s), default=0)
    ell = [f"...{i}" for i in range(n_ell)]

    def letters(spec: str, ndim: int) -> list[str]:
        if "..." not in spec:
            return list(spec)
        a, b = spec.split("...")
        k = ndim - len(a) - len(b)
        return list(a) + ell[n_ell - k :] + list(b)

    if rhs is None:  # implicit output: ellipsis then letters that appear once, sorted
        counts: dict[str, int] = {}
        for c in lhs.replace(",", "").replace("...", ""):
            counts[c] = counts.get(c, 0) + 1
        out_letters = ell + sorted(c for c, n in counts.items() if n == 1)
    else:
        out_letters = letters(rhs, len(ctx.out_shape))
    frame: dict[str, int] = {}
    per_letter: dict[str, Layout] = {}
    for spec, v in zip(specs, values):
        names = letters(spec, v.ndim)
        if len(names) != v.ndim or len(set(names)) != len(names):
            ctx.unsupported("einsum with repeated subscripts in one operand")
            return
        for c in names:
            frame.setdefault(c, len(frame))
        mapping = {i: frame[c] for i, c in enumerate(names)}
        for i, c in enumerate(names):
            if v.shape[i] == 1:
                continue
            L = rebase(ctx, v.layout[i], mapping)
            if c in per_letter:
                ctx.link(per_letter[c], L)
            else:
                per_letter[c] = L
    to_out = {frame[c]: k for k, c in enumerate(out_letters) if c in frame}
    ctx.set_output(
        [rebase(ctx, per_letter[c], to_out) if c in per_letter else ctx.fixed(ctx.out_shape[k]) for k, c in enumerate(out_letters)]
    )


def constant_like(ctx: OpContext) -> None:
    """zeros_like / ones_like / full_like ...: values do not depend on the input's units."""
    ctx.set_output([ctx.new(n) for n in ctx.out_shape])


def f_conv(ctx: OpContext) -> None:
    w, b = ctx.input(1, "weight"), ctx.input(2, "bias")
    if not isinstance(w, Value):
        ctx.unsupported("convolution with a weight that is not a parameter")
        return
    groups = ctx.arg(6, "groups", 1)
    conv_layer(ctx, ctx.input(0), w, b if isinstance(b, Value) else None, groups)


def f_batch_norm(ctx: OpContext) -> None:
    x = ctx.input(0)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = ctx.input(i, name)
        if isinstance(p, Value):
            ctx.link(x.axis(1 if x.ndim > 1 else 0), p.axis(0))
    ctx.set_output(ctx.like(x))


def arg_reduce(ctx: OpContext) -> None:
    """max / min / argmax / argmin: with a tensor second argument, an elementwise max or min."""
    if isinstance(ctx.arg(1, "other"), type(ctx.node)):
        elementwise(ctx)
    else:
        reduce(ctx, returns_indices=True)
