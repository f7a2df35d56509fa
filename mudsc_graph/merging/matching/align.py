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


def align_labels(sim: torch.Tensor, n_models: int) -> tuple[torch.Tensor, float]:
    """Align every model to model 0; return the labels and the mean matched similarity over all
    (model 0, model i) matched pairs (0 for a single model)."""
    o = sim.shape[0] // n_models
    perms = [np.arange(o)]
    scores = []
    for i in range(1, n_models):
        perm, score = lap(cross_block(sim, n_models, i))
        perms.append(perm)
        scores.append(score)
    return labels_from_perms(perms, sim.device), float(np.mean(scores)) if scores else 0.0
