"""Zip: ZipIt!'s greedy pair fusion (Stoica et al. 2023), allowing within-model fusions.

Start with every stacked unit in its own cluster and ``S`` with its diagonal at -inf. Repeat
``N*O - O`` times: take the most similar pair of clusters (i, j), fuse them, and set the fused
cluster's similarities to ``a * min(S[i], S[j])``. A pair whose two clusters come from the same
model (a cluster's model is that of its smallest member, as in ZipIt!) spends one unit of that
model's budget ``floor((to_remove // N) * b)``; once the budget is spent, that model's
within-model pairs become -inf (a model with budget 0 never fuses within itself). The min-updates
carry -inf along, so for N >= 3 every remaining pair can end up blocked before the width is
reached (each shares a model); then the two clusters whose representatives have the highest input
similarity are fused (ZipIt! itself would fuse an arbitrary cluster with itself there).

Implementation: the working matrix is updated in place, a cluster lives in the row/column of its
smallest member (so rows are "representatives"), and the maximum of every row is cached, so one
step costs O(N*O) plus the rows whose cached maximum was invalidated; one device sync per step
for the chosen pair and one for the invalidated rows.

Merged units are ordered by their smallest member: clusters holding a model-0 unit come first, in
model 0's order, so zipping a model with a permuted copy of itself keeps model 0's order.
"""

from __future__ import annotations

import math

import torch

_NEG = float("-inf")


def zip_labels(sim: torch.Tensor, n_models: int, a: float = 0.5, b: float = 1.0) -> tuple[torch.Tensor, float]:
    """Zip ``n_models * O`` stacked units into ``O`` clusters.

    Returns the labels (``labels[u]`` = merged unit of stacked unit u, a LongTensor on ``sim``'s
    device) and the score: the mean over fusion steps of the (symmetrised) input similarity of the
    two representatives fused at that step, before any min-updates.
    """
    n = sim.shape[0]
    o = n // n_models
    dev = sim.device
    to_remove = n - o
    if to_remove == 0:
        return torch.arange(n, device=dev), 0.0
    dtype = sim.dtype if sim.dtype in (torch.float32, torch.float64) else torch.float32
    src = sim.detach().to(dtype)
    work = (src + src.T).mul_(0.5)  # the one (N*O)^2 working copy, updated in place below
    work.fill_diagonal_(_NEG)
    budget = [math.floor((to_remove // n_models) * b)] * n_models
    for m in range(n_models):
        if budget[m] <= 0:
            work[m * o:(m + 1) * o, m * o:(m + 1) * o] = _NEG

    if dev.type == "cpu":  # numpy's per-call overhead is a fraction of torch's for these small steps
        owner_np, pairs_i, pairs_j = _greedy_numpy(work.numpy(), src.numpy(), n_models, o, to_remove, a, budget)
        owner = torch.from_numpy(owner_np)
        pi, pj = torch.tensor(pairs_i), torch.tensor(pairs_j)
        score = float(((src[pi, pj].double() + src[pj, pi].double()) * 0.5).mean())
        _, labels = torch.unique(owner, sorted=True, return_inverse=True)
        return labels, score

    rowmax, rowarg = work.max(dim=1)
    owner = torch.arange(n, device=dev)  # representative (smallest member) of each unit's cluster
    pairs_i, pairs_j = [], []
    for _ in range(to_remove):
        k = rowmax.argmax()
        r, c, best = torch.stack((k.to(dtype), rowarg[k].to(dtype), rowmax[k])).tolist()
        r, c = int(r), int(c)
        if best == _NEG:
            r, c = _fallback_pair(src, owner)
        i, j = (r, c) if r < c else (c, r)
        pairs_i.append(i)
        pairs_j.append(j)

        v = torch.minimum(work[i], work[j])
        if a == 0:
            v = torch.where(v == _NEG, v, torch.zeros_like(v))
        elif a != 1:
            v.mul_(a)  # -inf stays -inf for a > 0
        v[i] = _NEG
        v[j] = _NEG
        work[i] = v
        work[:, i] = v
        work[j] = _NEG
        work[:, j] = _NEG
        owner = torch.where(owner == j, i, owner)

        stale = (rowarg == i) | (rowarg == j)
        better = (v > rowmax) | ((v == rowmax) & (rowarg > i))  # keep the first maximum on ties
        rowmax = torch.where(better, v, rowmax)
        rowarg = torch.where(better, i, rowarg)
        stale[i] = True
        stale[j] = True
        m = i // o
        if m == j // o:
            budget[m] -= 1
            if budget[m] == 0:
                work[m * o:(m + 1) * o, m * o:(m + 1) * o] = _NEG
                stale[m * o:(m + 1) * o] = True
        rows = stale.nonzero().squeeze(1)
        rowmax[rows], rowarg[rows] = work[rows].max(dim=1)

    pi = torch.tensor(pairs_i, device=dev)
    pj = torch.tensor(pairs_j, device=dev)
    score = float(((src[pi, pj].double() + src[pj, pi].double()) * 0.5).mean())
    _, labels = torch.unique(owner, sorted=True, return_inverse=True)
    return labels, score


def _fallback_pair(src: torch.Tensor, owner: torch.Tensor) -> tuple[int, int]:
    """The two current representatives with the highest (symmetrised) input similarity."""
    reps = torch.unique(owner)
    sub = src[reps][:, reps]
    sub = (sub + sub.T) * 0.5
    sub.fill_diagonal_(_NEG)
    flat = int(sub.argmax())
    return int(reps[flat // reps.numel()]), int(reps[flat % reps.numel()])


def _greedy_numpy(work, src, n_models: int, o: int, to_remove: int, a: float, budget: list[int]):
    """The greedy loop of :func:`zip_labels` on CPU arrays (same steps, same ties)."""
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
            r, c = _fallback_pair(torch.from_numpy(src), torch.from_numpy(owner))
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
