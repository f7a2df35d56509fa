"""Group variants of align and zip: units come in G contiguous blocks of size d = O / G (attention
heads, GroupNorm groups, grouped convolutions) that must stay whole.

Block pairing, for each model i >= 1 against model 0::

    cross block C = S[model 0, model i]         (O x O), cut into G x G sub-blocks (d x d)
    inner[a, b] = LAP on sub-block (a, b)        -> assignment and its mean matched similarity
    outer       = LAP on the G x G matrix of those means   -> block a of model 0 <-> block pi(a)

Block-coupled similarities (Q/K and V/O of one attention layer; same G, possibly different O) sum
their G x G score matrices before the outer LAP, so they agree on one block pairing; the inner
assignments stay per similarity. Group align then is block-structured: merged unit ``j*d + r`` is
model-0 unit ``j*d + r`` with model i's unit ``pi(j)*d + inner[j, pi(j)][r]``. Group zip zips each
paired block set (model-0 block j and its partners, ``N*d`` units) on its own to d merged units,
placed at ``j*d:(j+1)*d`` (blocks stay contiguous, their size is preserved).
"""

from __future__ import annotations

import numpy as np
import torch

from .align import cross_block, labels_from_perms, lap
from .zipit import zip_labels


def block_scores(cross: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """For every block pair (a of model 0, b of model i) of the cross block: the mean matched
    similarity of the best inner assignment (``scores``, G x G) and that assignment
    (``inner[a, b]``, length d: model-0 unit ``a*d + r`` <-> model-i unit ``b*d + inner[a, b][r]``)."""
    g = blocks
    d = cross.shape[0] // g
    sub = cross.reshape(g, d, g, d).transpose(0, 2, 1, 3)
    if d == 1:
        return sub[:, :, 0, 0].copy(), np.zeros((g, g, 1), dtype=np.int64)
    scores = np.empty((g, g))
    inner = np.empty((g, g, d), dtype=np.int64)
    for x in range(g):
        for y in range(g):
            inner[x, y], scores[x, y] = lap(sub[x, y])
    return scores, inner


def pair_blocks(sims: list[torch.Tensor], n_models: int, blocks: int):
    """The shared block pairing of coupled similarities.

    Returns ``outer[i]`` (model-0 block j <-> model-i block ``outer[i][j]``, for i >= 1; index 0 is
    the identity) and, per similarity, ``per_sim[s][i] = (scores, inner)`` of :func:`block_scores`.
    """
    outer = [np.arange(blocks)]
    per_sim: list[list] = [[None] for _ in sims]
    for i in range(1, n_models):
        total = np.zeros((blocks, blocks))
        for s, sim in enumerate(sims):
            scores, inner = block_scores(cross_block(sim, n_models, i), blocks)
            per_sim[s].append((scores, inner))
            total += scores
        outer.append(lap(total)[0])
    return outer, per_sim


def group_align_labels(sims: list[torch.Tensor], n_models: int, blocks: int) -> list[tuple[torch.Tensor, float]]:
    """Block-structured align of each similarity (one shared block pairing); labels and score (the
    mean matched similarity over all (model 0, model i) pairs) per similarity."""
    outer, per_sim = pair_blocks(sims, n_models, blocks)
    out = []
    for sim, models in zip(sims, per_sim):
        o = sim.shape[0] // n_models
        d = o // blocks
        perms, scores = [np.arange(o)], []
        for i in range(1, n_models):
            block_score, inner = models[i]
            pi = outer[i]
            perm = np.concatenate([pi[j] * d + inner[j, pi[j]] for j in range(blocks)])
            perms.append(perm)
            scores.append(block_score[np.arange(blocks), pi].mean())
        out.append((labels_from_perms(perms, sim.device), float(np.mean(scores)) if scores else 0.0))
    return out


def group_zip_labels(sims: list[torch.Tensor], n_models: int, blocks: int, a: float = 0.5,
                     b: float = 1.0) -> list[tuple[torch.Tensor, float]]:
    """Pair blocks as in group align, then zip each paired block set to d merged units placed at
    ``j*d:(j+1)*d``; labels and score (mean of the block sets' zip scores) per similarity."""
    outer, _ = pair_blocks(sims, n_models, blocks)
    out = []
    for sim in sims:
        o = sim.shape[0] // n_models
        d = o // blocks
        labels = torch.empty(sim.shape[0], dtype=torch.long, device=sim.device)
        scores = []
        ar = torch.arange(d, device=sim.device)
        for j in range(blocks):
            idx = torch.cat([i * o + int(outer[i][j]) * d + ar for i in range(n_models)])
            local, score = zip_labels(sim[idx][:, idx], n_models, a=a, b=b)
            labels[idx] = j * d + local
            scores.append(score)
        out.append((labels, float(np.mean(scores))))
    return out
