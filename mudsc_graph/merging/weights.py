"""Forming merged weights from per-group matchings.

For every tensor and model ``i``, each axis is brought into merged coordinates by a matrix
``A`` of shape ``(merged units, model units)`` applied along it, then the models are summed:

- the **averaging axis** (the first axis that does not read its units and carries a group;
  else the first that does not read its units) uses the merge block ``M_i`` (cluster averages over
  all models; fixed leaves use ``I / N``);
- other axes that do not read their units use ``M_i`` with rows normalised within model ``i``
  (for a permutation: the permutation itself);
- axes that *read* their units (weight columns, ``spec.consumed``) use the unmerge block
  ``U_i^T``: a consumer of merged unit ``c`` takes model ``i``'s weights of every unit in ``c``.

So ``W' = sum_i M_i W_i U_i`` for a Linear, ``b' = sum_i M_i b_i`` for its bias, and a tensor with no
axis that does not read (rare) is averaged with ``1 / N``. Expressions (:mod:`mudsc_graph.spec.axes`)
are applied structurally (``Concat`` splits, ``Kron`` reshapes), never as dense Kronecker products.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..spec.axes import Expr, grouped_axis, has_group, match, size, to_json, ungroup
from ..spec.merge_spec import MergeSpec
from .assignment import Assignment, Gather

# group id -> (merged units x model units) matrix (dense or an Assignment), or None for identity
MatrixFor = Callable[[int], "torch.Tensor | Assignment | None"]


def apply_along(t: torch.Tensor, axis: int, e: Expr, matrix: MatrixFor, sizes: Mapping[int, int], scale: float = 1.0) -> torch.Tensor:
    """Multiply ``t`` along ``axis`` by the matrix that expression ``e`` describes.

    ``scale`` multiplies the positions that no matched group covers (fixed leaves, unmatched
    groups): on the averaging axis it is ``1 / N``, since a merge block already averages.
    """

    def unmatched(*_: Any) -> torch.Tensor:
        return t * scale if scale != 1.0 else t

    def units(gid: int) -> torch.Tensor:
        A = matrix(gid)
        return unmatched() if A is None else apply_matrix(A, t, axis)

    def concat(parts: tuple[Expr, ...]) -> torch.Tensor:
        pieces = t.split([size(x, sizes) for x in parts], dim=axis)
        return torch.cat([apply_along(p, axis, x, matrix, sizes, scale) for p, x in zip(pieces, parts)], dim=axis)

    def kron(a: Expr, b: Expr) -> torch.Tensor:
        shape = t.shape
        u = t.reshape(*shape[:axis], size(a, sizes), size(b, sizes), *shape[axis + 1 :])
        live = lambda x: has_group(x, lambda g: matrix(g) is not None)  # noqa: E731
        # the average is taken once: by the factor with a matched group, else by the first
        first_scale, second_scale = (1.0, scale) if (live(b) and not live(a)) else (scale, 1.0)
        u = apply_along(u, axis, a, matrix, sizes, first_scale)
        u = apply_along(u, axis + 1, b, matrix, sizes, second_scale)
        return u.reshape(*shape[:axis], u.shape[axis] * u.shape[axis + 1], *shape[axis + 1 :])

    def grouped_in(space: Expr, groups: int) -> torch.Tensor:
        raise ValueError(f"cannot apply axis expression {to_json(e)}: densify the grouped-convolution weight first")

    def interleave(parts: tuple[Expr, ...], blocks: int) -> torch.Tensor:
        # (blocks, segment) -> each part's (blocks * width) positions -> its map -> (merged blocks, width)
        shape = t.shape
        widths = [size(x, sizes) // blocks for x in parts]
        u = t.reshape(*shape[:axis], blocks, sum(widths), *shape[axis + 1 :])
        pieces = []
        for piece, x, w in zip(u.split(widths, dim=axis + 1), parts, widths):
            flat = piece.reshape(*shape[:axis], blocks * w, *shape[axis + 1 :])
            y = apply_along(flat, axis, x, matrix, sizes, scale)
            pieces.append(y.reshape(*shape[:axis], y.shape[axis] // w, w, *shape[axis + 1 :]))
        merged = torch.cat(pieces, dim=axis + 1)
        return merged.reshape(*shape[:axis], merged.shape[axis] * merged.shape[axis + 1], *shape[axis + 1 :])

    return match(e, units=units, fixed=unmatched, concat=concat, kron=kron, grouped_in=grouped_in, interleave=interleave)


def apply_matrix(A: "torch.Tensor | Assignment", t: torch.Tensor, axis: int) -> torch.Tensor:
    """``A`` (new x old; dense or an :class:`~mudsc_graph.merging.assignment.Assignment`) applied along ``axis`` of ``t``.

    Matchings are assignments (every model unit feeds at most one merged unit), so ``A`` has at
    most one nonzero per column: then this is a scatter-add, linear in the size of ``t``, instead
    of a dense contraction that costs ``new`` times more.
    """
    if isinstance(A, (Assignment, Gather)):
        return A.apply(t, axis)
    A = A.to(t.dtype)
    sparse = Assignment.of(A)
    if sparse is not None:
        return sparse.apply(t, axis)
    return torch.movedim(torch.tensordot(A, t, dims=([1], [axis])), 0, axis)


def densify_grouped(t: torch.Tensor, groups: int, axis: int = 1) -> torch.Tensor:
    """(out, in/groups, ...) grouped-conv weight -> (out, in, ...) with zeros off the blocks; the
    inner axis may be another than 1 (experts' ``(experts, ..., hidden)``)."""
    t = t.movedim(axis, 1)
    out, d = t.shape[0], t.shape[1]
    dense = t.new_zeros(out, d * groups, *t.shape[2:])
    per = out // groups
    for j in range(groups):
        dense[j * per : (j + 1) * per, j * d : (j + 1) * d] = t[j * per : (j + 1) * per]
    return dense.movedim(1, axis)


def sparsify_grouped(dense: torch.Tensor, groups: int, axis: int = 1) -> torch.Tensor:
    """Inverse of :func:`densify_grouped` (keeps the diagonal blocks)."""
    dense = dense.movedim(axis, 1)
    out, n_in = dense.shape[0], dense.shape[1]
    per, d = out // groups, n_in // groups
    return torch.cat([dense[j * per : (j + 1) * per, j * d : (j + 1) * d] for j in range(groups)], dim=0).movedim(1, axis)


def transform_tensor(
    t: torch.Tensor,
    exprs: list[Expr],
    consumed: set[int],
    produce: MatrixFor,
    produce_other: MatrixFor,
    read: MatrixFor,
    sizes: Mapping[int, int],
    n_models: int,
    live: Callable[[int], bool],
) -> torch.Tensor:
    """One model's tensor in merged coordinates (see the module docstring for the roles)."""
    inner = grouped_axis(exprs)
    exprs, groups = ungroup(exprs)
    if groups:
        t = densify_grouped(t, groups, inner)
    not_reading = [a for a in range(len(exprs)) if a not in consumed]
    avg = next((a for a in not_reading if has_group(exprs[a], live)), not_reading[0] if not_reading else None)
    for a, e in enumerate(exprs):
        if a == avg:
            t = apply_along(t, a, e, produce, sizes, 1.0 / n_models)
        elif a in consumed:
            t = apply_along(t, a, e, read, sizes)
        else:
            t = apply_along(t, a, e, produce_other, sizes)
    if avg is None:
        t = t / n_models
    if groups:
        t = sparsify_grouped(t, groups, inner)
    return t


def row_normalised(M: "torch.Tensor | Assignment", n_models: int = 1) -> "torch.Tensor | Assignment":
    """Model ``i``'s own map into merged coordinates, from its merge block ``M`` (no averaging over
    models): an assignment's rows normalised within the model (a permutation: itself); a signed,
    dense block (a soft matcher's, CCA's ``T_i / N``) is ``n_models * M``: every model's share of a
    merged unit is ``1 / N``, and a row sum of a signed map is no count of units."""
    if isinstance(M, Assignment):
        return Assignment(M.index, M.value * n_models, M.rows, M.inverse) if bool((M.value < 0).any()) else M.row_normalised()
    if bool((M < 0).any()):
        return M * n_models
    s = M.sum(1, keepdim=True)
    return torch.where(s > 0, M / s.clamp_min(1e-12), M)


def merge_state_dicts(spec: MergeSpec, states: list[Mapping[str, torch.Tensor]], matchings: Mapping[int, object],
                      out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The merged state_dict: ``sum_i`` of every model's tensors in merged coordinates.

    ``matchings[gid]`` has ``merge_map(i)`` and ``read_map(i)`` (:class:`~mudsc_graph.merging.matching.Matching`); groups without a matching
    (fixed ones) keep their units, and their tensors are averaged. ``out`` (every state-dict name
    -> a tensor of the receiving model, e.g. its parameters and buffers by name) receives each
    tensor as soon as it is formed, in place, and is returned: the merged weights are never held twice.
    """
    n = len(states)
    sizes = {g.id: g.size for g in spec.groups}
    live = lambda gid: gid in matchings  # noqa: E731
    merged: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        if out is None:
            merged[name] = t
        elif out[name].shape != t.shape:
            raise ValueError(f"merged {name!r} has shape {tuple(t.shape)}, the model to receive it {tuple(out[name].shape)}")
        else:
            with torch.no_grad():
                out[name].copy_(t)

    for name, t0 in states[0].items():
        exprs = spec.axes.get(name)
        if not torch.is_floating_point(t0):
            put(name, t0.clone())
            continue
        if exprs is None or t0.dim() == 0:
            put(name, sum(s[name].float() for s in states).to(t0.dtype) / n)
            continue
        consumed = set(spec.consumed.get(name, ()))
        total = None
        for i, state in enumerate(states):
            def produce(gid, i=i):
                m = matchings.get(gid)
                return None if m is None else m.merge_map(i)

            def produce_other(gid, i=i):
                m = matchings.get(gid)
                return None if m is None else row_normalised(m.merge_map(i), n)

            def read(gid, i=i):
                m = matchings.get(gid)
                return None if m is None else m.read_map(i)

            part = transform_tensor(state[name].float(), exprs, consumed, produce, produce_other, read, sizes, n, live)
            total = part if total is None else total + part
        put(name, total.to(t0.dtype))
    return merged if out is None else dict(out)
