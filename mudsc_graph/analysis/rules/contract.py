"""Rules for contractions: matmul, scaled dot-product attention, einsum."""

from __future__ import annotations

from ..propagate import OpContext, Value
from ..spaces import Dep, Layout
from .base import _plain, rebase


def matmul(ctx: OpContext) -> None:
    """``a @ b``: a's last axis and b's second to last are contracted (one space); batch axes broadcast."""
    a, b = ctx.input(0), ctx.input(1)
    if not isinstance(a, Value) or not isinstance(b, Value):
        ctx.unsupported("matmul with a non-tensor")
        return
    out_shape = ctx.out_shape
    a2 = a if a.ndim > 1 else Value((1,) + a.shape, [ctx.new_fixed(1)] + [_plain(ctx, a.axis(0))])
    b2 = b if b.ndim > 1 else Value(b.shape + (1,), [_plain(ctx, b.axis(0)), ctx.new_fixed(1)])
    nb = max(a2.ndim, b2.ndim) - 2
    ma = {i: i + nb - (a2.ndim - 2) for i in range(a2.ndim - 2)}
    mb = {i: i + nb - (b2.ndim - 2) for i in range(b2.ndim - 2)}
    ctx.link(rebase(ctx, a2.axis(-1), ma), rebase(ctx, b2.axis(-2), mb))
    for i, operand in ((0, a), (1, b)):  # a parameter operand reads the units it is summed over
        if ctx.is_constant(ctx.arg(i)):
            ctx.reads(operand.axis(-1) if i == 0 else operand.axis(-2 if operand.ndim > 1 else 0))
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


def sdpa(ctx: OpContext) -> None:
    """scaled_dot_product_attention(q, k, v, attn_mask): q/k contracted on the last axis, k/v share
    tokens, and the mask is added to the scores ``(..., Tq, Tk)``: its axes join theirs, so a
    per-head mask or bias (T5's relative positions, Swin's window bias) moves with the heads."""
    q, k, v = ctx.input(0, "query"), ctx.input(1, "key"), ctx.input(2, "value")
    if ctx.arg(7, "enable_gqa") or not (q.ndim == k.ndim == v.ndim) or q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
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
        scores = Value(q.shape[:-1] + (k.shape[-2],), [rebase(ctx, L, batch) for L in q.layout[:-1]] + [rebase(ctx, k.axis(-2), batch)])
        ctx.broadcast([scores, mask], scores.shape)
    ctx.set_output(
        [rebase(ctx, L, batch) for L in q.layout[:-1]] + [rebase(ctx, v.axis(-1), batch)]
    )


def addmm(ctx: OpContext) -> None:
    """``addmm(bias, a, b)`` = ``a @ b + bias`` (``aten.addmm``, ``torch.addmm``)."""
    bias, a, b = ctx.input(0, "self"), ctx.input(1, "mat1"), ctx.input(2, "mat2")
    if not all(isinstance(v, Value) for v in (bias, a, b)) or a.ndim != 2 or b.ndim != 2:
        ctx.unsupported("addmm with non-matrix operands")
        return
    ctx.link(a.axis(1), b.axis(0))
    for i, operand, ax in ((1, a, 1), (2, b, 0)):
        if ctx.is_constant(ctx.arg(i)):
            ctx.reads(operand.axis(ax))
    product = Value((a.shape[0], b.shape[1]), [_plain(ctx, a.axis(0)), _plain(ctx, b.axis(1))])
    ctx.set_output(ctx.broadcast([product, bias], product.shape))


def einsum(ctx: OpContext) -> None:
    """einsum: axes with the same subscript letter index the same units; "..." aligns right."""
    eq = ctx.arg(0, "equation")
    ops = [v for v in ctx.node.args[1:]]
    if ops and isinstance(ops[0], (list, tuple)):  # torch.einsum(eq, [a, b]) and aten.einsum(eq, [a, b], path)
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
    names_of = [letters(spec, v.ndim) for spec, v in zip(specs, values)]
    if any(len(names) != v.ndim or len(set(names)) != len(names) for names, v in zip(names_of, values)):
        ctx.unsupported("einsum with repeated subscripts in one operand")
        return
    for names in names_of:
        for c in names:
            frame.setdefault(c, len(frame))
    blocked = _per_block_letters(ctx, ops, values, names_of, out_letters, frame)
    per_letter.update(blocked)
    for k, (names, v) in enumerate(zip(names_of, values)):
        mapping = {i: frame[c] for i, c in enumerate(names)}
        for i, c in enumerate(names):
            if v.shape[i] == 1 or c in blocked:
                continue
            L = rebase(ctx, v.layout[i], mapping)
            if c not in out_letters and ctx.is_constant(ops[k]):
                ctx.reads(v.layout[i])  # a summed-over axis of a parameter operand
            if c in per_letter:
                ctx.link(per_letter[c], L)
            else:
                per_letter[c] = L
    to_out = {frame[c]: k for k, c in enumerate(out_letters) if c in frame}
    ctx.set_output(
        [rebase(ctx, per_letter[c], to_out) if c in per_letter else ctx.new_fixed(ctx.out_shape[k]) for k, c in enumerate(out_letters)]
    )


def _per_block_letters(ctx: OpContext, ops: list, values: list[Value], names_of: list[list[str]], out_letters: list[str],
                       frame: dict[str, int]) -> dict[str, Layout]:
    """Letters whose units may differ per index of another letter: experts stored as 3-D tensors,
    ``einsum("td,eid->tei", h, w1)`` then ``einsum("tei,edi->ted", u, w2)``: every operand with ``i``
    also has ``e``, and so does the output if ``i`` is in it, so each expert's ``i`` units permute on
    their own. Such a letter gets a layout that depends on ``e`` (a ``Dep``); a parameter whose ``e``
    is its first axis keeps its ``i`` axis as the inside of ``e``'s blocks (``ctx.param_inner``)."""
    sizes = {c: v.shape[i] for names, v in zip(names_of, values) for i, c in enumerate(names)}
    out: dict[str, Layout] = {}
    has_dep = lambda c: any(isinstance(v.layout[names.index(c)], Dep) for names, v in zip(names_of, values) if c in names)  # noqa: E731
    for c in sorted(frame, key=lambda c: not has_dep(c)):  # letters that already depend on another first
        users = [k for k, names in enumerate(names_of) if c in names]
        batch = [b for b in frame if b != c and sizes[b] > 1 and all(b in names_of[k] for k in users)
                 and (c not in out_letters or b in out_letters)]
        if sizes[c] <= 1 or not batch:
            continue
        b = batch[0]
        blocks = [_blocks_of(ctx, ops[k], values[k], names_of[k].index(c), names_of[k].index(b), c not in out_letters) for k in users]
        if all(p is None for p in blocks) or any(p is False for p in blocks):
            continue  # nothing to gain (every operand shares one permutation over b) or a layout to keep whole
        known = next(p for p in blocks if p is not None)
        for parts in blocks:
            for j, q in enumerate(parts if parts is not None else ()):
                ctx.link(known[j], q)
        for k, parts in zip(users, blocks):
            if parts is None:  # an operand that shares one permutation over b: every block is that space
                for q in known:
                    ctx.link(q, ctx.spaces.collapse(values[k].layout[names_of[k].index(c)]))
        out[c] = Dep(frame[b], tuple(known))
    return out


def _blocks_of(ctx: OpContext, op, v: Value, ic: int, ib: int, summed: bool) -> list | None | bool:
    """The per-``b`` spaces of axis ``ic`` of an operand: its Dep's parts, fresh ones for a parameter
    whose axis ``ib`` is its first (recorded as the inside of ``b``'s blocks, read when ``summed``),
    ``None`` for a plain axis (one space for every ``b``), ``False`` for a structure this cannot follow."""
    L = v.layout[ic]
    if isinstance(L, Dep):
        return list(L.parts) if L.ref == ib and all(isinstance(p, int) for p in L.parts) else False
    name = str(op.target) if getattr(op, "op", None) == "get_attr" else None
    if name is None or ib != 0 or ctx.spaces.settled(L) or not isinstance(v.layout[0], int) or ctx.has_inner(name):
        return None  # (a tensor has at most one axis inside another's blocks)
    parts = [ctx.new(v.shape[ic]) for _ in range(v.shape[ib])]
    ctx.param_inner(name, ic, ctx.spaces.stack_of(v.layout[0], parts), v.shape[ib], full=True, reads=summed)
    return parts
