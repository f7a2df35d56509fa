"""Permutations of merge groups: random valid ones, applying them, and the self-check.

A permutation is ``{group_id: LongTensor}``; unit ``i`` of the new model is unit ``perm[i]`` of
the old one (``W_new = W_old[perm]`` along every axis of the group). Groups left out, and fixed
groups, keep the identity. The index array of one axis is :func:`~mudsc_graph.spec.axes.index`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from ..errors import SpecCheckError, SpecError
from ..inputs import as_inputs, call
from .axes import Expr, Fixed, GroupedIn, index


class SpecLike(Protocol):
    """What permutations read of a :class:`~mudsc_graph.spec.merge_spec.MergeSpec` (which imports
    this module, so it is not imported here)."""

    @property
    def groups(self) -> Sequence[Any]: ...

    @property
    def axes(self) -> Mapping[str, Sequence[Expr]]: ...

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]: ...


def random_permutation(spec: SpecLike, seed: int = 0) -> dict[int, torch.Tensor]:
    """A random permutation of every free group that respects blocks and couplings."""
    gen = torch.Generator().manual_seed(seed)
    perm: dict[int, torch.Tensor] = {}
    block_perm: dict[int, torch.Tensor] = {}
    for g in spec.groups:
        if g.fixed:
            continue
        if g.blocks == 1:
            perm[g.id] = torch.randperm(g.size, generator=gen)
            continue
        # coupled groups share one block permutation: key it by the smallest id of the coupling
        key = min((g.id, *g.coupled))
        if key not in block_perm:
            block_perm[key] = torch.randperm(g.blocks, generator=gen)
        pi = block_perm[key]
        d = g.block_size
        perm[g.id] = torch.cat([pi[j] * d + torch.randperm(d, generator=gen) for j in range(g.blocks)])
    return perm


def permute_state_dict(spec: SpecLike, state: dict[str, torch.Tensor], perm: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute every tensor of ``state`` that the spec describes; others are returned as is."""
    sizes = {g.id: g.size for g in spec.groups}
    out = {}
    for name, t in state.items():
        exprs = spec.axes.get(name)
        if exprs is None or t.dim() == 0:
            out[name] = t
            continue
        if tuple(t.shape) != tuple(spec.shapes.get(name, t.shape)):
            raise SpecError(f"tensor {name!r} has shape {tuple(t.shape)} but the spec expects {spec.shapes[name]}")
        for axis, e in enumerate(exprs):
            if isinstance(e, (Fixed, GroupedIn)):
                continue
            idx = index(e, perm, sizes)
            if not torch.equal(idx, torch.arange(idx.numel())):
                t = t.index_select(axis, idx.to(t.device))
        for axis, e in enumerate(exprs):
            if isinstance(e, GroupedIn):
                t = _permute_inner(t, axis, index(e.space, perm, sizes), e.groups)
        out[name] = t
    return out


def _permute_inner(t: torch.Tensor, axis: int, p_in: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-conv weight axis ``axis``; rows (axis 0) are already permuted."""
    d = p_in.numel() // groups
    rows = t.shape[0]
    block_of_row = torch.arange(rows) // (rows // groups)
    idx = p_in.view(groups, d)[block_of_row] % d  # (rows, d)
    shape = [rows] + [1] * (t.dim() - 1)
    shape[axis] = d
    idx = idx.view(*shape).expand(*[s if i in (0, axis) else t.shape[i] for i, s in enumerate(shape)])
    return torch.gather(t, axis, idx.to(t.device))


def apply_permutation(spec: SpecLike, model: torch.nn.Module, perm: dict[int, torch.Tensor]) -> torch.nn.Module:
    """A deep copy of ``model`` with every group permuted by ``perm``."""
    new = copy.deepcopy(model)
    state = permute_state_dict(spec, model.state_dict(), perm)
    new.load_state_dict(state)
    return new


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output: tensors, tuples, lists, dicts and ``ModelOutput``s."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    return []


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 0.0) -> tuple[float, float]:
    """(largest absolute difference, largest difference relative to its own output's scale)."""
    worst, rel = 0.0, 0.0
    for x, y in zip(a, b):
        if not x.numel():
            continue
        d = float((x.double() - y.double()).abs().max())
        scale = float(x.double().abs().max())
        worst = max(worst, d)
        rel = max(rel, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))
    return worst, rel


def set_mode(model: torch.nn.Module, training: bool) -> None:
    """``model.train(training)``; a module that refuses (``ep.module()`` of torch.export, whose graph
    has its mode fixed) is left as it is."""
    try:
        model.train(training)
    except NotImplementedError:
        pass


@torch.no_grad()
def check(spec: SpecLike, model: torch.nn.Module, example_inputs: Any, *, seed: int = 0, rtol: float = 1e-4, trials: int = 3) -> float:
    """Apply ``trials`` random valid permutations (seeds ``seed``, ``seed + 1``, ...); raise
    :class:`SpecCheckError` naming the group if one changes the output by more than ``rtol`` times
    the scale (largest magnitude) of that output.

    ``example_inputs``: a tuple of positional tensors or a dict of keyword tensors. Returns the
    largest absolute output difference. The model is evaluated in eval mode.
    """
    inputs = as_inputs(example_inputs)
    was_training = model.training
    set_mode(model, False)
    try:
        ref = _flat_outputs(call(model, inputs))
        worst = 0.0
        for s in range(seed, seed + max(1, int(trials))):
            perm = random_permutation(spec, s)
            permuted = apply_permutation(spec, model, perm)
            set_mode(permuted, False)
            diff, rel = _max_diff(ref, _flat_outputs(call(permuted, inputs)))
            worst = max(worst, diff)
            if rel > rtol:
                culprit = _culprit(spec, model, inputs, perm, ref, rtol)
                raise SpecCheckError(
                    f"a valid permutation (seed {s}) changed the output by {diff:.3g} ({rel:.3g} of its scale, tolerance {rtol:.3g}); "
                    f"{culprit}. A layer handler links too little: check the handler of the op that reads this group"
                )
        return worst
    finally:
        set_mode(model, was_training)


def _culprit(spec: SpecLike, model, inputs, perm, ref, rtol) -> str:
    """Name the groups that change the output when permuted alone (coupled groups together)."""
    seen: set[int] = set()
    bad = []
    for g in spec.groups:
        if g.id in seen or g.id not in perm:
            continue
        ids = {g.id, *g.coupled}
        seen |= ids
        sub = {i: perm[i] for i in ids if i in perm}
        permuted = apply_permutation(spec, model, sub)
        set_mode(permuted, False)
        diff, rel = _max_diff(ref, _flat_outputs(call(permuted, inputs)))
        if rel > rtol:
            names = ", ".join(f"{n}[{a}]" for n, a in g.members[:4])
            more = ", ..." if len(g.members) > 4 else ""
            bad.append(f"group {g.id} ({g.size} units, {g.blocks} blocks; {names}{more}) alone changes it by {diff:.3g}")
    if not bad:
        return "no single group changes it alone (an interaction between groups)"
    return "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more groups" if len(bad) > 3 else "")
