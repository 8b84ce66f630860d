"""The Rank kernels (appliance/ranking/kernels.py) against a plain-numpy statement of the same rules."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.fusion.state import COMPLETE, LIKE, SKIP, ProfileState, SessionState
from appliance.ranking import RankContext
from appliance.ranking.kernels import candidate_rows, mmr_order
from appliance.ranking.ranker import _SLOTS, MMR_POOL


def _reference_rows(catalog, keep: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, int]:
    rows, known = catalog.index_of(ids)
    r = np.unique(rows[known])
    return r[keep[r]], int((~known).sum())


def _zscore(x: np.ndarray, mask: np.ndarray, weight: float) -> np.ndarray:
    v = x[mask].astype(np.float64)
    sd = v.std()
    return np.where(mask, (x - v.mean()) * weight / sd, 0.0) if sd > 0 else np.zeros_like(x)


def _reference_mmr(M: np.ndarray, rows: np.ndarray, score: np.ndarray, lam: float, k: int) -> list[int]:
    """Greedy MMR as the module doc states it, one similarity per pair, in float64."""
    pool = np.argsort(-score, kind="stable")[:MMR_POOL]
    rel = score[pool].astype(np.float64)
    rel = (1 - lam) * (rel - rel[-1]) / max(rel[0] - rel[-1], 1e-9)
    sim = M[rows[pool]].astype(np.float64) @ M[rows[pool]].astype(np.float64).T
    picked = [0]
    while len(picked) < min(k, len(pool)):
        val = rel - lam * sim[:, picked].max(axis=1)
        val[picked] = -np.inf
        picked.append(int(np.argmax(val)))
    return pool[picked].tolist()


def _state(catalog, seed: int) -> tuple[ProfileState, SessionState]:
    rng = np.random.default_rng(seed)
    p, s = ProfileState("h", catalog), SessionState("h", "s", catalog)
    for t, item in enumerate(rng.choice(catalog.ids, 30, replace=False).tolist()):
        (p if t % 3 else s).apply_event((COMPLETE, LIKE, SKIP)[t % 3], item, 1_700_000_000_000 + t)
    return p, s


def test_candidate_rows_match_unique_known_kept_rows(ranker, catalog) -> None:
    rng = np.random.default_rng(3)
    keep = rng.random(len(catalog)) < 0.8
    for size in (1, 5, 300, 1000, 5000):
        ids = rng.choice(catalog.ids, size)  # with repeats
        ids[::7] = -ids[::7]                 # and ids that are not titles
        got, unknown = candidate_rows(ids, catalog.dense_lut, True, keep)
        want, want_unknown = _reference_rows(catalog, keep, ids)
        assert got.tolist() == want.tolist() and unknown == want_unknown
        rows = catalog.lookup(ids).astype(np.int64)  # the binary-search path: rows in, -1 for unknown ids
        got2, unknown2 = candidate_rows(rows, np.zeros(0, np.int32), False, keep)
        assert got2.tolist() == want.tolist() and unknown2 == want_unknown


@pytest.mark.parametrize("seed", range(8))
def test_rank_scores_terms_and_mmr_match_numpy(ranker, catalog, seed: int) -> None:
    """Scores, every signal's term of the shown titles and the MMR order equal the numpy statement."""
    p, s = _state(catalog, seed)
    rng = np.random.default_rng(100 + seed)
    ctx = RankContext(device=1, local_hour=int(rng.integers(0, 24)), weekday=int(rng.integers(0, 7)), max_maturity=4)
    cands = rng.choice(catalog.ids, 1000, replace=False)
    got = ranker.rank(p, s, None, False, ctx, cands, 10, 0)
    d = ranker._derived(p, s)
    rows, _ = _reference_rows(catalog, d.keep[4], cands)
    w = ranker.w
    b0 = d.base[0, rows].astype(np.float64)
    b0 = _zscore(b0, ranker.seq_known[rows], w.sequence) if d.seq_q is not None else 0 * b0
    b1 = d.base[1, rows].astype(np.float64)
    b1 = _zscore(b1, np.ones(len(rows), bool), w.next) if d.next_recent is not None and b1.any() else b1
    ctx_keys = ranker._ctx_keys[(ctx.device, ctx.local_hour, ctx.weekday)]
    c = ranker._context_sum(ctx_keys)[rows] if ctx_keys else np.zeros(len(rows))
    score = b0 + b1 + d.base[2, rows] + c
    top = _reference_mmr(ranker._M, rows, score.astype(np.float32), ranker.diversity, 10)
    assert [i.item_id for i in got.items] == catalog.ids[rows[top]].tolist()
    order = [int(np.flatnonzero(rows == r)[0]) for r in rows[top]]
    np.testing.assert_allclose([i.score for i in got.items], score[order], rtol=1e-5, atol=1e-5)
    names = [n for n, _ in sorted(zip(("sequence", "next", "collaborative", "session", "content", "popularity",
                                       "context", "affect"), _SLOTS), key=lambda t: t[1])]
    for item, j in zip(got.items, order):
        r = rows[j]
        want = {"sequence": b0[j], "next": b1[j],
                "collaborative": ranker.F[r] @ d.taste if d.taste is not None else 0.0,
                "session": ranker.Gs[r] @ d.session_w, "content": ranker.Gs[r] @ d.content_w,
                "popularity": ranker.pop_z[r] * d.w_pop, "context": c[j], "affect": 0.0}
        np.testing.assert_allclose([item.contributions[n] for n in names], [want[n] for n in names], atol=1e-5)
        assert abs(sum(item.contributions.values()) - item.score) < 1e-4  # the reasons add up to the score


def test_mmr_beyond_the_pool_and_without_diversity(ranker) -> None:
    """k larger than the pool: the MMR head, then the rest by score; diversity 0: plain score order."""
    rng = np.random.default_rng(9)
    rows = np.sort(rng.choice(len(ranker._M), 300, replace=False)).astype(np.int64)
    score = rng.standard_normal(300).astype(np.float32)
    by_score = np.argsort(-score, kind="stable")
    assert mmr_order(rows, score, ranker._M, 0.0, MMR_POOL, 150).tolist() == by_score[:150].tolist()
    got = mmr_order(rows, score, ranker._M, 0.3, MMR_POOL, 150).tolist()
    assert len(set(got)) == 150 and sorted(got[:MMR_POOL]) == sorted(by_score[:MMR_POOL].tolist())
    assert got[MMR_POOL:] == by_score[MMR_POOL:150].tolist()
    assert got[:10] == _reference_mmr(ranker._M, rows, score, 0.3, 10)
