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

A width budget of ``extra`` more blocks (whole heads) detaches the ``extra`` least similar
(model i, block pairing) memberships, by the coupled similarities' summed block scores, so coupled
groups keep one structure; a detached block is a merged block of its own (after the first G).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .align import cross_block, detach_weakest, labels_from_perms, lap
from .zipit import _shares, zip_labels


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


def pairing_scores(outer: list[np.ndarray], per_sim: list[list], n_models: int, blocks: int) -> np.ndarray:
    """``[i - 1, j]``: the summed (over coupled similarities) score of model i's block paired with
    model 0's block j."""
    total = np.zeros((n_models - 1, blocks))
    for models in per_sim:
        for i in range(1, n_models):
            total[i - 1] += models[i][0][np.arange(blocks), outer[i]]
    return total


def extra_blocks(sims: list[torch.Tensor], n_models: int, blocks: int, merged: list[int] | None) -> int:
    """The merged blocks asked for beyond ``blocks`` (one number for coupled similarities)."""
    if merged is None:
        return 0
    extras = set()
    for sim, m in zip(sims, merged):
        d = sim.shape[0] // n_models // blocks
        if m % d:
            raise ValueError(f"a width of {m} units is not a whole number of blocks of {d}")
        extras.add(m // d - blocks)
    if len(extras) != 1:
        raise ValueError(f"coupled groups must be given the same number of blocks, got {sorted(b + blocks for b in extras)}")
    return extras.pop()


def group_align_labels(sims: list[torch.Tensor], n_models: int, blocks: int,
                       merged: list[int] | None = None) -> list[tuple[torch.Tensor, float]]:
    """Block-structured align of each similarity (one shared block pairing); labels and score (the
    mean matched similarity over all (model 0, model i) pairs) per similarity; ``merged``: the
    merged units per similarity (a width budget, whole blocks)."""
    outer, per_sim = pair_blocks(sims, n_models, blocks)
    extra = extra_blocks(sims, n_models, blocks, merged)
    weak = pairing_scores(outer, per_sim, n_models, blocks) if extra else None
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
        labels = labels_from_perms(perms, sim.device)
        if extra:
            labels = detach_weakest(labels, weak, n_models, extra, d)
        out.append((labels, float(np.mean(scores)) if scores else 0.0))
    return out


def group_zip_labels(sims: list[torch.Tensor], n_models: int, blocks: int, a: float = 0.5, b: float = 1.0,
                     merged: list[int] | None = None) -> list[tuple[torch.Tensor, float]]:
    """Pair blocks as in group align, then zip each paired block set to d merged units placed at
    ``j*d:(j+1)*d``; labels and score (mean of the block sets' zip scores) per similarity.
    ``merged``: the merged units per similarity (a width budget, whole blocks): the weakest
    pairings' blocks are detached first and kept whole after the first G blocks."""
    outer, per_sim = pair_blocks(sims, n_models, blocks)
    extra = extra_blocks(sims, n_models, blocks, merged)
    detached: list[tuple[int, int]] = []  # (model i >= 1, model-0 block j) in merged-block order
    if extra:
        if extra > (n_models - 1) * blocks:
            raise ValueError(f"a width of {blocks + extra} blocks is more than the {n_models * blocks} of all models together")
        weak = pairing_scores(outer, per_sim, n_models, blocks).reshape(-1)
        detached = sorted(divmod(int(f), blocks) for f in np.argsort(weak, kind="stable")[:extra])
        detached = [(i + 1, j) for i, j in detached]
    out = []
    for sim in sims:
        o = sim.shape[0] // n_models
        d = o // blocks
        labels = torch.empty(sim.shape[0], dtype=torch.long, device=sim.device)
        scores = []
        ar = torch.arange(d, device=sim.device)
        for t, (i, j) in enumerate(detached):
            labels[i * o + int(outer[i][j]) * d + ar] = (blocks + t) * d + ar
        for j in range(blocks):
            members = [i for i in range(n_models) if (i, j) not in detached]
            idx = torch.cat([i * o + int(outer[i][j]) * d + ar for i in members])
            local, score = zip_labels(sim[idx][:, idx], len(members), a=a, b=b)
            labels[idx] = j * d + local
            if len(members) > 1:
                scores.append(score)
        out.append((labels, float(np.mean(scores)) if scores else 0.0))
    return out


def group_zip_copies(sims: list[torch.Tensor], n_models: int, blocks: int, copies: list[list[torch.Tensor | None]],
                     a: float = 0.5, b: float = 1.0) -> list[tuple[torch.Tensor, float, torch.Tensor]]:
    """Group zip of models whose block counts differ, padded with whole-block copies (``copies``: per
    similarity, per model, ``None`` or which own unit each stacked unit is): into model 0's own
    blocks. Model 0's own blocks are paired with each model's own blocks by assignment (summed
    block scores of the coupled similarities); a model's own blocks left over join the set of the
    model-0 block they score best with; each set is zipped to one block; a copy joins the merged
    unit of the unit it copies (the share of :func:`~.zipit.zip_labels`). Labels, score and shares
    per similarity."""
    o = sims[0].shape[0] // n_models
    d = o // blocks
    own = []  # per model: its own blocks (the first of the padding's; a copy block's first unit is another block's)
    for i in range(n_models):
        src = copies[0][i]
        own.append(list(range(blocks)) if src is None else [k for k in range(blocks) if int(src[k * d]) == k * d])
    members: list[list[tuple[int, int]]] = [[(0, j)] for j in own[0]]
    for i in range(1, n_models):
        total = np.zeros((blocks, blocks))
        for sim in sims:
            total += block_scores(cross_block(sim, n_models, i), blocks)[0]
        sub = total[np.ix_(own[0], own[i])]
        rows, cols = linear_sum_assignment(sub, maximize=True)
        taken = set()
        for r, c in zip(rows, cols):
            members[r].append((i, own[i][c]))
            taken.add(c)
        for c in range(len(own[i])):  # more own blocks than model 0: each joins its best set
            if c not in taken:
                members[int(np.argmax(sub[:, c]))].append((i, own[i][c]))
    out = []
    ar = torch.arange(d)
    for sim, per_model in zip(sims, copies):
        labels = torch.empty(sim.shape[0], dtype=torch.long)
        scores = []
        for j, group in enumerate(members):
            idx = torch.cat([i * o + blk * d + ar for i, blk in group])
            local, score = zip_labels(sim[idx][:, idx], len(group), a=a, b=b)[:2]
            labels[idx] = j * d + local.cpu()
            if len(group) > 1:
                scores.append(score)
        stacked_src = torch.cat([i * o + (c.cpu().long() if c is not None else torch.arange(o)) for i, c in enumerate(per_model)])
        dup = stacked_src != torch.arange(stacked_src.numel())
        labels = labels.clone()
        labels[dup] = labels[stacked_src[dup]]
        out.append((labels.to(sim.device), float(np.mean(scores)) if scores else 0.0, _shares(labels, stacked_src, dup).to(sim.device)))
    return out
