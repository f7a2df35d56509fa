"""Rules for layers with weights: linear, convolution, norms, embedding, attention."""

from __future__ import annotations

from typing import Any

from ..propagate import OpContext, Value, op_name
from ..spaces import Layout, Sum
from .base import _plain, param_value, rebase


def linear_layer(ctx: OpContext, x: Value, w: Value, b: Value | None) -> None:
    """``y = x @ w.T + b``: x's last axis = w's columns; y's last axis = w's rows = b."""
    ctx.contract(x.axis(-1), w.axis(1))
    if b is not None:
        ctx.link(b.axis(0), w.axis(0))
    ctx.set_output([rebase(ctx, L, {i: i for i in range(x.ndim - 1)}) for L in x.layout[:-1]] + [w.axis(0)])


def nn_linear(ctx: OpContext) -> None:
    linear_layer(ctx, ctx.input(0), param_value(ctx, "weight"), param_value(ctx, "bias"))


def f_linear(ctx: OpContext) -> None:
    w, b = ctx.input(1, "weight"), ctx.input(2, "bias")
    if not isinstance(w, Value):
        ctx.unsupported("F.linear with a weight that is not a parameter")
        return
    linear_layer(ctx, ctx.input(0), w, b if isinstance(b, Value) else None)


def _attr_name(ctx: OpContext, node: Any) -> str | None:
    """The state_dict name behind a ``get_attr`` argument, else ``None``."""
    return str(node.target) if getattr(node, "op", None) == "get_attr" else None


def conv_layer(
    ctx: OpContext, x: Value, w: Value, b: Value | None, groups: int, transposed: bool = False, *, weight_name: str | None = None
) -> None:
    """Convolution: channel axis ``-k-1`` of x is read, a new channel space is produced.

    ``groups > 1`` gives both channel spaces ``groups`` blocks that share one block
    permutation; the weight's second axis indexes the inside of the block its row belongs to.
    """
    k = w.ndim - 2
    c = x.ndim - k - 1
    for i in range(2, w.ndim):
        ctx.fix(w.axis(i), reason="", note="kernel taps")
    out_ax, in_ax = (1, 0) if transposed else (0, 1)
    if groups == 1:
        ctx.contract(x.axis(c), w.axis(in_ax))
        out_space: Layout = w.axis(out_ax)
    else:
        if transposed:
            ctx.unsupported("grouped transposed convolution")
            return
        r_in, _ = ctx.blocks(x.axis(c), groups)
        r_out, _ = ctx.blocks(w.axis(0), groups)
        ctx.link(r_in, r_out)
        if w.shape[1] == 1:  # depthwise: each row reads the one channel of its block, nothing moves inside
            pass
        elif weight_name is None:  # a weight computed in forward: no parameter to express the inner axis on
            ctx.fix(x.axis(c), w.axis(0), w.axis(1), reason="", note="a grouped convolution with a computed weight")
        else:
            ctx.param_inner(weight_name, 1, x.axis(c), groups, full=True)
        out_space = w.axis(0)
    if b is not None:
        ctx.link(b.axis(0), out_space)
    out = [rebase(ctx, L, {i: i for i in range(c)}) for L in x.layout[:c]]
    out.append(out_space)
    out += [ctx.new_fixed(n) for n in ctx.out_shape[c + 1 :]]
    ctx.set_output(out)


def nn_conv(ctx: OpContext) -> None:
    m = ctx.module
    transposed = bool(getattr(m, "transposed", False))
    weight = f"{ctx.path}.weight" if ctx.path else "weight"
    conv_layer(ctx, ctx.input(0), param_value(ctx, "weight"), param_value(ctx, "bias"), m.groups, transposed, weight_name=weight)


def f_conv(ctx: OpContext) -> None:
    """``F.conv*d``, ``F.conv_transpose*d`` and their ATen twins (``aten.convolution`` included).

    The weight may be computed in forward (``F.conv2d(x, self.w * s, groups=g)``): only its axes'
    spaces matter, so a weight that is not a parameter works as long as it is a tensor.
    """
    w, b = ctx.input(1, "weight"), ctx.input(2, "bias")
    if not isinstance(w, Value):
        ctx.unsupported("convolution with a weight that is not a tensor")
        return
    name = op_name(ctx.node.target)
    transposed = "transpose" in name or bool(ctx.arg(None, "transposed", False))
    groups = ctx.arg(None if transposed and "transpose" in name else 6, "groups", 1)
    if not isinstance(groups, int):
        ctx.unsupported("convolution with computed groups")
        return
    conv_layer(ctx, ctx.input(0), w, b if isinstance(b, Value) else None, groups, transposed, weight_name=_attr_name(ctx, ctx.arg(1, "weight")))


def channel_norm(ctx: OpContext) -> None:
    """BatchNorm / InstanceNorm: per-channel affine and statistics on axis 1 (or the only axis)."""
    x = ctx.input(0)
    c = 1 if x.ndim > 1 else 0
    for name in ("weight", "bias", "running_mean", "running_var"):
        p = param_value(ctx, name)
        if p is not None:
            ctx.link(x.axis(c), p.axis(0))
    ctx.set_output(ctx.like(x))


def f_batch_norm(ctx: OpContext) -> None:
    """``F.batch_norm`` and its ATen twins (``aten.batch_norm``, ``_native_batch_norm_legit*``, whose
    extra outputs are per-channel statistics)."""
    x = ctx.input(0)
    c = 1 if x.ndim > 1 else 0
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = ctx.input(i, name)
        if isinstance(p, Value):
            ctx.link(x.axis(c), p.axis(0))
    if isinstance(ctx.out_shape, list):  # (output, saved mean, saved inverse std)
        extra = [[x.axis(c)] if s == (x.shape[c],) else [ctx.new_fixed(n) for n in s] for s in ctx.out_shape[1:]]
        ctx.set_output([ctx.like(x)] + extra)
        return
    ctx.set_output(ctx.like(x))


def layer_norm(ctx: OpContext, x: Value, k: int, w: Value | None, b: Value | None) -> None:
    """LayerNorm over the last ``k`` axes: statistics are permutation invariant, affine per unit."""
    for p in (w, b):
        if p is not None:
            for i in range(k):
                ctx.link(x.axis(x.ndim - k + i), p.axis(i))
    if isinstance(ctx.out_shape, list):  # native_layer_norm: (output, mean, rstd) per normalised row
        ctx.set_output([ctx.like(x)] + [[ctx.new_fixed(n) for n in s] for s in ctx.out_shape[1:]])
        return
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
    ctx.fix(w.axis(0), reason="", note="rows looked up by index (a vocabulary, positions or buckets)")
    ctx.set_output(ctx.like(ids) + [w.axis(1)])


def nn_embedding(ctx: OpContext) -> None:
    embedding(ctx, ctx.input(0), param_value(ctx, "weight"))


def f_embedding(ctx: OpContext) -> None:
    """``F.embedding(input, weight)`` and ``aten.embedding(weight, indices)`` (found by name)."""
    ids = ctx.input(0, "indices")
    embedding(ctx, ids if ids is not None else ctx.input(0, "input"), ctx.input(1, "weight"))


def prelu(ctx: OpContext) -> None:
    x, w = ctx.input(0), param_value(ctx, "weight")
    if w is not None and w.shape[0] > 1:
        ctx.link(x.axis(1 if x.ndim > 1 else 0), w.axis(0))
    ctx.set_output(ctx.like(x))


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
            ctx.contract(x.axis(-1), ctx.param("in_proj_weight", 1))
    else:
        for name, x, rows in (("q_proj_weight", q, qk), ("k_proj_weight", k, qk), ("v_proj_weight", v, vo)):
            ctx.link(ctx.param(name, 0), rows)
            ctx.contract(x.axis(-1), ctx.param(name, 1))
    if m.in_proj_bias is not None:
        ctx.link(ctx.param("in_proj_bias", 0), sp.sum_of((qk, qk, vo)))
    ctx.contract(vo, ctx.param("out_proj.weight", 1))
    ctx.internal_probe(qk, "qk")
    ctx.internal_probe(vo, "v")
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
    ctx.set_output([out, [ctx.new_fixed(n) for n in weights_shape] if weights_shape else None])


def multihead_attention_features(module: Any, args: tuple, kwargs: dict, key: str) -> Any:
    """Query (``key="qk"``) or value (``"v"``) projections of ``nn.MultiheadAttention``, units last."""
    import torch.nn.functional as F

    names = ("query", "key", "value")
    x = {n: args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)}
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        w_q, w_v = module.in_proj_weight[:E], module.in_proj_weight[2 * E :]
    else:
        w_q, w_v = module.q_proj_weight, module.v_proj_weight
    b = module.in_proj_bias
    b_q, b_v = (None, None) if b is None else (b[:E], b[2 * E :])
    if key == "qk":
        return F.linear(x["query"], w_q, b_q)
    return F.linear(x["value"], w_v, b_v)
