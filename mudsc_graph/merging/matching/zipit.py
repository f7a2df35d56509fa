"""Zip: ZipIt!'s greedy pair fusion (Stoica et al. 2023), allowing within-model fusions.

Start with every stacked unit in its own cluster and ``S`` with its diagonal at -inf. Repeat
``N*O - O`` times (``N*O - O_m`` for a merged width ``O_m``, a width budget): take the most similar pair of clusters (i, j), fuse them, and set the fused
cluster's similarities to ``a * min(S[i], S[j])``. A pair whose two clusters come from the same
model (a cluster's model is that of its smallest member, as in ZipIt!) spends one unit of that
model's budget ``floor((to_remove // N) * b)``; once the budget is spent, that model's
within-model pairs become -inf (a model with budget 0 never fuses within itself). The min-updates
carry -inf along, so for N >= 3 every remaining pair can end up blocked before the width is
reached (each shares a model); then the two clusters whose representatives have the highest input
similarity are fused (ZipIt! itself would fuse an arbitrary cluster with itself there).

Implementation: the working matrix is updated in place (one host copy: the loop is sequential,
so a GPU does not help it), a cluster lives in the row/column of its smallest member (so rows are
"representatives"), and the maximum of every row is cached, so one step costs O(N*O) plus the
rows whose cached maximum was invalidated. With numba installed (the ``fast`` extra) the loop
runs compiled (:mod:`._zip_kernel`, the same steps); otherwise in numpy (:func:`_greedy_numpy`).

Merged units are ordered by their smallest member: clusters holding a model-0 unit come first, in
model 0's order, so zipping a model with a permuted copy of itself keeps model 0's order.
"""

from __future__ import annotations

import math

import torch

from . import _zip_kernel

_NEG = float("-inf")


def zip_labels(sim: torch.Tensor, n_models: int, a: float = 0.5, b: float = 1.0, merged: int | None = None,
               copies: list[torch.Tensor | None] | None = None) -> tuple:
    """Zip ``n_models * O`` stacked units into ``merged`` clusters (default ``O``; more is a width
    budget: the greedy stops early, so the least similar units are left unmerged).

    Returns the labels (``labels[u]`` = merged unit of stacked unit u, a LongTensor on ``sim``'s
    device) and the score: the mean over fusion steps of the (symmetrised) input similarity of the
    two representatives fused at that step, before any min-updates.

    ``copies`` (models of different widths, each padded to ``O`` with Net2Net copies of its own
    units): per model, ``None`` or ``src`` (``O``,): stacked unit k of that model is a copy of its unit
    ``src[k]`` (``src[k] == k``: a unit of its own). Only the models' own units are zipped (a copy
    never fuses on its own), into ``merged`` clusters, and each copy then joins its unit's cluster;
    the result has a third element, each stacked unit's share of its merged unit (a unit and its
    copies counted once together, so a merged unit is the plain average of its models' units).
    """
    n = sim.shape[0]
    o = n // n_models
    dev = sim.device
    dup = _copies(copies, n_models, o) if copies is not None else None
    to_remove = n - (o if merged is None else merged) - (int(dup.sum()) if dup is not None else 0)
    if to_remove < 0:
        raise ValueError(f"cannot zip into {merged} units: the models have only {n - int(dup.sum())} units of their own together")
    if to_remove == 0 and dup is None:
        return torch.arange(n, device=dev), 0.0
    dtype = sim.dtype if sim.dtype in (torch.float32, torch.float64) else torch.float32
    src = sim.detach().to(dtype)
    if dup is not None:  # copies are left out: never fused, never the fallback's pick
        src = src.clone()
        src[dup.to(src.device)] = _NEG
        src[:, dup.to(src.device)] = _NEG
    work = _symmetrised(src)  # the one (N*O)^2 working copy, updated in place below
    work.fill_diagonal_(_NEG)
    budget = [math.floor((to_remove // n_models) * b)] * n_models
    for m in range(n_models):
        if budget[m] <= 0:
            work[m * o:(m + 1) * o, m * o:(m + 1) * o] = _NEG

    # The greedy loop is sequential, so it runs on the host, compiled where numba is installed.
    loop = _zip_kernel.run if _zip_kernel.available() else _greedy_numpy
    if to_remove > 0:
        owner_np, pairs_i, pairs_j = loop(work.cpu().numpy(), src.cpu().numpy(), o, to_remove, a, budget)
    else:
        owner_np, pairs_i, pairs_j = torch.arange(n).numpy(), [], []
    host = src.cpu()
    pi, pj = torch.tensor(pairs_i, dtype=torch.long), torch.tensor(pairs_j, dtype=torch.long)
    score = float(((host[pi, pj].double() + host[pj, pi].double()) * 0.5).mean()) if pairs_i else 0.0
    owner = torch.from_numpy(owner_np).clone()
    if dup is None:
        _, labels = torch.unique(owner, sorted=True, return_inverse=True)
        return labels.to(dev), score
    stacked_src = torch.cat([i * o + (c.cpu().long() if c is not None else torch.arange(o)) for i, c in enumerate(copies)])
    owner = owner[stacked_src]  # a copy joins its own unit's cluster
    _, labels = torch.unique(owner, sorted=True, return_inverse=True)
    return labels.to(dev), score, _shares(labels, stacked_src, dup).to(dev)


def _copies(copies: list[torch.Tensor | None], n_models: int, o: int) -> torch.Tensor:
    """A mask of the stacked units that are copies; each ``src`` checked."""
    if len(copies) != n_models:
        raise ValueError(f"copies= has {len(copies)} entries for {n_models} models")
    masks = []
    for i, c in enumerate(copies):
        if c is None:
            masks.append(torch.zeros(o, dtype=torch.bool))
            continue
        c = torch.as_tensor(c).cpu().long()
        own = c == torch.arange(o)
        if c.shape != (o,) or bool((c < 0).any() | (c >= o).any()) or not bool(own[c].all()):
            raise ValueError(f"copies[{i}] must give, for each of the {o} units, a unit of the model's own (mapping to itself)")
        masks.append(~own)
    return torch.cat(masks)


def _shares(labels: torch.Tensor, stacked_src: torch.Tensor, dup: torch.Tensor) -> torch.Tensor:
    """Each stacked unit's weight in its merged unit: ``1 / (own units in the cluster)``, split
    evenly between a unit and its copies."""
    own = ~dup
    own_per_cluster = torch.bincount(labels[own], minlength=int(labels.max()) + 1).float()
    instances = torch.bincount(stacked_src, minlength=labels.numel()).float()[stacked_src]  # a unit and its copies
    return 1.0 / (own_per_cluster[labels] * instances)


def _symmetrised(src: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """``(src + src.T) * 0.5``, tile by tile: each entry is computed as by the one expression (the
    same bits), but the transposed operand is read a cache-sized tile at a time (1.7x faster at
    6,144 units)."""
    n = src.shape[0]
    if n <= tile:
        return (src + src.T).mul_(0.5)
    out = torch.empty_like(src)
    for i in range(0, n, tile):
        for j in range(0, n, tile):
            torch.add(src[i : i + tile, j : j + tile], src[j : j + tile, i : i + tile].T, out=out[i : i + tile, j : j + tile])
    return out.mul_(0.5)


def _fallback_pair(src, owner) -> tuple[int, int]:
    """The two current representatives with the highest (symmetrised) input similarity."""
    import numpy as np

    reps = np.unique(owner)
    sub = src[np.ix_(reps, reps)]
    sub = (sub + sub.T) * 0.5
    np.fill_diagonal(sub, _NEG)
    flat = int(sub.argmax())
    return int(reps[flat // reps.size]), int(reps[flat % reps.size])


def _greedy_numpy(work, src, o: int, to_remove: int, a: float, budget: list[int]):
    """The greedy loop of :func:`zip_labels` on host arrays; returns (owner, pairs_i, pairs_j).
    numpy's per-call overhead is a fraction of torch's for these small steps."""
    import numpy as np

    n = work.shape[0]
    rowarg = work.argmax(axis=1)
    rowmax = work[np.arange(n), rowarg]
    owner = np.arange(n)
    pairs_i, pairs_j = [], []
    for _ in range(to_remove):
        k = int(rowmax.argmax())
        r, c, best = k, int(rowarg[k]), rowmax[k]
        if best == _NEG:
            r, c = _fallback_pair(src, owner)
        i, j = (r, c) if r < c else (c, r)
        pairs_i.append(i)
        pairs_j.append(j)
        v = np.minimum(work[i], work[j])
        if a == 0:
            v = np.where(v == _NEG, v, 0.0).astype(work.dtype)
        elif a != 1:
            v *= a
        v[i] = _NEG
        v[j] = _NEG
        work[i] = v
        work[:, i] = v
        work[j] = _NEG
        work[:, j] = _NEG
        owner[owner == j] = i
        stale = (rowarg == i) | (rowarg == j)
        better = (v > rowmax) | ((v == rowmax) & (rowarg > i))
        rowmax = np.where(better, v, rowmax)
        rowarg = np.where(better, i, rowarg)
        stale[i] = True
        stale[j] = True
        m = i // o
        if m == j // o:
            budget[m] -= 1
            if budget[m] == 0:
                work[m * o:(m + 1) * o, m * o:(m + 1) * o] = _NEG
                stale[m * o:(m + 1) * o] = True
        rows = np.flatnonzero(stale)
        if rows.size:
            sub_arg = work[rows].argmax(axis=1)
            rowarg[rows] = sub_arg
            rowmax[rows] = work[rows, sub_arg]
    return owner, pairs_i, pairs_j
