"""HR@K and NDCG@K with full ranking, exclusion of the fitted history, and fair ties.

rank r counts from 1; HR@K = [r <= K]; NDCG@K = 1/log2(r + 1) if r <= K else 0 (one relevant item, so
the ideal DCG is 1). Ties: when g items score strictly higher than the target and e other items tie with
it, the target's rank is uniform on g+1 .. g+e+1 and we report the expectation of HR and NDCG over that
(random tie-breaking in expectation), so a model cannot gain or lose by the order of item ids. Items in
the user's fitted history are excluded (they get -inf); a target that is itself in the history therefore
counts as a miss (the protocol excludes it; never the case in MovieLens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KS = (10, 20)


@dataclass
class PerUser:
    """Per-user metric arrays: hr[K], ndcg[K] (float64, length n_users) and each user's top-10."""
    hr: dict[int, np.ndarray]
    ndcg: dict[int, np.ndarray]
    top10: np.ndarray  # int64 [n_users, 10] item indices (ties in arbitrary order), -1 = none

    def summary(self, mask: np.ndarray | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in sorted(self.hr):
            h, n = self.hr[k], self.ndcg[k]
            if mask is not None:
                h, n = h[mask], n[mask]
            out[f"HR@{k}"] = round(float(h.mean()), 5) if len(h) else float("nan")
            out[f"NDCG@{k}"] = round(float(n.mean()), 5) if len(n) else float("nan")
        return out


def exclude_history(S: np.ndarray, histories: Sequence[np.ndarray], users: np.ndarray) -> None:
    """In place: S[row j] = scores of user users[j]; set that user's history items to -inf."""
    rows = np.concatenate([np.full(len(histories[u]), j, dtype=np.int64) for j, u in enumerate(users)]) \
        if len(users) else np.zeros(0, dtype=np.int64)
    cols = np.concatenate([histories[u] for u in users]) if len(users) else np.zeros(0, dtype=np.int64)
    S[rows, cols] = -np.inf


def from_ranks(greater: np.ndarray, ties: np.ndarray, ks: Sequence[int] = KS
               ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Expected HR/NDCG when the target's rank is uniform on greater+1 .. greater+ties+1."""
    greater = np.asarray(greater, dtype=np.int64)
    span = np.asarray(ties, dtype=np.int64) + 1
    kmax = max(ks)
    disc = np.r_[1.0 / np.log2(np.arange(1, kmax + 1) + 1.0), 0.0]
    cum = np.r_[0.0, np.cumsum(disc[:kmax])]  # cum[m] = sum of the first m discounts
    hr, nd = {}, {}
    for k in ks:
        inside = np.clip(k - greater, 0, None)
        inside = np.minimum(inside, span)
        hr[k] = inside / span
        lo = np.minimum(greater, k)
        hi = np.minimum(greater + inside, k)
        nd[k] = (cum[hi] - cum[lo]) / span
    return hr, nd


def evaluate_scores(S: np.ndarray, histories: Sequence[np.ndarray], targets: np.ndarray,
                    users: np.ndarray | None = None, ks: Sequence[int] = KS) -> PerUser:
    """S: float [n, n_items] scores of `users` (default all). Modifies S (history -> -inf)."""
    users = np.arange(S.shape[0]) if users is None else np.asarray(users)
    S = S.astype(np.float64, copy=False)
    exclude_history(S, histories, users)
    t = targets[users]
    ts = S[np.arange(len(users)), t]
    greater = (S > ts[:, None]).sum(axis=1)
    ties = (S == ts[:, None]).sum(axis=1) - 1
    excluded = ~np.isfinite(ts)
    greater = np.where(excluded, S.shape[1], greater)  # a target in the history is a miss
    ties = np.where(excluded, 0, ties)
    hr, nd = from_ranks(greater, ties, ks)
    m = min(10, S.shape[1])
    top = np.argpartition(-S, m - 1, axis=1)[:, :m]
    top = np.where(np.isfinite(np.take_along_axis(S, top, axis=1)), top, -1)
    return PerUser(hr, nd, top)


def evaluate_lists(lists: Sequence[Sequence[int]], targets: np.ndarray, ks: Sequence[int] = KS) -> PerUser:
    """From ranked lists (item indices, best first, at least max(ks) long where possible)."""
    n = len(lists)
    greater = np.empty(n, dtype=np.int64)
    top = np.full((n, 10), -1, dtype=np.int64)
    big = 1 << 40
    for u, lst in enumerate(lists):
        lst = list(lst)
        greater[u] = lst.index(int(targets[u])) if int(targets[u]) in lst else big
        top[u, : min(10, len(lst))] = lst[:10]
    hr, nd = from_ranks(greater, np.zeros(n, dtype=np.int64), ks)
    return PerUser(hr, nd, top)


def coverage(top10: np.ndarray, n_items: int) -> float:
    """Share of the item universe that appears in at least one user's top-10."""
    t = top10[top10 >= 0]
    return round(float(len(np.unique(t)) / max(n_items, 1)), 5)


def intra_list_similarity(top10: np.ndarray, item_vecs: np.ndarray) -> float:
    """Mean pairwise cosine between the items of each list (rows of item_vecs are unit or zero)."""
    vals = []
    for row in top10:
        r = row[row >= 0]
        if len(r) < 2:
            continue
        V = item_vecs[r]
        G = V @ V.T
        m = len(r)
        vals.append((G.sum() - np.trace(G)) / (m * (m - 1)))
    return round(float(np.mean(vals)), 5) if vals else float("nan")
