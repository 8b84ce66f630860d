"""The Rank path's arithmetic as two compiled kernels (numba): ids to rows, then scores, MMR and the top k's
per-signal terms, each in one call.

Why: a Rank over 1,000 candidates was a few dozen numpy calls on ~1,000-element arrays, and the fixed cost
of each call (~1-5 us of Python and dispatch) was most of its price: ~0.2 ms of the server's ~0.5 ms per
Rank. Here the same steps are loops over the candidates in machine code (nogil, so the gRPC pool's threads
rank in parallel), and a Rank pays two kernel dispatches.

The arithmetic is the ranker's (see ranker.py's module doc): float32 terms, the two z-scored signals'
mean and spread accumulated in float64, MMR over the best `pool` by score with the relevance rescaled to
[0, 1 - lambda], similarity the dot product of the rows of M, ties broken by the lower candidate index.
`tests/ranking/test_kernels.py` holds both kernels to a plain-numpy statement of the same rules.

Compiled on first call and cached on disk (`cache=True`: numba's cache directory, NUMBA_CACHE_DIR when the
package directory is read-only); `warm_up()` runs them once at start so no Rank pays the compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Rows of the per-signal matrix T the kernel fills, in the order of the `slots` argument.
SLOT_NAMES = ("sequence", "next", "collaborative", "session", "content", "popularity", "context", "affect")
SEQ_USED, NEXT_USED = 1, 2  # bits of the returned flags: the signal's reasons may name recent titles


@njit(cache=True, nogil=True)
def candidate_rows(keys: np.ndarray, lut: np.ndarray, use_lut: bool, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Catalog rows of the candidates that `keep` allows, ascending and each once, and how many candidates
    are not titles. `keys` are ids mapped through the dense table `lut` (use_lut), else rows already
    (-1: not a title)."""
    n = keep.shape[0]
    mark = np.zeros(n, np.bool_)
    n_lut = lut.shape[0]
    unknown = 0
    count = 0
    for i in range(keys.shape[0]):
        x = keys[i]
        r = -1
        if use_lut:
            if 0 <= x < n_lut:
                r = lut[x]
        else:
            r = x
        if r < 0 or r >= n:
            unknown += 1
        elif keep[r] and not mark[r]:
            mark[r] = True
            count += 1
    out = np.empty(count + 1, np.int64)
    j = 0
    for r in range(n):  # branch-free: every row is written, only marked ones advance
        out[j] = r
        j += mark[r]
    out = out[:count]
    return out, unknown


@njit(cache=True, nogil=True)
def _zscore_into(x: np.ndarray, mask: np.ndarray, use_mask: bool, weight: float) -> None:
    """x = weight * (x - mean) / std over x (over x[mask]); 0 outside the mask, 0 everywhere if std is 0."""
    c = x.shape[0]
    s = 0.0
    n = 0
    for i in range(c):
        if not use_mask or mask[i]:
            s += x[i]
            n += 1
    mean = np.float32(s / n)
    ss = 0.0
    for i in range(c):
        if not use_mask or mask[i]:
            d = np.float32(x[i] - mean)
            ss += d * d
    sd = np.sqrt(ss / n)
    if sd <= 0.0:
        x[:] = 0.0
        return
    f = np.float32(weight / sd)
    for i in range(c):
        if not use_mask or mask[i]:
            x[i] = (x[i] - mean) * f
        else:
            x[i] = 0.0


@njit(cache=True, nogil=True)
def _best_first(score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`idx` (ascending candidate indices) ordered by score descending, ties by index (a stable sort)."""
    neg = np.empty(idx.shape[0], np.float32)
    for i in range(idx.shape[0]):
        neg[i] = -score[idx[i]]
    return idx[np.argsort(neg, kind="mergesort")]


@njit(cache=True, nogil=True)
def _pool(score: np.ndarray, pool_n: int) -> np.ndarray:
    """Indices of the `pool_n` best scores (ties: the lower index), best first."""
    c = score.shape[0]
    if pool_n >= c:
        return _best_first(score, np.arange(c))
    thr = np.partition(-score, pool_n - 1)[pool_n - 1]  # the pool_n-th best score, negated
    better = 0
    for i in range(c):
        if -score[i] < thr:
            better += 1
    ties = pool_n - better
    idx = np.empty(pool_n, np.int64)
    j = 0
    for i in range(c):
        v = -score[i]
        if v < thr:
            idx[j] = i
            j += 1
        elif v == thr and ties > 0:
            idx[j] = i
            j += 1
            ties -= 1
    return _best_first(score, idx)


@njit(cache=True, nogil=True)
def mmr_order(rows: np.ndarray, score: np.ndarray, M: np.ndarray, diversity: float, pool_max: int,
              k: int) -> np.ndarray:
    """Candidate indices in the order to show: MMR (argmax of (1 - lam) rel - lam max sim to the picks) over
    the best `pool_max` by score, then by score."""
    c = score.shape[0]
    pool_n = min(c, pool_max)
    want = min(k, c)
    pool = _pool(score, pool_n)
    if diversity <= 0.0 or pool_n <= 1:
        head = pool
    else:
        base = np.empty(pool_n, np.float32)
        lo = score[pool[pool_n - 1]]
        for i in range(pool_n):
            base[i] = score[pool[i]] - lo
        top = max(np.float64(base[0]), 1e-9)
        keep_rel = np.float32(1.0 - diversity)
        for i in range(pool_n):
            base[i] = np.float32(base[i] / top) * keep_rel
        n_pick = min(want, pool_n)
        # Only titles within lam of the n_pick-th best relevance can be picked (value in [rel - lam, rel]).
        floor = base[n_pick - 1] - np.float32(diversity * 1.001)
        m = 0
        while m < pool_n and base[m] >= floor:
            m += 1
        d = M.shape[1]
        McT = np.empty((d, m), np.float32)  # the pool's rows of M, transposed: the dot products vectorise
        for i in range(m):
            src = M[rows[pool[i]]]
            for t in range(d):
                McT[t, i] = src[t]
        neg_lam = np.float32(-diversity)
        val = base[:m].copy()
        acc = np.empty(m, np.float32)
        picked = np.empty(n_pick, np.int64)
        picked[0] = 0
        j = 0
        for p in range(1, n_pick):
            acc[:] = 0.0
            for t in range(d):
                mj = McT[t, j]
                for i in range(m):
                    acc[i] += McT[t, i] * mj
            for i in range(m):
                v = acc[i] * neg_lam + base[i]
                if i == j:
                    v = -np.inf
                if v < val[i]:
                    val[i] = v
            j = int(np.argmax(val))
            picked[p] = j
        head = pool[picked]
    if want <= head.shape[0]:
        return head[:want].copy()
    used = np.zeros(c, np.bool_)
    for i in range(head.shape[0]):
        used[head[i]] = True
    rest = np.empty(c - head.shape[0], np.int64)
    j = 0
    for i in range(c):
        if not used[i]:
            rest[j] = i
            j += 1
    rest = _best_first(score, rest)
    out = np.empty(want, np.int64)
    out[:head.shape[0]] = head
    out[head.shape[0]:] = rest[:want - head.shape[0]]
    return out


@njit(cache=True, nogil=True)
def score_and_pick(rows: np.ndarray, base: np.ndarray, seq_known: np.ndarray, w_seq: float, use_seq: bool,
                   w_next: float, use_next: bool, ctx: np.ndarray, use_ctx: bool, aff: np.ndarray,
                   aff_strength: float, use_aff: bool, M: np.ndarray, diversity: float, pool_max: int, k: int,
                   F: np.ndarray, taste: np.ndarray, use_taste: bool, G: np.ndarray, session_w: np.ndarray,
                   content_w: np.ndarray, pop_z: np.ndarray, w_pop: float, slots: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Score the candidate rows, pick the k to show, and split their scores into the signals' terms.

    base: [3, catalog] per state (raw sequence and "next" scores, the sum of the other state terms); ctx and
    aff: per catalog row, the request's context prior and mood affinity (aff times aff_strength). Returns the
    shown candidates' indices into `rows`, their scores, T [8, k'] (row slots[s] = signal SLOT_NAMES[s]) and
    flags (SEQ_USED, NEXT_USED)."""
    c = rows.shape[0]
    b0 = np.empty(c, np.float32)
    b1 = np.empty(c, np.float32)
    score = np.empty(c, np.float32)
    flags = 0
    any_next = False
    for i in range(c):
        r = rows[i]
        b0[i] = base[0, r]
        b1[i] = base[1, r]
        if b1[i] != 0.0:
            any_next = True
    known = np.empty(c, np.bool_)
    if use_seq:
        nk = 0
        for i in range(c):
            known[i] = seq_known[rows[i]]
            nk += known[i]
        if nk:
            _zscore_into(b0, known, nk != c, w_seq)
            flags |= SEQ_USED
        else:
            b0[:] = 0.0
    else:
        b0[:] = 0.0
    if use_next and any_next:
        _zscore_into(b1, known, False, w_next)
        flags |= NEXT_USED
    strength = np.float32(aff_strength)
    for i in range(c):
        r = rows[i]
        s = b0[i] + b1[i] + base[2, r]
        if use_ctx:
            s += ctx[r]
        if use_aff:
            s += aff[r] * strength
        score[i] = s
    order = mmr_order(rows, score, M, diversity, pool_max, k)
    n = order.shape[0]
    T = np.zeros((8, n), np.float32)
    top_score = np.empty(n, np.float32)
    for q in range(n):
        i = order[q]
        r = rows[i]
        top_score[q] = score[i]
        T[slots[0], q] = b0[i]
        T[slots[1], q] = b1[i]
        if use_taste:
            t = np.float32(0.0)
            for e in range(F.shape[1]):
                t += F[r, e] * taste[e]
            T[slots[2], q] = t
        a = np.float32(0.0)
        b = np.float32(0.0)
        for g in range(G.shape[1]):
            a += G[r, g] * session_w[g]
            b += G[r, g] * content_w[g]
        T[slots[3], q] = a
        T[slots[4], q] = b
        if w_pop != 0.0:
            T[slots[5], q] = pop_z[r] * np.float32(w_pop)
        if use_ctx:
            T[slots[6], q] = ctx[r]
        if use_aff:
            T[slots[7], q] = aff[r] * strength
    return order, top_score, T, flags


def warm_up() -> None:
    """Compile (or load from numba's cache) both kernels with the Rank path's argument types, so the first
    Rank does not pay for it."""
    n, d = 4, 3
    f32 = np.float32
    keep = np.ones(n, np.bool_)
    ids = np.arange(n, dtype=np.int64)
    rows, _ = candidate_rows(ids, np.arange(n, dtype=np.int32), True, keep)
    ids.flags.writeable = False  # the Rank path's ids are a read-only view of the request's bytes
    candidate_rows(ids, np.arange(n, dtype=np.int32), True, keep)
    candidate_rows(np.arange(n, dtype=np.int64), np.zeros(0, np.int32), False, keep)
    z = np.zeros(n, f32)
    score_and_pick(rows, np.zeros((3, n), f32), keep, 1.0, True, 1.0, True, z, True, z, 0.5, True,
                   np.ones((n, d), f32), 0.2, 100, 2, np.ones((n, d), f32), np.ones(d, f32), True,
                   np.ones((n, d), f32), np.ones(d, f32), np.ones(d, f32), z, 0.5, np.arange(8, dtype=np.int64))
