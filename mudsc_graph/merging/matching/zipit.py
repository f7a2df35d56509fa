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


def zip_labels(sim: torch.Tensor, n_models: int, a: float = 0.5, b: float = 1.0,
               merged: int | None = None) -> tuple[torch.Tensor, float]:
    """Zip ``n_models * O`` stacked units into ``merged`` clusters (default ``O``; more is a width
    budget: the greedy stops early, so the least similar units are left unmerged).

    Returns the labels (``labels[u]`` = merged unit of stacked unit u, a LongTensor on ``sim``'s
    device) and the score: the mean over fusion steps of the (symmetrised) input similarity of the
    two representatives fused at that step, before any min-updates.
    """
    n = sim.shape[0]
    o = n // n_models
    dev = sim.device
    to_remove = n - (o if merged is None else merged)
    if to_remove == 0:
        return torch.arange(n, device=dev), 0.0
    dtype = sim.dtype if sim.dtype in (torch.float32, torch.float64) else torch.float32
    src = sim.detach().to(dtype)
    work = _symmetrised(src)  # the one (N*O)^2 working copy, updated in place below
    work.fill_diagonal_(_NEG)
    budget = [math.floor((to_remove // n_models) * b)] * n_models
    for m in range(n_models):
        if budget[m] <= 0:
            work[m * o:(m + 1) * o, m * o:(m + 1) * o] = _NEG

    # The greedy loop is sequential, so it runs on the host, compiled where numba is installed.
    loop = _zip_kernel.run if _zip_kernel.available() else _greedy_numpy
    owner_np, pairs_i, pairs_j = loop(work.cpu().numpy(), src.cpu().numpy(), o, to_remove, a, budget)
    host = src.cpu()
    pi, pj = torch.tensor(pairs_i), torch.tensor(pairs_j)
    score = float(((host[pi, pj].double() + host[pj, pi].double()) * 0.5).mean())
    _, labels = torch.unique(torch.from_numpy(owner_np), sorted=True, return_inverse=True)
    return labels.to(dev), score


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
