"""Rules for ops that act per unit: elementwise, reductions, pooling, padding, metadata."""

from __future__ import annotations

from ..propagate import OpContext, Value, op_name
from ..spaces import Dep
from .base import _dims, rebase
from .contract import _blocks_of


def no_tensor_output(ctx: OpContext) -> None:
    """Ops that return shapes, sizes or other metadata: nothing to link."""
    ctx.set_output(None if not isinstance(ctx.out_shape, tuple) else ctx.fresh_output())


def elementwise(ctx: OpContext) -> None:
    """Every tensor input is broadcast to the output and indexes the same units per axis."""
    if not isinstance(ctx.out_shape, tuple):
        ctx.set_output(None)
        return
    ctx.set_output(ctx.broadcast(_per_block_params(ctx, ctx.tensor_inputs())))


def _per_block_params(ctx: OpContext, values: list[Value]) -> list[Value]:
    """A parameter whose first axis is the block axis of another operand's units takes a space per
    block along them: the biases ``(experts, hidden)`` of experts stored as 3-D tensors, added to
    ``(tokens, experts, hidden)`` whose hidden units are each expert's own (else every expert's bias
    would tie all experts to one permutation)."""
    n = len(ctx.out_shape)
    refs = {i + n - v.ndim: L.ref + n - v.ndim for v in values for i, L in enumerate(v.layout) if isinstance(L, Dep)}
    if not refs:
        return values
    nodes = {id(ctx.value(a)): a for a in ctx.node.all_input_nodes if a.op == "get_attr"}
    out = []
    for v in values:
        off, node = n - v.ndim, nodes.get(id(v))
        if node is not None and v.ndim >= 2 and any(refs.get(i + off) == off for i in range(1, v.ndim)):
            layout = list(v.layout)
            for i in range(1, v.ndim):
                parts = _blocks_of(ctx, node, v, i, 0, summed=False) if refs.get(i + off) == off else None
                if parts:
                    layout[i] = Dep(0, tuple(parts))
            v = Value(v.shape, layout)
        out.append(v)
    return out


def unary(ctx: OpContext) -> None:
    """Output axes are the first input's (contiguous, clone, to, dropout, softmax(dim) ...)."""
    x = ctx.input(0)
    if not isinstance(x, Value) or not isinstance(ctx.out_shape, tuple) or tuple(ctx.out_shape) != x.shape:
        elementwise(ctx)
        return
    ctx.set_output(ctx.like(x))


def constant_like(ctx: OpContext) -> None:
    """zeros_like / ones_like / full_like ...: values do not depend on the input's units."""
    ctx.set_output([ctx.new(n) for n in ctx.out_shape])


def spatial(ctx: OpContext, k: int | None = None) -> None:
    """Pooling, upsampling: the last ``k`` (spatial) axes change, the others pass through."""
    x = ctx.input(0)
    out = list(ctx.out_shape) if isinstance(ctx.out_shape, tuple) else []
    if k is None:
        k = _spatial_dims(ctx)
    keep = x.ndim - k
    for L in x.layout[keep:]:  # pooling reads positions in order: those axes must not move
        ctx.fix_units(L, "pooling over a unit axis")
    layout = [rebase(ctx, L, {i: i for i in range(keep)}) for L in x.layout[:keep]]
    if isinstance(ctx.out_shape, list):  # (values, indices) of max_pool*_with_indices
        ctx.set_output([layout + [ctx.new_fixed(n) for n in s[keep:]] for s in ctx.out_shape])
        return
    ctx.set_output(layout + [ctx.new_fixed(n) for n in out[keep:]])


def _spatial_dims(ctx: OpContext) -> int:
    name = type(ctx.module).__name__ if ctx.module is not None else op_name(ctx.node.target)
    name = name.removesuffix("_with_indices")
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
            ctx.fix_units(x.axis(ax), "padding a unit axis")
            out[ax] = ctx.new_fixed(ctx.out_shape[ax])
    ctx.set_output(out)


def reduce(ctx: OpContext, returns_indices: bool = False) -> None:
    """mean / sum / amax / norm / var ... over ``dim``: reduced axes vanish (or become size 1)."""
    x = ctx.input(0)
    dims = _dims(ctx.arg(1, "dim"), x.ndim) if x.ndim else []
    if dims is None:
        dims = list(range(x.ndim))
    if returns_indices:
        for d in dims:
            ctx.fix(x.axis(d), reason="" if ctx.spaces.settled(x.axis(d)) else f"an arg-max over units at node {ctx.node.name}")
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
                out.append(ctx.new_fixed(1))
        else:
            out.append(rebase(ctx, x.layout[i], {a: b for a, b in mapping.items() if a not in dims}))
    if isinstance(ctx.out_shape, list):  # (values, indices)
        ctx.set_output([out, list(out)])
    else:
        ctx.set_output(out)


def arg_reduce(ctx: OpContext) -> None:
    """max / min / argmax / argmin.

    With a tensor second argument: an elementwise max or min. ``max(x)`` without ``dim`` is a
    plain reduction; with ``dim`` (or argmax) it also returns positions, which depend on the
    order of units along ``dim``: that space is fixed.
    """
    other = ctx.arg(1, "other") if ctx.node.op == "call_method" or "other" in ctx.node.kwargs else ctx.arg(1)
    if isinstance(other, type(ctx.node)):
        elementwise(ctx)
        return
    name = op_name(ctx.node.target)
    has_dim = ctx.arg(1, "dim") is not None
    reduce(ctx, returns_indices=has_dim or name in ("argmax", "argmin"))
