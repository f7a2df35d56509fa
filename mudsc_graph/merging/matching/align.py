"""Align: one permutation per model, by linear assignment against model 0.

For each model i >= 1 the cross block ``C = S[model 0, model i]`` (O x O) is handed to
``scipy.optimize.linear_sum_assignment(C, maximize=True)``; merged unit r is model-0 unit r with
its partner ``perm_i[r]`` in every model. Results are "labels": ``labels[u]`` is the merged unit of
stacked unit u (see :func:`mudsc_graph.merging.matching.matching_from_labels`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def lap(cross: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximise ``sum_r cross[r, perm[r]]`` over permutations; return ``perm`` and the mean matched
    value. ``cross`` is square (a float64 numpy array)."""
    rows, cols = linear_sum_assignment(cross, maximize=True)
    perm = np.empty(cross.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm, float(cross[rows, cols].mean())


def cross_block(sim: torch.Tensor, n_models: int, i: int) -> np.ndarray:
    """``S[model 0, model i]`` as a CPU float64 numpy array."""
    o = sim.shape[0] // n_models
    return sim[:o, i * o:(i + 1) * o].detach().to("cpu", torch.float64).numpy()


def labels_from_perms(perms: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Labels of the stacked units when model i's unit ``perms[i][r]`` forms merged unit r."""
    labels = []
    for p in perms:
        inv = np.empty_like(p)
        inv[p] = np.arange(p.size)
        labels.append(inv)
    return torch.from_numpy(np.concatenate(labels)).to(device)


def detach_weakest(labels: torch.Tensor, pair_scores: np.ndarray, n_models: int, extra: int, block: int = 1) -> torch.Tensor:
    """A width budget for a permutation-style result: ``extra`` more merged blocks (of ``block``
    units), made by detaching the ``extra`` least similar (model i >= 1, merged block j) memberships
    from their merged block; each detached block becomes a merged block of its own, after the first
    ``O / block`` ones (in order of model, then block). ``pair_scores[i - 1, j]``: the similarity of
    model i's member of merged block j to model 0's."""
    if extra <= 0:
        return labels
    o = labels.numel() // n_models
    blocks = o // block
    if extra > (n_models - 1) * blocks:
        raise ValueError(f"a width of {o + extra * block} units is more than the {n_models * o} of all models together")
    weakest = np.argsort(pair_scores.reshape(-1), kind="stable")[:extra]
    out = labels.clone()
    for t, flat in enumerate(sorted(int(f) for f in weakest)):
        i, j = divmod(flat, blocks)
        rows = slice((i + 1) * o, (i + 2) * o)
        members = (labels[rows] // block) == j
        out[rows][members] = (blocks + t) * block + labels[rows][members] % block
    return out


def align_labels(sim: torch.Tensor, n_models: int, merged: int | None = None) -> tuple[torch.Tensor, float]:
    """Align every model to model 0; return the labels and the mean matched similarity over all
    (model 0, model i) matched pairs (0 for a single model). ``merged > O`` (a width budget): the
    ``merged - O`` least similar matched pairs are left unmerged (:func:`detach_weakest`)."""
    o = sim.shape[0] // n_models
    perms = [np.arange(o)]
    scores, pair_scores = [], []
    for i in range(1, n_models):
        cross = cross_block(sim, n_models, i)
        perm, score = lap(cross)
        perms.append(perm)
        scores.append(score)
        pair_scores.append(cross[np.arange(o), perm])
    labels = labels_from_perms(perms, sim.device)
    if merged is not None and merged > o:
        labels = detach_weakest(labels, np.stack(pair_scores), n_models, merged - o)
    return labels, float(np.mean(scores)) if scores else 0.0
