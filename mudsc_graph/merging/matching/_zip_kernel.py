"""ZipIt!'s greedy loop compiled with numba (the ``fast`` extra), step for step the same as the
numpy loop in :mod:`.zipit`: the same pairs in the same order, the same labels.

Why a compiled loop: the loop is sequential and each step is a handful of O(N*O) vector
operations, so in numpy the per-call overhead dominates below a few thousand units (about 7x
faster compiled at 1,024 stacked units).

Two differences in bookkeeping, none in results:

* A dead cluster's column is not overwritten with -inf; rows skip dead columns instead.
* A fused cluster's new similarities are written to its row at once, to its column late. The
  column write is strided, one entry per row: at 6,144 units (a ViT-B/16 MLP pair) it touched a
  new page for every entry and made most of the loop's time. Up to :data:`PENDING` fused
  clusters wait, and their columns are then written together, row by row. Until then every read
  of a pair goes to the newer of its two rows: ``fresh[r]`` is the step that last rewrote row
  ``r``, and a pending column ``p`` is read as ``work[p, r]`` where ``fresh[p] > fresh[r]``.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np

_NEG = -np.inf
PENDING = 64
"""Fused clusters whose columns wait to be written (see the module docstring)."""


def _rescan(work, r, alive, rowmax, rowarg, fresh, pend, npend, skip):
    """Row r's maximum over live columns (first index on ties; column 0 when none is finite),
    reading ``work[p, r]`` for a pending column ``p`` whose row is newer than row r."""
    k = 0
    for q in range(npend):
        p = pend[q]
        if fresh[p] > fresh[r]:
            skip[p] = True
            k += 1
    best = _NEG
    arg = 0
    for c in range(work.shape[1]):
        if alive[c] and not skip[c] and work[r, c] > best:
            best = work[r, c]
            arg = c
    if k:
        for q in range(npend):
            p = pend[q]
            if skip[p]:
                skip[p] = False
                v = work[p, r]
                if alive[p] and (v > best or (v == best and p < arg)):
                    best = v
                    arg = p
    rowmax[r] = best
    rowarg[r] = arg


def _fallback(src, alive, half):
    """The two live representatives with the highest symmetrised input similarity."""
    n = src.shape[0]
    best = _NEG
    r0 = -1
    c0 = -1
    for x in range(n):
        if not alive[x]:
            continue
        for y in range(n):
            if y == x or not alive[y]:
                continue
            s = (src[x, y] + src[y, x]) * half
            if r0 < 0 or s > best:
                best = s
                r0 = x
                c0 = y
    return r0, c0


def _flush(work, alive, fresh, pend, npend, is_pend):
    """Write the pending columns: ``work[r, p] = work[p, r]`` where row p is newer than row r."""
    for r in range(work.shape[0]):
        if not alive[r]:
            continue
        for q in range(npend):
            p = pend[q]
            if fresh[p] > fresh[r]:
                work[r, p] = work[p, r]
    for q in range(npend):
        is_pend[pend[q]] = False


def _fuse(work, i, j, a, zero, fresh, pend, npend):
    """Row i becomes the fused cluster's: ``a * min(row i, row j)`` (rows i and j first take their
    pairs' values from pending columns newer than them); its pairs with i and j become -inf."""
    for q in range(npend):
        p = pend[q]
        if fresh[p] > fresh[i]:
            work[i, p] = work[p, i]
        if fresh[p] > fresh[j]:
            work[j, p] = work[p, j]
    for c in range(work.shape[1]):
        x = min(work[i, c], work[j, c])
        if a == 0:
            if x != _NEG:
                x = zero
        elif a != 1:
            x = x * a
        work[i, c] = x
    work[i, i] = _NEG
    work[i, j] = _NEG


def _renew(work, i, j, alive, owner, stale, rowmax, rowarg):
    """After fusing j into i: owners, every live row's cached maximum against the new row i, and
    which rows must be scanned again (their maximum was at i or j)."""
    for r in range(work.shape[0]):
        if owner[r] == j:
            owner[r] = i
        stale[r] = False
        if not alive[r]:
            continue
        v = work[i, r]
        stale[r] = rowarg[r] == i or rowarg[r] == j
        if v > rowmax[r] or (v == rowmax[r] and rowarg[r] > i):
            rowmax[r] = v
            rowarg[r] = i
    stale[i] = True


def _greedy(work, src, o, to_remove, consts, budget, owner, pairs, pending):
    """The loop of ``zipit._greedy_numpy`` on ``work`` (updated in place); ``consts`` holds
    (0.5, a) in ``work``'s dtype so every product rounds as numpy's does; fills ``owner`` and
    ``pairs`` (to_remove x 2). Up to ``pending`` fused clusters' columns are written late (see
    the module docstring)."""
    n = work.shape[0]
    half = consts[0]
    a = consts[1]
    zero = half - half
    rowmax = np.empty(n, work.dtype)
    rowarg = np.empty(n, np.int64)
    stale = np.zeros(n, np.bool_)
    alive = np.ones(n, np.bool_)
    fresh = np.zeros(n, np.int64)  # the step whose fusion last rewrote row r (0: the input)
    pend = np.empty(max(pending, 1), np.int64)
    is_pend = np.zeros(n, np.bool_)
    skip = np.zeros(n, np.bool_)
    npend = 0
    for r in range(n):
        _rescan(work, r, alive, rowmax, rowarg, fresh, pend, npend, skip)
        owner[r] = r
    for step in range(to_remove):
        k = 0
        for r in range(1, n):
            if rowmax[r] > rowmax[k]:
                k = r
        r0 = k
        c0 = rowarg[k]
        if rowmax[k] == _NEG:
            r0, c0 = _fallback(src, alive, half)
        i = min(r0, c0)
        j = max(r0, c0)
        pairs[step, 0] = i
        pairs[step, 1] = j
        _fuse(work, i, j, a, zero, fresh, pend, npend)
        alive[j] = False
        rowmax[j] = _NEG
        fresh[i] = step + 1
        if not is_pend[i]:
            is_pend[i] = True
            pend[npend] = i
            npend += 1
        _renew(work, i, j, alive, owner, stale, rowmax, rowarg)
        m = i // o
        if m == j // o:
            budget[m] -= 1
            if budget[m] == 0:
                for r in range(m * o, (m + 1) * o):
                    for c in range(m * o, (m + 1) * o):
                        work[r, c] = _NEG
                    stale[r] = alive[r]
        for r in range(n):
            if stale[r]:
                _rescan(work, r, alive, rowmax, rowarg, fresh, pend, npend, skip)
        if npend >= pending:
            _flush(work, alive, fresh, pend, npend, is_pend)
            npend = 0


_LOCK = threading.Lock()  # the solver may ask from several threads at once


@functools.cache
def _compile() -> Callable | None:
    global _rescan, _fallback, _flush, _fuse, _renew
    try:
        import numba
    except ImportError:  # the numpy loop in zipit.py is used instead
        return None
    jit = numba.njit(cache=True, nogil=True)
    _rescan, _fallback, _flush = jit(_rescan), jit(_fallback), jit(_flush)  # _greedy calls them by these global names
    _fuse, _renew = jit(_fuse), jit(_renew)
    return jit(_greedy)


def compiled() -> Callable | None:
    """The compiled loop, or ``None`` without numba (imported on first use: it takes a while)."""
    with _LOCK:
        return _compile()


def available() -> bool:
    return compiled() is not None


def run(work, src, o: int, to_remove: int, a: float, budget: list[int], pending: int = PENDING):
    """The compiled loop with the numpy loop's signature and results: (owner, pairs_i, pairs_j)."""
    n = work.shape[0]
    owner = np.empty(n, np.int64)
    pairs = np.empty((to_remove, 2), np.int64)
    consts = np.array([0.5, a], dtype=work.dtype)
    compiled()(np.ascontiguousarray(work), np.ascontiguousarray(src), o, to_remove, consts,
               np.array(budget, np.int64), owner, pairs, max(1, int(pending)))
    return owner, pairs[:, 0].tolist(), pairs[:, 1].tolist()
